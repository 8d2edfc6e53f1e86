"""Parse the official files into uint8 NHWC images and int64 labels, and carve the validation split.

Public entry points: `load_split` (what training and evaluation use), `dataset_info` (what the CLI
prints), and the raw readers `read_idx` / `read_cifar_tarball`.

Arrays handed out are cached per process and read-only (`flags.writeable == False`): callers that
want to modify them must copy, so one caller cannot corrupt what the next one gets.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vaedist.data.download import ensure_files, verify
from vaedist.data.registry import resolve
from vaedist.data.spec import (
    DEFAULT_VAL_SIZE,
    SPLITS,
    DatasetSpec,
    check_val_size,
    path_val_size,
    val_indices,
)
from vaedist.errors import UsageError, VaedistError

_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes.

    Magic 2051 (images) -> uint8 (N, H, W); magic 2049 (labels) -> uint8 (N,). The returned array is a
    read-only view of the decompressed bytes. Anything else (bad gzip, bad magic, wrong length)
    raises VaedistError with one line naming the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise VaedistError(
            f"{path} is not a readable gzip file ({exc}): delete it and download it again"
        ) from None
    if len(raw) < 8:
        raise VaedistError(f"{path} is too short to be an IDX file: delete it and download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (2049, 2051):
        raise VaedistError(
            f"{path} has IDX magic {magic}, expected 2051 (images) or 2049 (labels): "
            f"it is not an MNIST-style file; delete it and download it again"
        )
    # Magic = 0x0000 | type (0x08 = ubyte) | number of dimensions.
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise VaedistError(
            f"{path} holds {len(raw)} bytes after decompression, its IDX header {dims} says {expected}: "
            f"delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# Only these members of the official tarball are ever unpickled (after the tarball's md5 was checked).
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"{_CIFAR_DIR}/data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = f"{_CIFAR_DIR}/test_batch"


def _cifar_batch(obj: object, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled batch dict -> (uint8 (N, 32, 32, 3) NHWC, int64 (N,))."""
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise VaedistError(
            f"{path}: {member} is not a CIFAR-10 batch (no b'data'/b'labels'): get the official file"
        )
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise VaedistError(
            f"{path}: {member} has data {data.dtype}{data.shape} and {len(labels)} labels, "
            f"expected uint8 (N, 3072) with N labels: get the official file"
        )
    # Each row is the red plane, then green, then blue, each 32x32 row-major: (N, C, H, W) -> NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar_tarball(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read `cifar-10-python.tar.gz` -> (train images, train labels, test images, test labels).

    Images uint8 (N, 32, 32, 3) NHWC (RGB), labels int64 (N,); train is data_batch_1..5 in order.

    Read straight from the tarball rather than extracted: extraction would double the disk use
    (~180 MB more) and add a second on-disk state that could be stale or half-written, while
    decompressing costs about a second, once per process thanks to the cache in `_load_arrays`.
    """
    path = Path(path)
    wanted = {*_CIFAR_TRAIN, _CIFAR_TEST}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted or not member.isfile():
                    continue
                f = tar.extractfile(member)
                assert f is not None  # isfile() members always have a file object
                with f:
                    # encoding='bytes': the batches were pickled by Python 2, their keys are bytes.
                    batches[member.name] = _cifar_batch(pickle.load(f, encoding="bytes"), member.name, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error, pickle.UnpicklingError) as exc:
        raise VaedistError(
            f"{path} is not a readable CIFAR-10 tarball ({exc}): delete it and download it again"
        ) from None
    missing = sorted(wanted - batches.keys())
    if missing:
        raise VaedistError(
            f"{path} lacks {', '.join(missing)}: it is not the official CIFAR-10 python tarball"
        )
    train_x = np.concatenate([batches[m][0] for m in _CIFAR_TRAIN])
    train_y = np.concatenate([batches[m][1] for m in _CIFAR_TRAIN])
    test_x, test_y = batches[_CIFAR_TEST]
    return train_x, train_y, test_x, test_y


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, what: str, folder: Path) -> None:
    if images.shape[1:] != spec.image_shape or len(images) != len(labels):
        raise VaedistError(
            f"{spec.name} {what} in {folder} has images {images.shape} and {len(labels)} labels, "
            f"expected (N, {', '.join(map(str, spec.image_shape))}) with N labels: check the files"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise VaedistError(
            f"{spec.name} {what} in {folder} has labels outside 0..{spec.num_classes - 1}: check the files"
        )


@functools.lru_cache(maxsize=4)
def _load_arrays(spec: DatasetSpec, folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse the (already verified) files once per process -> read-only (train_x, train_y, test_x, test_y).

    Keyed on the spec itself (hashable, frozen) so a patched spec never sees another spec's arrays.
    """
    base = Path(folder)
    if spec.from_path:  # the user's images, decoded once into the cache
        from vaedist.data.custom import load_arrays

        return load_arrays(spec)
    if spec.format == "idx":
        tri, trl, tei, tel = (read_idx(base / fs.filename) for fs in spec.files)
        # IDX images are (N, H, W); add the channel axis (a view, still C-contiguous).
        parts = [tri[..., None], trl.astype(np.int64), tei[..., None], tel.astype(np.int64)]
    elif spec.format == "cifar-pickle":
        parts = list(read_cifar_tarball(base / spec.files[0].filename))
    else:
        raise UsageError(
            f"dataset {spec.name!r} has unknown format {spec.format!r} (choose from: idx, cifar-pickle)"
        )
    _check(spec, parts[0], parts[1], "train", base)
    _check(spec, parts[2], parts[3], "test", base)
    return tuple(_readonly(np.ascontiguousarray(p)) for p in parts)  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _split(spec: DatasetSpec, folder: str, split: str, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    train_x, train_y, test_x, test_y = _load_arrays(spec, folder)
    if split == "test":
        return test_x, test_y
    if split == "train_full" or (split == "train" and val_size == 0):
        return train_x, train_y
    train_rows, val_rows = val_indices(len(train_y), val_size)
    rows = train_rows if split == "train" else val_rows
    return _readonly(train_x[rows]), _readonly(train_y[rows])


def load_split(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    val_size: int = DEFAULT_VAL_SIZE,
    download: bool = True,
    *,
    spec: DatasetSpec | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One split of a dataset -> (images uint8 (N, H, W, C) C-contiguous, labels int64 (N,)), read-only.

    Splits: 'train' = train_full minus val; 'val' = `val_size` rows of the official training set (see
    `val_indices`); 'train_full' = the whole official training set; 'test' = the official test set.
    val_size=0 gives an empty 'val' and 'train' == 'train_full'.
    With `download`, missing files are fetched first (md5-checked either way). `spec` overrides the
    registry entry for `name` (tests, private copies with other checksums).
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r} (choose from: {', '.join(SPLITS)})")
    spec, folder = resolve(name, root, spec)
    if not spec.from_path:
        ensure_files(spec.name, folder.parent, download=download, progress=progress, spec=spec)
    key = spec.source or str(folder.resolve())
    if spec.from_path and split in ("val", "test"):
        from vaedist.data import custom, listed

        if not custom.is_decoded(spec.digest):  # not decoded whole (maybe never: it streams): these rows alone
            return listed.decode_split(spec.source, split, val_size)
    if split in ("train", "val"):
        n_train = len(_load_arrays(spec, key)[1])
        if spec.from_path:
            val_size = path_val_size(val_size, n_train)
        # Checked against the rows actually read (a patched spec need not state train_size right).
        check_val_size(val_size, n_train, spec.name)
        val_size = int(val_size)
    return _split(spec, key, split, val_size)


def dataset_info(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_size: int = DEFAULT_VAL_SIZE,
    spec: DatasetSpec | None = None,
) -> dict:
    """What is on disk for `name`; never downloads.

    Returns {'name', 'folder' (str), 'format', 'image_shape' (H, W, C), 'class_names', 'default_likelihood',
    'val_size', 'files': {filename: 'ok'|'missing'|'corrupt'}, 'ready': all files ok,
    'splits': {'train'|'val'|'test': {'count', 'image_shape' (H, W, C), 'class_counts' (list, one per class)}}};
    'splits' is empty unless ready.
    """
    spec, folder = resolve(name, root, spec)
    files = {} if spec.from_path else verify(spec.name, folder.parent, spec=spec)
    ready = all(s == "ok" for s in files.values())
    if spec.from_path:
        folder = spec.source.partition("?")[0]
    splits: dict[str, dict] = {}
    if ready:
        for split in ("train", "val", "test"):
            images, labels = load_split(spec.source or spec.name, split, Path(folder).parent, val_size,
                                        download=False, spec=spec)  # fmt: skip
            splits[split] = {
                "count": int(len(labels)),
                "image_shape": tuple(int(d) for d in images.shape[1:]),
                "class_counts": np.bincount(labels[labels >= 0], minlength=spec.num_classes).tolist(),
            }
    meta = {}
    if spec.from_path:
        from vaedist.data.cache import load_meta

        meta = load_meta(spec.digest) or {}
    return {
        "name": spec.name,
        "fingerprint": spec.fingerprint,
        "test_split": meta.get("test_split", "official"),
        "skipped": meta.get("skipped", []),
        "folder": str(folder),
        "format": spec.format,
        "image_shape": spec.image_shape,
        "class_names": list(spec.class_names),
        "default_likelihood": spec.default_likelihood,
        "val_size": val_size,
        "files": files,
        "ready": ready,
        "splits": splits,
    }
