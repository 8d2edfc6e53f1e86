"""Parquet image tables as datasets: a file or a folder written by Hugging Face ``datasets``, by vaedist
generate, or by anything else that stores one encoded image per row.

The image column is the Hugging Face ``Image`` struct (``bytes``, ``path``), plain PNG/JPEG bytes, or a uint8
tensor (vaedist's raw format). Labels are integers (class names from the ``huggingface`` schema metadata's
``ClassLabel`` when present, else ``0..K-1``) or strings (their sorted distinct values become the classes).
In a folder, files under a ``test`` folder or named ``test-*`` form the test split, the rest train (the
Hub's ``data/{split}-NNNNN-of-NNNNN.parquet`` names); files and folders starting with ``.`` or ``_`` and
non-Parquet files (a dataset card) are not data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist.data import images as img
from vaedist.data.folders import Listing, open_location
from vaedist.data.sources import SourceOptions
from vaedist.errors import UsageError


def is_table(location: str) -> bool:
    """A Parquet file, or a folder holding Parquet files (and no class folders of images)."""
    if location.rstrip("/").endswith(".parquet"):
        return True
    fs, root = open_location(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return False
    return any(e.base_name.endswith(".parquet") for e in fs.get_file_info(pafs.FileSelector(root, recursive=True)))


def _split_of(rel: str) -> str:
    parts = rel.split("/")
    return "test" if "test" in parts[:-1] or parts[-1].startswith("test") else "train"


def list_table(location: str) -> Listing:
    """The Parquet files of a source by split (labels resolved at decoding: -1 here)."""
    fs, root = open_location(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"dataset {location} does not exist (a built-in name, an image folder or a Parquet table)")
    if info.type == pafs.FileType.File:
        return Listing((), {"train": [(info.base_name, info.size, -1)]})
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((e.path[len(root) + 1 :], e.size) for e in found if e.type == pafs.FileType.File)
    files = [(rel, size) for rel, size in files if rel.endswith(".parquet")
             and not any(p.startswith((".", "_")) for p in rel.split("/"))]  # fmt: skip
    if not files:
        raise UsageError(f"dataset folder {location} holds no Parquet files")
    listing = Listing(())
    for rel, size in files:
        listing.files.setdefault(_split_of(rel), []).append((rel, size, -1))
    if not listing.files.get("train"):
        raise UsageError(f"dataset {location} has test files only: add training files")
    return listing


def _class_label_names(schema: pa.Schema, column: str) -> tuple[str, ...] | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][column] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(map(str, feature["names"]))
    return None


def _check_columns(schema: pa.Schema, rel: str, opts: SourceOptions) -> None:
    missing = [c for c in (opts.image_column, opts.label_column) if c not in schema.names]
    if missing:
        flag = "--image-column" if missing[0] == opts.image_column else "--label-column"
        raise UsageError(f"{rel} has no {missing[0]!r} column (it has: {', '.join(schema.names)}); pass {flag}")


def _read_file(fs, path: str, rel: str, opts: SourceOptions) -> tuple[pa.Table, pa.Schema]:
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{rel} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    _check_columns(schema, rel, opts)
    return pq.read_table(path, columns=[opts.image_column, opts.label_column], filesystem=fs), schema


def _open_file(fs, path: str, rel: str, opts: SourceOptions) -> pq.ParquetFile:
    """A Parquet file by its footer alone (row groups, schema): nothing of its images is read yet."""
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{rel} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    _check_columns(pf.schema_arrow, rel, opts)
    return pf


def _by_path(fs, folder: str, path: str | None, rel: str) -> bytes:
    """An Image struct without bytes: its file, absolute or relative to the table's folder (what
    ``datasets.Dataset.to_parquet`` writes for images it was given as local files)."""
    if not path:
        raise UsageError(f"{rel}: an image has neither bytes nor a path")
    full = path if path.startswith("/") or "://" in path else f"{folder}/{path}"
    try:
        with fs.open_input_file(full) as f:
            return f.read()
    except OSError:
        raise UsageError(f"{rel}: image file {path} (stored by path) is not readable") from None


def _sources(column: pa.ChunkedArray, rel: str, fs, folder: str) -> list[bytes] | np.ndarray:
    """Encoded images (bytes) of a column, or uint8 (N, H, W, C) when it holds tensors."""
    col = column.combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        arr = np.asarray(col.to_numpy_ndarray(), dtype=np.uint8)
        return arr[..., None] if arr.ndim == 3 else arr
    paths = None
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else None
        col = col.field("bytes")
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise UsageError(f"{rel}: image column of type {column.type} holds neither encoded images nor tensors")
    blobs = col.to_pylist()
    for i, blob in enumerate(blobs):
        if blob is None:
            blobs[i] = _by_path(fs, folder, paths[i] if paths else None, rel)
    return blobs


def _labels(values: list, names: tuple[str, ...] | None, rel: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if values and all(isinstance(v, str) for v in values):
        classes = tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[v] for v in values], dtype=np.int64), classes
    if any(v is None or isinstance(v, bool) or not isinstance(v, int | np.integer) for v in values):
        raise UsageError(f"{rel}: labels must be integers or strings, without gaps")
    labels = np.asarray(values, dtype=np.int64)
    k = len(names) if names else int(labels.max(initial=-1)) + 1
    bad = labels[(labels < 0) | (labels >= k)]
    if len(bad):
        raise UsageError(f"{rel}: label {int(bad[0])} is outside 0..{k - 1}" + (" (the ClassLabel's names)" if names else ""))
    return labels, names or tuple(str(i) for i in range(k))


@dataclass
class TableRows:
    sources: list  # per file: list of bytes or uint8 (n, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    names: list[str]  # a row's file and position, for messages


def _resolve_labels(location: str, split: str, raw_labels: list, declared, classes) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as class indices, and the classes. String labels share ``classes`` when given (train's)."""
    if classes and raw_labels and isinstance(raw_labels[0], str):
        unknown = sorted(set(raw_labels) - set(classes))
        if unknown:
            raise UsageError(f"{location}: {split} label {unknown[0]!r} is not a class of the training split")
        index = {n: i for i, n in enumerate(classes)}
        return np.array([index[v] for v in raw_labels], np.int64), tuple(classes)
    return _labels(raw_labels, declared or (tuple(classes) if classes else None), location)


