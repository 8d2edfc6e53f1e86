"""What the command-line modules (:mod:`vaedist.cli`, :mod:`vaedist.cli_evaluate`) share: printing a
result line, and which flags were given."""

from __future__ import annotations

from typing import Any

import click


def echo(message: str) -> None:
    click.echo(message, err=False)


def given(**values: Any) -> dict[str, Any]:
    """The flags that were given (click passes None for the others)."""
    return {k: v for k, v in values.items() if v is not None}
