"""A dataset from a path (image folder or Parquet table) as a :class:`DatasetSpec` and its arrays.

    dataset string --parse--> location + options --list--> files by split --fingerprint--> cache entry
                                                                   (decode once: .images, in parallel)

The spec's facts (shape, classes, sizes) come from the decoded data, so they are exactly what training
sees. Without a test split, one is carved: a seeded choice of ``test_size`` training rows (by default a
tenth, at most 10,000), recorded in the fingerprint and the spec.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any

import numpy as np

from vaedist.data import cache
from vaedist.data import images as img
from vaedist.data.folders import Listing, list_folder, open_location
from vaedist.data.sources import SourceOptions, parse, path_name
from vaedist.data.spec import (
    CARVE_SEED,
    DEFAULT_TEST_FRACTION,
    MAX_CARVED_TEST,
    DatasetSpec,
    carved_test_rows,
    path_spec,
)
from vaedist.data.tables import decode_rows, is_table, list_table, read_rows
from vaedist.errors import UsageError

FORMATS = ("image-folder", "parquet")
log = logging.getLogger(__name__)


def kind_and_listing(location: str) -> tuple[str, Listing]:
    if is_table(location):
        return "parquet", list_table(location)
    return "image-folder", list_folder(location)


def fingerprint(kind: str, listing: Listing, opts: SourceOptions) -> str:
    """16 hex digits over every file (path, size, label), the classes, the split rule and the options."""
    facts = {"kind": kind, "classes": listing.class_names, "files": listing.files,
             "options": {**opts.__dict__, "name": None}, "carve": [CARVE_SEED, DEFAULT_TEST_FRACTION, MAX_CARVED_TEST]}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _folder_sources(location: str, files: list) -> list:
    fs, root = open_location(location)
    if "://" not in location:
        return [f"{root}/{rel}" for rel, _, _ in files]
    return [fs.open_input_file(f"{root}/{rel}").read() for rel, _, _ in files]  # remote: bytes


def _decode(location: str, kind: str, listing: Listing, opts: SourceOptions) -> dict[str, Any]:
    """Every split decoded and shaped together: {"x": uint8 (N, H, W, C), "y": int64 (N,), "split": str (N,),
    "classes", "skipped"}."""
    decoded, names, labels, splits, classes = img.Decoded(), [], [], [], listing.class_names
    for split in ("train", "test"):
        if kind == "parquet":
            rows = read_rows(location, listing, split, opts, classes or None)
            part, part_names = decode_rows(rows, opts)
            classes = classes or rows.class_names
            part_labels = rows.labels
        else:
            files = listing.files.get(split, [])
            part = img.decode_all(_folder_sources(location, files), opts.image_size, opts.channels)
            part_names, part_labels = [rel for rel, _, _ in files], np.array([f[2] for f in files], np.int64)
        offset = len(names)
        decoded.images += part.images
        decoded.kept += [offset + i for i in part.kept]
        decoded.bad += [(offset + i, why) for i, why in part.bad]
        names += part_names
        labels += list(part_labels)
        splits += [split] * len(part_names)
    skipped = img.refuse_bad(decoded, names, location, opts.skip_bad_images)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", location, len(skipped), skipped[0])
    keep = np.asarray(decoded.kept, dtype=np.int64)
    x = img.stack(decoded, names, opts.channels)
    return {"x": x, "y": np.asarray(labels, np.int64)[keep], "split": np.asarray(splits)[keep],
            "classes": tuple(classes), "skipped": skipped}  # fmt: skip


def _arrays(decoded: dict[str, Any], has_test: bool, test_size: int | None) -> dict[str, np.ndarray]:
    x, y, split = decoded["x"], decoded["y"], decoded["split"]
    train_x, train_y = x[split == "train"], y[split == "train"]
    if has_test:
        return {"train_x": train_x, "train_y": train_y, "test_x": x[split == "test"], "test_y": y[split == "test"]}
    test = carved_test_rows(len(train_y), test_size)
    rest = np.setdiff1d(np.arange(len(train_y)), test)
    return {"train_x": train_x[rest], "train_y": train_y[rest], "test_x": train_x[test], "test_y": train_y[test]}


@functools.lru_cache(maxsize=16)
def spec_for(dataset: str) -> DatasetSpec:
    """The spec of a dataset string naming a path: listed, fingerprinted, decoded once into the cache."""
    location, opts = parse(dataset)
    kind, listing = kind_and_listing(location)
    key = fingerprint(kind, listing, opts)
    meta = cache.load_meta(key)
    if meta is None or cache.load_arrays(key) is None:
        decoded = _decode(location, kind, listing, opts)
        if len(decoded["y"]) < 2:
            raise UsageError(f"dataset {location} has {len(decoded['y'])} readable image(s): too few to train on")
        arrays = _arrays(decoded, listing.has_test, opts.test_size)
        meta = {"fingerprint": key, "kind": kind, "location": location, "image_shape": list(decoded["x"].shape[1:]),
                "classes": list(decoded["classes"]), "train_size": len(arrays["train_y"]),
                "test_size": len(arrays["test_y"]), "test_split": "given" if listing.has_test else "carved",
                "skipped": decoded["skipped"]}  # fmt: skip
        if not cache.store(key, arrays, meta):  # a read-only cache: keep them in this process
            _MEMORY[key] = tuple(arrays[name] for name in cache.ARRAYS)
    return path_spec(dataset, path_name(dataset), meta)


_MEMORY: dict[str, tuple[np.ndarray, ...]] = {}


def is_decoded(digest: str) -> bool:
    """Whether the dataset of this fingerprint is decoded (in the cache, or held by this process)."""
    return cache.load_meta(digest) is not None or digest in _MEMORY


def load_arrays(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of a path dataset, read-only, from the cache."""
    arrays = cache.load_arrays(spec.digest) or _MEMORY.get(spec.digest)
    if arrays is None:  # the cache entry went away since the spec was made: decode again
        spec_for.cache_clear()
        spec_for(spec.source)
        arrays = cache.load_arrays(spec.digest) or _MEMORY[spec.digest]
    return arrays  # type: ignore[return-value]
