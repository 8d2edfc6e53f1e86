"""Shared test set-up: real data from ../shared/data, one local Ray for the session, throwaway MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _data_dir() -> Path:
    path = Path(os.environ.get("VAEDIST_DATA_DIR") or SHARED_DATA)
    if not (path / "mnist").is_dir():
        raise RuntimeError(
            f"real MNIST not found under {path}: set VAEDIST_DATA_DIR to a folder with mnist/ and fashion-mnist/"
        )
    return path


# Every test (and every Ray worker it starts) sees the real data without downloading.
os.environ.setdefault("VAEDIST_DATA_DIR", str(_data_dir()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()