def _file_path(root: str, rel: str, single: bool) -> str:
    return root if single else f"{root}/{rel}"


def read_rows(location: str, listing: Listing, split: str, opts: SourceOptions, classes=None) -> TableRows:
    """The encoded images and labels of a split. String labels share ``classes`` when given (train's)."""
    fs, root = open_location(location)
    single = fs.get_file_info(root).type == pafs.FileType.File
    sources, raw_labels, names, declared = [], [], [], None
    for rel, _, _ in listing.files.get(split, []):
        path = _file_path(root, rel, single)
        table, schema = _read_file(fs, path, rel, opts)
        declared = declared or _class_label_names(schema, opts.label_column)
        sources.append(_sources(table.column(opts.image_column), rel, fs, path.rsplit("/", 1)[0]))
        raw_labels += table.column(opts.label_column).to_pylist()
        names += [f"{rel} row {i}" for i in range(table.num_rows)]
    labels, class_names = _resolve_labels(location, split, raw_labels, declared, classes)
    return TableRows(sources, labels, class_names, names)


@dataclass
class TableLabels:
    """A split's labels and layout without its images: what a stream needs to plan its blocks."""

    labels: np.ndarray  # int64 (N,), rows in the order of read_rows
    class_names: tuple[str, ...]
    files: list[tuple[str, list[int]]]  # per file (listing order): (relative path, rows of each row group)


