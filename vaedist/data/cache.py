"""Decoded datasets on disk, keyed by the source's fingerprint: a second run starts without decoding.

    <cache>/<fingerprint>/meta.json, train_x.npy, train_y.npy, test_x.npy, test_y.npy

``<cache>`` is ``$VAEDIST_CACHE_DIR``, else ``decoded/`` under the data folder (``vaedist.data.default_data_dir``).
A fingerprint covers every file's name and size, the classes and the options, so changed files are
decoded again under a new key. An entry is built in a hidden temporary folder and renamed into place:
two jobs filling the same entry at once both decode, the first rename wins, the second is dropped, and
no reader ever sees half an entry. Arrays are memory-mapped read-only (the page cache shares them
between the processes of one node).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vaedist.data.spec import default_data_dir

ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def cache_root() -> Path:
    env = os.environ.get("VAEDIST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return default_data_dir() / "decoded"


def load_meta(fingerprint: str) -> dict[str, Any] | None:
    try:
        return json.loads((cache_root() / fingerprint / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def load_arrays(fingerprint: str) -> tuple[np.ndarray, ...] | None:
    folder = cache_root() / fingerprint
    try:
        return tuple(np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS)
    except (OSError, ValueError):
        return None


def store(fingerprint: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
    """Write an entry whole or not at all (see the module docstring); a cache that cannot be written
    is not an error: the caller keeps its arrays in memory. Whether the entry is there now."""
    root = cache_root()
    tmp = root / f".{fingerprint}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.mkdir(parents=True)
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: an entry with meta is whole
        os.rename(tmp, root / fingerprint)
        return True
    except OSError:  # another job won the rename, or the cache is read-only / full
        shutil.rmtree(tmp, ignore_errors=True)
        return (root / fingerprint / "meta.json").exists()
