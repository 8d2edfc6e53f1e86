"""A path dataset from its listing alone: its spec, its small splits, and the items a stream decodes.

:func:`vaedist.data.custom.spec_for` decodes every image to learn a dataset's facts and hold its arrays. A
dataset too large for that (``vaedist.streaming`` decides) is never decoded whole; here the same facts come
from the listing, and only what is asked for is decoded:

    dataset string --list--> items: one row per image (file, row group, row, label), in the listed order
                   --------> fingerprint (custom's own), classes, split sizes                (no decoding)
                   --------> image shape: the options, else the first training image        (one image)
    items of a split --carve--> val and test decoded alone; train decoded block by block by the stream

Row order: the listed order is the order ``custom._decode`` keeps (folders: the listing's; tables: files in
listing order, rows in file order), so both paths carve the same rows: ``carved_test_rows`` over the
listed training rows, then ``spec.val_indices`` over the rest, and the same pixels (the same
``images.fit`` calls). Two differences, both only where the in-memory path would have to see every image
first: with ``skip_bad_images``, the in-memory path carves over the images that decoded, the stream over
the listed ones, and skips (and logs) an unreadable image in whichever split it falls; without
``channels``, the stream takes the first image's (the in-memory path: 3 if any image is in colour), so a
folder mixing greyscale and colour should pass ``--channels``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vaedist.data import cache, custom
from vaedist.data import images as img
from vaedist.data.folders import open_location
from vaedist.data.sources import SourceOptions, parse, path_name
from vaedist.data.spec import (
    SPLITS,
    DatasetSpec,
    carved_test_rows,
    check_val_size,
    path_spec,
    path_val_size,
    val_indices,
)
from vaedist.data.tables import fit_array, read_group_rows, read_labels
from vaedist.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A listed path dataset. Items: ``file`` (path relative to the source; for tables dictionary-encoded),
    ``group`` (row group, 0 for image files), ``part`` (which (file, row group) a row is in: a block never
    spans two, so it reads one), ``row`` (row in the file, -1 for image files), ``label`` (int64, -1 unlabelled)."""

    dataset: str
    location: str
    kind: str  # custom.FORMATS
    opts: SourceOptions
    fingerprint: str
    class_names: tuple[str, ...]
    train: pa.Table  # the source's training rows, before the test carve
    test: pa.Table | None  # its given test rows; None: carved from train


def _folder_items(files: list[tuple[str, int, int]]) -> pa.Table:
    n = len(files)
    return pa.table({"file": pa.array([rel for rel, _, _ in files], pa.string()),
                     "group": np.zeros(n, np.int32), "part": np.zeros(n, np.int32),
                     "row": np.full(n, -1, np.int64), "label": np.array([f[2] for f in files], np.int64)})  # fmt: skip


def _table_items(files: list[tuple[str, list[int]]], labels: np.ndarray) -> pa.Table:
    """One row per table row; file names dictionary-encoded (millions of rows, a few files)."""
    sizes = [np.asarray(groups, np.int64) for _, groups in files]
    per_file = np.array([s.sum() for s in sizes], np.int64)
    group = np.concatenate([np.repeat(np.arange(len(s), dtype=np.int32), s) for s in sizes] or [np.zeros(0, np.int32)])
    part_sizes = np.concatenate(sizes or [np.zeros(0, np.int64)])
    part = np.repeat(np.arange(len(part_sizes), dtype=np.int32), part_sizes)
    row = np.concatenate([np.arange(n, dtype=np.int64) for n in per_file] or [np.zeros(0, np.int64)])
    file = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(files), dtype=np.int32), per_file)),
                                          pa.array([rel for rel, _ in files], pa.string()))  # fmt: skip
    return pa.table({"file": file, "group": group, "part": part, "row": row, "label": labels})


