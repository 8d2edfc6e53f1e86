"""The bottom of the data layer: what a dataset is (its spec), how its splits are cut, where its files
live, and whether it is decoded whole. Plain stdlib + numpy, nothing of vaedist but its errors: the
built-in datasets (:mod:`.builtin`), the path datasets (:mod:`.custom`, :mod:`.listed`) and the stream
(``vaedist.streaming``) all build on these facts, so each is stated once.

The split rules, both fixed functions of a row count (their seeds never change):

- test carved from a source without one: the last ``test_size`` rows of a PCG64(``CARVE_SEED``)
  permutation (by default a tenth, at most ``MAX_CARVED_TEST``);
- validation carved from the training rows: the last ``val_size`` rows of a PCG64(``VAL_SEED``)
  permutation; for a path dataset the default becomes a tenth of train (:func:`path_val_size`).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaedist.errors import UsageError

if TYPE_CHECKING:  # numpy is imported where a rule runs: the configs read this module, `vaedist --help` too
    import numpy as np

SPLITS = ("train", "val", "train_full", "test")
DEFAULT_VAL_SIZE = 5000
VAL_SEED = 0  # the validation split is a fixed function of (training rows, val_size)
CARVE_SEED = 0  # the carved test split is a fixed function of (rows, test_size)
DEFAULT_TEST_FRACTION = 0.1  # carved when a source has no test split: a tenth, at most MAX_CARVED_TEST
MAX_CARVED_TEST = 10_000
PATH_LIKELIHOOD = "logistic"  # a path dataset's default likelihood: 8-bit grey or colour images
LABEL_BYTES = 8  # int64
# The largest image (width x height) vaedist decodes from a user's folder or table: 8192 x 8192. Larger
# ones are refused as unreadable (skipped with --skip-bad-images), before Pillow decodes a pixel: 64 Mpx
# of RGB is 192 MiB decoded, and a small file that claims more is Pillow's "decompression bomb"
# (docs/ARCHITECTURE.md, data/). Below Pillow's own guard (Image.MAX_IMAGE_PIXELS, about 89 Mpx), so this
# limit, not Pillow's, is the one a user meets.
MAX_IMAGE_PIXELS = 8192 * 8192
# Ray's default object store on a node: 30 % of its memory (docs.ray.io, "Object store memory").
RAY_OBJECT_STORE_FRACTION = 0.3


@dataclass(frozen=True)
class FileSpec:
    """One official distribution file: its name on the mirrors, its md5 and its size in bytes."""

    filename: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset.

    `files` order matters to the readers:
      - format 'idx': (train images, train labels, test images, test labels), each a gzipped IDX file;
      - format 'cifar-pickle': (the `cifar-10-python.tar.gz` tarball,);
      - formats 'image-folder' and 'parquet' (the user's images, :mod:`vaedist.data.custom`): no files;
        `source` is the dataset string and `digest` the fingerprint of its files and options.
    `image_shape` is (H, W, C); images are always handed out as uint8 NHWC.
    Frozen and made of tuples so a spec is hashable: the in-process caches key on it.
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    format: str
    files: tuple[FileSpec, ...]
    mirrors: tuple[str, ...]
    default_likelihood: str
    train_size: int
    test_size: int
    source: str = ""  # a path dataset's string (location and options); "" for the built-in ones
    digest: str = ""  # a path dataset's fingerprint (vaedist.data.custom.fingerprint)

    @property
    def from_path(self) -> bool:
        return bool(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """16 hex digits that change whenever the data could: the official files' md5s, shape and classes.
        Runs, models and manifests record it; MLflow shows it as the dataset's digest."""
        if self.digest:
            return self.digest
        facts = [self.name, self.format, *map(str, self.image_shape), *self.class_names]
        facts += [f"{f.filename}:{f.md5}:{f.size}" for f in self.files]
        return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