def read_labels(location: str, listing: Listing, split: str, opts: SourceOptions, classes=None) -> TableLabels:
    """The labels of a split as :func:`read_rows` resolves them, reading only the label column and the
    files' footers (row groups), never the images."""
    fs, root = open_location(location)
    single = fs.get_file_info(root).type == pafs.FileType.File
    raw_labels, files, declared = [], [], None
    for rel, _, _ in listing.files.get(split, []):
        pf = _open_file(fs, _file_path(root, rel, single), rel, opts)
        declared = declared or _class_label_names(pf.schema_arrow, opts.label_column)
        raw_labels += pf.read(columns=[opts.label_column]).column(0).to_pylist()
        files.append((rel, [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]))
    labels, class_names = _resolve_labels(location, split, raw_labels, declared, classes)
    return TableLabels(labels, class_names, files)


def read_group_rows(fs, root: str, rel: str, single: bool, group: int, rows: np.ndarray,
                    opts: SourceOptions) -> list[bytes] | np.ndarray:  # fmt: skip
    """The encoded images (or uint8 tensors) of a file's ``rows`` (row numbers in the file), all in row
    group ``group``: one row group read, the unit a stream's block is made of."""
    path = _file_path(root, rel, single)
    pf = _open_file(fs, path, rel, opts)
    first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    column = pf.read_row_group(group, columns=[opts.image_column]).column(0)
    return _sources(column.take(pa.array(np.asarray(rows) - first, pa.int64())), rel, fs, path.rsplit("/", 1)[0])


def fit_array(arr: np.ndarray, opts: SourceOptions, channels: int | None) -> np.ndarray:
    """A stored uint8 (H, W, C) tensor through the shape rule, as an encoded image would go."""
    from PIL import Image

    return img.fit(Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr), opts.image_size, channels)


def decode_rows(rows: TableRows, opts: SourceOptions) -> tuple[img.Decoded, list]:
    """Decode every row's image by the shape rule, in row order: encoded images of all files in one
    (pooled) pass, tensors (raw folders) through the same rule; files of both kinds may mix."""
    encoded, encoded_rows, tensors, row = [], [], img.Decoded(), 0
    for part in rows.sources:
        if isinstance(part, np.ndarray):  # uint8 (n, H, W, C): no bytes to decode
            for arr in part:
                tensors.images.append(fit_array(arr, opts, opts.channels))
                tensors.kept.append(row)
                row += 1
        else:
            encoded += part
            encoded_rows += range(row, row + len(part))
            row += len(part)
    found = img.decode_all(encoded, opts.image_size, opts.channels) if encoded else img.Decoded()
    at = {encoded_rows[i]: im for i, im in zip(found.kept, found.images, strict=True)} | dict(
        zip(tensors.kept, tensors.images, strict=True)
    )
    kept = sorted(at)
    decoded = img.Decoded([at[i] for i in kept], kept, [(encoded_rows[i], why) for i, why in found.bad])
    return decoded, rows.names


@dataclass(frozen=True)
class ImageTable:
    """A labelled image table read whole (what an audit or CAS reads as a foreign generated set)."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    source: str
    fingerprint: str


def read_image_table(path: str, image_column: str = "image", label_column: str = "label") -> ImageTable:
    """Every row of a Parquet table (file or folder, all splits in order); UsageError on bad input."""
    opts = SourceOptions(image_column=image_column, label_column=label_column)
    listing = list_table(path)
    files = [f for split in ("train", "test") for f in listing.files.get(split, [])]
    flat = Listing((), {"train": files})
    rows = read_rows(path, flat, "train", opts)
    decoded, names = decode_rows(rows, opts)
    if decoded.bad:
        pos, why = decoded.bad[0]
        raise UsageError(f"{path}: {names[pos]} is not a readable image ({why})")
    if not decoded.images:
        raise UsageError(f"{path} holds no rows")
    digest = hashlib.sha256(json.dumps([files, image_column, label_column]).encode()).hexdigest()[:16]
    images = img.stack(decoded, names, None)
    return ImageTable(images, rows.labels, rows.class_names, path, digest)