@functools.lru_cache(maxsize=4)
def source(dataset: str) -> Source:
    """List a path dataset (once per process): its files, labels and row groups; never its images."""
    location, opts = parse(dataset)
    kind, listing = custom.kind_and_listing(location)
    classes, test = listing.class_names, None
    if kind == "parquet":
        labelled = read_labels(location, listing, "train", opts)
        classes, train = labelled.class_names, _table_items(labelled.files, labelled.labels)
        if listing.has_test:
            given = read_labels(location, listing, "test", opts, classes)
            test = _table_items(given.files, given.labels)
    else:
        train = _folder_items(listing.files["train"])
        test = _folder_items(listing.files["test"]) if listing.has_test else None
    n = len(train) + (len(test) if test is not None else 0)
    if n < 2:
        raise UsageError(f"dataset {location} has {n} readable image(s): too few to train on")
    key = custom.fingerprint(kind, listing, opts)
    return Source(dataset, location, kind, opts, key, tuple(classes), train, test)


def _carve(src: Source) -> tuple[pa.Table, pa.Table]:
    """(train_full, test): the given test split, or ``carved_test_rows`` of the listed train rows."""
    if src.test is not None:
        return src.train, src.test
    test = carved_test_rows(len(src.train), src.opts.test_size)
    return src.train.take(np.setdiff1d(np.arange(len(src.train)), test)), src.train.take(test)


