"""The one dispatcher of the data layer: a dataset string names a built-in dataset or a path, and
:func:`get_spec` answers with its :class:`DatasetSpec` either way. Nothing in ``vaedist.data`` below it
imports it: the built-in facts (:mod:`.builtin`) and the path datasets (:mod:`.custom`, :mod:`.listed`)
build on the bottom layer (:mod:`.spec`) alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from vaedist.data.builtin import DATASETS
from vaedist.data.sources import is_path
from vaedist.data.spec import (
    DatasetSpec,
    FileSpec,
    budget_bytes,
    decode_whole,
    default_data_dir,
    estimated_train_bytes,
    local_object_store_bytes,
)
from vaedist.errors import UsageError

__all__ = ["DATASETS", "DatasetSpec", "FileSpec", "get_spec", "resolve"]


def get_spec(name: str) -> DatasetSpec:
    """The registered spec for `name`, or the spec of a path dataset; UsageError (exit 2) naming the choices
    if unknown.

    A path dataset whose decoded train split fits the budget of a local Ray (:func:`.spec.decode_whole`,
    the rule the trainer streams by) is decoded into the cache the first time
    (:func:`vaedist.data.custom.spec_for`), so its facts are exactly what training sees and a bad file,
    mixed sizes or mixed channels show at once. One that does not fit is never decoded whole: its spec
    comes from the listing and the first image (:func:`vaedist.data.listed.listed_spec`), and training
    streams it (``vaedist.streaming``)."""
    if isinstance(name, str) and is_path(name):
        from vaedist.data import custom, listed  # numpy and pyarrow: loaded only for a path

        spec = listed.listed_spec(name)  # the cache's record once decoded; else listing + first image
        if decode_whole(estimated_train_bytes(spec), budget_bytes(None, local_object_store_bytes())):
            return custom.spec_for(name)
        return spec
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown dataset {name!r} (choose from: {', '.join(DATASETS)}; or a path to an image folder or "
            "Parquet table, e.g. ./my-images)"
        ) from None


def resolve(name: str, root: str | os.PathLike | None, spec: DatasetSpec | None) -> tuple[DatasetSpec, Path]:
    """The spec to use (`spec` overrides the registry, for tests and private mirrors) and its folder."""
    if spec is None:
        spec = get_spec(name)
    elif name not in (spec.name, spec.source):
        raise UsageError(f"dataset name {name!r} does not match the spec passed in ({spec.name!r})")
    base = Path(root).expanduser() if root is not None else default_data_dir()
    return spec, base / spec.name
