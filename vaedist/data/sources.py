"""Datasets from a path: the reference string that names one, and its options.

A dataset is named everywhere by one string: a built-in name (``mnist``), or a path or URI to the user's
images with the options that shape them, as a query string::

    /data/pets                                       an image folder, options at their defaults
    /data/pets?image_size=64x64&channels=3&name=pets a folder resized to 64x64 RGB, named "pets"
    s3://bucket/tables/flowers.parquet?label_column=species

The one string travels unchanged through configs, MLflow params, checkpoints, generation plans and
manifests, so every process (Ray workers, a later ``vaedist generate``) rebuilds the same dataset from it
alone. The CLI writes the options from flags (``--image-size``, ``--channels``, ``--dataset-name``, ...).
Pure string work, except :func:`is_path`, which asks whether a bare name exists as a file or folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from vaedist.data.builtin import DATASETS
from vaedist.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class SourceOptions:
    """How a path becomes a dataset. ``None``: decided by the data (one shared size, the images' mode)."""

    name: str | None = None  # experiment vaedist/<name>, model vaedist-<name>; default: the folder/file stem
    image_size: tuple[int, int] | None = None  # (H, W): resize the shorter side, centre-crop (images.fit)
    channels: int | None = None  # 1 (greyscale) or 3 (RGB)
    image_column: str = "image"  # Parquet sources
    label_column: str = "label"
    test_size: int | None = None  # rows carved for test when the source has none; None: DEFAULT_TEST_FRACTION
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of refusing the dataset


def is_path(dataset: str) -> bool:
    """Whether a dataset string names a path or URI rather than a built-in dataset: it looks like one
    (``/``, ``.``, ``~``, a URI, options), or a file or folder of that name exists here and it is not a
    built-in name (which always wins)."""
    if "/" in dataset or "://" in dataset or dataset.startswith((".", "~")) or "?" in dataset:
        return True
    return dataset not in DATASETS and os.path.exists(dataset)


def parse_size(text: str) -> tuple[int, int]:
    """'32' -> (32, 32); '64x48' -> (64, 48) (H x W)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UsageError(f"--image-size: expected N or HxW (e.g. 32 or 64x48), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _option(key: str, value: str, where: str):
    if key == "image_size":
        return parse_size(value)
    if key in ("channels", "test_size"):
        if not value.isdigit():
            raise UsageError(f"{where}: {key} must be a whole number, got {value!r}")
        number = int(value)
        if key == "channels" and number not in (1, 3):
            raise UsageError(f"{where}: channels must be 1 or 3, got {number}")
        return number
    if key == "skip_bad_images":
        return value.lower() in ("1", "true", "yes")
    if key == "name" and not NAME_RE.fullmatch(value):
        raise UsageError(f"{where}: name {value!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return value


def parse(dataset: str) -> tuple[str, SourceOptions]:
    """(location, options) of a dataset string; UsageError naming an unknown option."""
    location, _, query = dataset.partition("?")
    known = {f.name for f in fields(SourceOptions)}
    values = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            raise UsageError(f"dataset {dataset!r}: unknown option {key!r} (choose from: {', '.join(sorted(known))})")
        values[key] = _option(key, value, f"dataset {location}")
    return location, SourceOptions(**values)


def unparse(location: str, options: SourceOptions) -> str:
    """The dataset string of a location and its options (defaults left out, fixed order)."""
    query = {}
    for f in fields(SourceOptions):
        value = getattr(options, f.name)
        if value != f.default:
            query[f.name] = "x".join(map(str, value)) if f.name == "image_size" else str(value).lower() if isinstance(value, bool) else str(value)
    return location + ("?" + urlencode(query, safe="/:") if query else "")


def with_options(dataset: str, **changes) -> str:
    """``dataset`` with some options set (``None`` values leave an option as it is)."""
    location, options = parse(dataset)
    changes = {k: v for k, v in changes.items() if v is not None}
    if "image_size" in changes and isinstance(changes["image_size"], str | int):
        changes["image_size"] = parse_size(str(changes["image_size"]))
    return unparse(location, replace(options, **changes))


def absolute(dataset: str) -> str:
    """A local location made absolute (the string must mean the same folder from any working directory)."""
    location, options = parse(dataset)
    if "://" not in location:
        location = str(Path(location).expanduser().resolve())
    return unparse(location, options)


def default_name(location: str) -> str:
    """The folder or file stem, made a valid name: /data/My Pets/ -> My-Pets; flowers.parquet -> flowers."""
    stem = Path(location.rstrip("/").rsplit("://", 1)[-1]).name
    stem = stem.removesuffix(".parquet")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "images"
    return cleaned[:64]


def path_name(dataset: str) -> str:
    """The short name of a path dataset: its ``name=`` option, else the stem of its location."""
    location, options = parse(dataset)
    return options.name or default_name(location)


def display_name(dataset: str) -> str:
    """The short name a dataset goes by in MLflow: the built-in name, or ``name=`` / the stem of a path."""
    return path_name(dataset) if is_path(dataset) else dataset
