"""Datasets: the built-in ones (shapes, classes, files, md5, mirrors) and the user's (a path), download +
verify, readers, splits. Layers, bottom first: ``spec`` (the spec, the split rules, the data folder, the
decode-whole rule), ``builtin`` (the built-in datasets) and ``sources`` (the dataset string); ``images``,
``folders``, ``cache``, ``tables``; ``custom`` (a path decoded whole) and ``listed`` (a path from its listing); ``registry`` (the
dispatcher: built-in name or path); ``download``; ``readers`` (``load_split``, ``dataset_info``).

No Ray and no MLflow here: this package is plain numpy + stdlib so every layer can use it. The names are
imported on first use (PEP 562): `vaedist.config` reads the built-in names at import, and `vaedist --help` must
not pay for numpy and the readers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DATASETS": "builtin",
    "DatasetSpec": "spec",
    "FileSpec": "spec",
    "get_spec": "registry",
    "default_data_dir": "spec",
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