def split_items(dataset: str, split: str, val_size: int) -> pa.Table:
    """The items of a split (``spec.SPLITS``), in the listed order, by ``readers.load_split``'s rule:
    'val' = ``val_size`` rows of train_full (the default becomes a tenth), 'train' = the rest."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r} (choose from: {', '.join(SPLITS)})")
    src = source(dataset)
    train_full, test = _carve(src)
    if split in ("test", "train_full"):
        return test if split == "test" else train_full
    n = len(train_full)
    val_size = path_val_size(val_size, n)
    check_val_size(val_size, n, path_name(dataset))
    train_rows, val_rows = val_indices(n, int(val_size))
    return train_full.take(train_rows if split == "train" else val_rows)


@dataclass
class Block:
    """Decoded items: the rows that decoded, in item order, and the names of those skipped as unreadable."""

    images: np.ndarray  # uint8 (n, H, W, C)
    labels: np.ndarray  # int64 (n,)
    skipped: list[str]


def _read(fs, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read()


def _decoded_folder(fs, root: str, remote: bool, items: pa.Table, opts, channels, workers) -> tuple[img.Decoded, list]:
    names = items.column("file").to_pylist()
    sources = [_read(fs, f"{root}/{rel}") if remote else f"{root}/{rel}" for rel in names]  # remote: bytes
    return img.decode_all(sources, opts.image_size, channels, workers=workers), names


def _decoded_table(fs, root: str, items: pa.Table, opts, channels, workers) -> tuple[img.Decoded, list]:
    """Rows of Parquet files, one row group read per run of items in it (a stream's block is one run)."""
    single = fs.get_file_info(root).type == pafs.FileType.File
    files, groups, rows = items.column("file").to_pylist(), items.column("group").to_numpy(), items.column("row").to_numpy()
    parts = items.column("part").to_numpy()
    cuts = [0, *(np.flatnonzero(parts[1:] != parts[:-1]) + 1).tolist(), len(parts)]
    out, names = img.Decoded(), [f"{f} row {r}" for f, r in zip(files, rows, strict=True)]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        found = read_group_rows(fs, root, files[a], single, int(groups[a]), rows[a:b], opts)
        if isinstance(found, np.ndarray):  # stored tensors: no bytes to decode
            part = img.Decoded([fit_array(arr, opts, channels) for arr in found], list(range(len(found))))
        else:
            part = img.decode_all(found, opts.image_size, channels, workers=workers)
        out.images += part.images
        out.kept += [a + i for i in part.kept]
        out.bad += [(a + i, why) for i, why in part.bad]
    return out, names


def _shaped(decoded: img.Decoded, names: list, shape: tuple[int, int, int] | None, location: str) -> np.ndarray:
    """The images as one array of ``shape`` (greyscale given three equal channels, as ``images.stack``
    does); an image of another size is refused as the in-memory path refuses it."""
    if not decoded.images:  # every image of the block skipped as unreadable
        return np.zeros((0, *(shape or (0, 0, 1))), np.uint8)
    if shape is None:
        return img.stack(decoded, names, None)
    h, w, c = shape
    for image, i in zip(decoded.images, decoded.kept, strict=True):
        if image.shape[:2] != (h, w):
            raise UsageError(f"images differ in size: {location}/{names[i]} is {image.shape[0]}x{image.shape[1]}, "
                             f"the dataset's first image {h}x{w}; pass --image-size N or HxW to resize them all")  # fmt: skip
    return np.stack([np.repeat(im, 3, axis=2) if im.shape[2] < c else im for im in decoded.images])


def decode_items(dataset: str, kind: str, items: pa.Table, shape: tuple[int, int, int] | None,
                 workers: int | None = 1) -> Block:  # fmt: skip
    """Decode items (rows of :func:`split_items`) by the shape rule, in item order, into ``shape`` (None:
    as they come). Needs no listing (a stream's task calls it per block); ``workers``: the process pool's
    size (1: in this process). Unreadable images are refused in one line unless ``skip_bad_images``."""
    location, opts = parse(dataset)
    fs, root = open_location(location)
    # Without --channels a greyscale dataset (by its first image) decodes every image greyscale; a
    # colour one decodes each in its own mode and gives the greyscale ones three channels, as stack does.
    channels = opts.channels or (1 if shape is not None and shape[2] == 1 else None)
    if kind == "parquet":
        decoded, names = _decoded_table(fs, root, items, opts, channels, workers)
    else:
        decoded, names = _decoded_folder(fs, root, "://" in location, items, opts, channels, workers)
    skipped = img.refuse_bad(decoded, names, location, opts.skip_bad_images)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", location, len(skipped), skipped[0])
    labels = items.column("label").to_numpy()[np.asarray(decoded.kept, np.int64)]
    return Block(_shaped(decoded, names, shape, location), labels.astype(np.int64), skipped)


@functools.lru_cache(maxsize=16)
def image_shape(dataset: str) -> tuple[int, int, int]:
    """(H, W, C): ``image_size`` and ``channels`` where given, else the first readable training image's."""
    src = source(dataset)
    size, channels = src.opts.image_size, src.opts.channels
    if size is not None and channels is not None:
        return (*size, channels)
    for start in range(len(src.train)):  # past unreadable ones only with skip_bad_images (else refused)
        block = decode_items(dataset, src.kind, src.train.slice(start, 1), None)
        if len(block.images):
            return tuple(int(d) for d in block.images.shape[1:])  # type: ignore[return-value]
    raise UsageError(f"dataset {src.location} has no readable training image")


def listed_spec(dataset: str) -> DatasetSpec:
    """The spec of a path dataset without decoding it: from the decoded cache's record when the in-memory
    path decoded it before (exactly its facts), else from the listing and the first image. The same
    fingerprint either way."""
    src = source(dataset)
    meta = cache.load_meta(src.fingerprint)
    if meta is None:
        train_full, test = _carve(src)
        meta = {"fingerprint": src.fingerprint, "kind": src.kind, "image_shape": list(image_shape(dataset)),
                "classes": list(src.class_names), "train_size": len(train_full), "test_size": len(test)}  # fmt: skip
    return path_spec(dataset, path_name(dataset), meta)


def decode_split(dataset: str, split: str, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) of one split decoded alone (in a process pool when
    large): the validation and test splits of a streamed dataset. The same rows and pixels as
    ``readers.load_split`` gives where nothing is skipped."""
    block = decode_items(dataset, source(dataset).kind, split_items(dataset, split, val_size),
                         image_shape(dataset), workers=None)  # fmt: skip
    block.images.flags.writeable = block.labels.flags.writeable = False
    return block.images, block.labels


def blocks(items: pa.Table, max_rows: int) -> list[pa.Table]:
    """Items cut into blocks of at most ``max_rows``, never across a (file, row group): a stream's unit of
    work and of shuffling (its order is randomized per epoch)."""
    parts = items.column("part").to_numpy()
    cuts = [0, *(np.flatnonzero(parts[1:] != parts[:-1]) + 1).tolist(), len(parts)]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        out += [items.slice(s, min(max_rows, b - s)) for s in range(a, b, max_rows)]
    return out


def clear() -> None:
    """Forget the listings (a test that changes files in place)."""
    source.cache_clear()
    image_shape.cache_clear()