def path_spec(dataset: str, name: str, meta: dict[str, Any]) -> DatasetSpec:
    """The spec of a path dataset from its record (the cache's meta.json, or the listing's facts)."""
    return DatasetSpec(
        name=name, image_shape=tuple(meta["image_shape"]), class_names=tuple(meta["classes"]),
        format=meta["kind"], files=(), mirrors=(), default_likelihood=PATH_LIKELIHOOD,
        train_size=meta["train_size"], test_size=meta["test_size"], source=dataset, digest=meta["fingerprint"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The split rules


def split_digest(fingerprint: str, split: str, val_size: int) -> str:
    """A split's identity, 16 hex digits: the data's fingerprint with the split rule (the seeded
    validation hold-out of ``val_size`` rows, :func:`val_indices`). Runs log their splits under it as
    MLflow dataset inputs, and the champion compares only -ELBOs measured on one ``"validation"`` digest."""
    return hashlib.sha256(f"{fingerprint}/{split}/val_size={int(val_size)}".encode()).hexdigest()[:16]


def carved_test_rows(n: int, test_size: int | None) -> np.ndarray:
    """The training rows carved for test: sorted int64, the last ``test_size`` of a PCG64(0) permutation."""
    import numpy as np

    size = test_size if test_size is not None else min(MAX_CARVED_TEST, max(1, round(n * DEFAULT_TEST_FRACTION)))
    if not 0 < size < n:
        raise UsageError(f"test_size {size} must be between 1 and {n - 1} (the source has {n} training images)")
    perm = np.random.Generator(np.random.PCG64(CARVE_SEED)).permutation(n)
    return np.sort(perm[n - size :])


def check_val_size(val_size: int, n_train: int, what: str) -> None:
    """UsageError unless ``val_size`` is an integer in 0..n_train-1."""
    # numbers.Integral: Python's and numpy's integers alike (numpy registers its own)
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Integral) or not 0 <= val_size < n_train:
        raise UsageError(
            f"val_size must be an integer from 0 to {n_train - 1} ({what} has {n_train} training rows), got {val_size!r}"
        )


def val_indices(n_train: int, val_size: int = DEFAULT_VAL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of the full training set, both sorted int64.

    The validation rows are the LAST `val_size` entries of a permutation of range(n_train) drawn by
    numpy's Generator(PCG64(0)); train is the rest. Both are sorted so each keeps the files' order.
    Deterministic across machines and numpy versions (PCG64 and permutation are stable streams),
    and nested: the val set for a smaller val_size is a subset of the one for a larger val_size.
    """
    import numpy as np

    check_val_size(val_size, n_train, "the training set")
    perm = np.random.Generator(np.random.PCG64(VAL_SEED)).permutation(n_train)
    cut = n_train - val_size
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def path_val_size(val_size: int, n_train: int) -> int:
    """The validation size of the user's images: the default becomes a tenth of train, at most the default
    (an explicit size is kept). Shared by the in-memory path and the stream (:mod:`vaedist.data.listed`)."""
    return min(val_size, max(1, n_train // 10)) if val_size == DEFAULT_VAL_SIZE else val_size


# --------------------------------------------------------------------------------------------------
# Where the files are, and whether a dataset is decoded whole


def default_data_dir() -> Path:
    """`$VAEDIST_DATA_DIR`, else `$XDG_CACHE_HOME/vaedist/data`, else `~/.cache/vaedist/data`."""
    env = os.environ.get("VAEDIST_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vaedist" / "data"


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str | int) -> int:
    """``"512MB"`` / ``"1.5GiB"`` / ``"1000000"`` -> bytes (SI and binary units, as Ray's docs write them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"must be a size such as 512MB, 2GiB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def memory_bytes() -> int:
    """This machine's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def local_object_store_bytes() -> int:
    """The object store a local Ray would start with on this machine (Ray's default share of its
    memory); 0 where the memory is unknown."""
    return int(memory_bytes() * RAY_OBJECT_STORE_FRACTION)


def estimated_train_bytes(spec: DatasetSpec) -> int:
    """What the in-memory path would hold: every training image decoded (uint8) and its label."""
    return int(spec.train_size) * (math.prod(spec.image_shape) + LABEL_BYTES)


def budget_bytes(memory_budget: str | None, object_store_bytes: int) -> int:
    """The memory budget in bytes: ``memory_budget`` ("512MB", "2GiB", bytes), else half the object store
    (0 where it is unknown: no budget)."""
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    return int(object_store_bytes) // 2 if object_store_bytes > 0 else 0


def decode_whole(train_bytes: int, budget: int) -> bool:
    """The one rule of "decode the whole dataset or stream it": whole when its decoded train split fits the
    budget (:func:`budget_bytes`; 0: no budget known, whole as it always was). The spec lookup
    (``registry.get_spec``) and the trainer (``vaedist.streaming.streams``) both ask this."""
    return budget <= 0 or train_bytes <= budget
