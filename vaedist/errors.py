"""Errors that the CLI turns into one line and an exit code (1 = failed, 2 = bad usage)."""


class VaedistError(Exception):
    """Something went wrong that is not a bug: the CLI prints the message alone and exits 1."""

    exit_code = 1


class UsageError(VaedistError):
    """The user asked for something invalid (a flag, a config value, a path): exit 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
