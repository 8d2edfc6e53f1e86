"""Datasets: registry (shapes, classes, files, md5, mirrors), download + verify, readers, splits.

No Ray and no MLflow here: this package is plain numpy + stdlib so every layer can use it. The names are
imported on first use (PEP 562): `vaedist.config` reads the registry at import, and `vaedist --help` must
not pay for numpy and the readers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DATASETS": "registry",
    "DatasetSpec": "registry",
    "FileSpec": "registry",
    "get_spec": "registry",
    "default_data_dir": "download",
    "fetch": "download",
    "verify": "download",
    "dataset_info": "readers",
    "load_split": "readers",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vaedist.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vaedist.data.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
