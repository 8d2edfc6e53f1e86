"""Reading generated data back: :func:`read_images` (any table or batch of generated rows -> uint8 arrays)
and :func:`read_generated` (a whole folder, checked complete, as evaluation reads it).

Every image column vaedist has written is read: the Hugging Face ``Image`` struct ``{bytes, path}`` (the
default since vaedist 0.5), plain PNG bytes and the uint8 fixed-shape tensor (``raw``) of earlier folders,
and the tensor's list storage when the extension type is not registered. Shards named either way
in ``data/`` (the Hub's layout) or, in earlier folders, at the root (``train-NNNNN-of-NNNNN.parquet`` or
``part-NNNNN.parquet``) are found through the manifest, which names each by its path in the folder.
The names come from :mod:`.format`, the format's one definition.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist.errors import UsageError, first_line
from vaedist.generate.format import (
    DATA_DIR,
    MANIFEST,
    META,
    dataset_digest,
    join,
    resolve_folder,
    shape_text,
    shard_of,
)
from vaedist.generate.png import decode_png

# --------------------------------------------------------------------------------------------------
# Reading images (plain pyarrow / pandas / numpy)


def _infer_shape(n: int) -> tuple[int, int, int]:
    for c in (3, 1):
        side = math.isqrt(n // c)
        if n % c == 0 and side * side * c == n:
            return side, side, c
    raise ValueError(f"cannot infer the image shape of {n} values: pass shape=(H, W, C)")


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).astype(np.uint8, copy=False) if images else np.empty((0, 0, 0, 0), np.uint8)


def _flat_lists(storage: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A list-typed column of flat pixels -> (N, *shape), in the column's own dtype."""
    return storage.flatten().to_numpy(zero_copy_only=False).reshape(len(storage), *shape)


def _png_blobs(col: pa.Array) -> list | None:
    """The PNG bytes of a binary column or of the Image struct's ``bytes`` field; None for other types."""
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = col.field("bytes")
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return col.to_pylist()
    return None


def read_shard(fs, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, C), labels int64 (n,)) of one shard file."""
    table = pq.read_table(path, filesystem=fs, columns=["label", "image"])
    return read_images(table), table["label"].to_numpy().astype(np.int64)


def read_images(data: Any, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) from generated rows, whichever ``image_format`` wrote them.

    ``data``: a pyarrow Table or pandas DataFrame with an ``image`` column, or that column itself
    (pyarrow array, pandas Series, a Ray Data batch's numpy array). The Image struct and PNG bytes are
    decoded; pyarrow keeps a raw tensor's shape, pandas turns it into flat arrays, whose shape is taken
    from ``shape`` or inferred for square images.
    """
    col = data["image"] if isinstance(data, pa.Table | dict) or hasattr(data, "columns") else data
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if isinstance(col.type, pa.FixedShapeTensorType):
            return np.array(col.to_numpy_ndarray(), dtype=np.uint8)  # a writable copy (torch.from_numpy)
        if (blobs := _png_blobs(col)) is not None:
            return _stack([decode_png(b) for b in blobs])
        if pa.types.is_fixed_size_list(col.type):
            return _flat_lists(col, shape or _infer_shape(col.type.list_size)).astype(np.uint8, copy=False)
        raise ValueError(f"not a generated image column: {col.type}")
    if isinstance(col, np.ndarray) and col.dtype == np.uint8 and col.ndim == 4:
        return col  # a Ray Data batch of the raw format: already (N, H, W, C)
    values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col, dtype=object)
    if len(values) == 0:
        return np.empty((0, *(shape or (0, 0, 0))), dtype=np.uint8)
    if isinstance(values[0], dict):  # the Image struct, as pandas and Ray Data give it: {"bytes", "path"}
        values = [v["bytes"] for v in values]
    if isinstance(values[0], bytes | bytearray | memoryview):  # PNG bytes
        return _stack([decode_png(bytes(b)) for b in values])
    flat = np.stack([np.asarray(v, dtype=np.uint8).reshape(-1) for v in values])  # (N, H*W*C)
    return flat.reshape(len(values), *(shape or _infer_shape(flat.shape[1])))


# --------------------------------------------------------------------------------------------------
# Reading a generated folder, checked: what evaluation trains on


@dataclass
class GeneratedSet:
    """A generated folder, read and checked: images uint8 (N, H, W, C), labels int64 (N,)."""

    folder: str
    images: np.ndarray
    labels: np.ndarray
    dataset: str | None
    model_uri: str | None
    model_version: str | None
    model_run_id: str | None
    image_format: str
    manifest: dict = field(default_factory=dict)
    manifest_sha1: str = ""
    label_names: dict[int, list[str]] = field(default_factory=dict)  # label -> the names its rows carry


def _first(mapping: dict, *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value not in (None, ""):
            return value
    return None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _shard_names(manifest: dict, entries: set[str]) -> list[str] | None:
    """The shard files the manifest lists, by path in the folder (``data/train-...``; ``part-...`` at
    the root in earlier folders); a path the folder does not hold is taken by its base name, as
    manifests that gave whole paths were read."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return None
    names = []
    for entry in shards:  # {"file": "data/train-00000-of-00004.parquet", "rows": ..., "sha256": ...} or a bare name
        name = _first(entry, "file", "path", "name") if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            return None
        base = name.rsplit("/", 1)[-1]
        names.append(base if name not in entries and base in entries else name)
    return names


def _open_generated(folder: str) -> tuple[Any, str, set[str]]:
    """(filesystem, root, the paths inside it of its files and of those in its ``data/``) of a folder
    that exists."""
    try:
        fs, root, _ = resolve_folder(folder)
    except Exception as exc:  # pyarrow raises several types for unsupported / unreachable URIs
        raise UsageError(f"cannot open generated folder {folder}: {exc}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"generated folder {folder} does not exist (write one with vaedist generate)")
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"generated data {folder} is not a folder (pass the folder vaedist generate wrote)")
    names = set()
    for f in fs.get_file_info(pafs.FileSelector(root)):
        if f.type == pafs.FileType.File:
            names.add(f.base_name)
        elif f.base_name == DATA_DIR and f.type == pafs.FileType.Directory:
            inner = fs.get_file_info(pafs.FileSelector(f.path))
            names |= {f"{DATA_DIR}/{g.base_name}" for g in inner if g.type == pafs.FileType.File}
    return fs, root, names


def _complete_manifest(fs, root: str, folder: str, entries: set[str]) -> tuple[dict, bytes, list[str]]:
    """(manifest, its bytes, the part files to read) of a complete folder; UsageError otherwise."""
    parts = sorted(name for name in entries if shard_of(name) is not None)
    if MANIFEST not in entries:
        if not parts:
            raise UsageError(
                f"generated folder {folder} is empty: no {MANIFEST} and no shard files ({DATA_DIR}/train-NNNNN-of-NNNNN.parquet)"
            )
        raise UsageError(
            f"generated folder {folder} is incomplete: {len(parts)} shard(s) but no {MANIFEST} (written last), "
            "so generation did not finish; rerun the same vaedist generate command to complete it"
        )
    with fs.open_input_stream(join(root, MANIFEST)) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise UsageError(f"{folder}/{MANIFEST} is not a readable manifest ({exc})") from None
    listed = _shard_names(manifest, entries)
    if listed is not None:
        missing = sorted(set(listed) - entries)
        if missing:
            raise UsageError(
                f"generated folder {folder} is incomplete: {MANIFEST} lists {missing[0]} but the file is missing "
                f"({len(missing)} missing)"
            )
        parts = sorted(listed)
    if not parts:
        raise UsageError(f"generated folder {folder} is empty: its manifest lists no shards")
    return manifest, raw, parts


def _declared_shape(meta: dict, manifest: dict) -> tuple[int, ...] | None:
    shape = manifest.get("image_shape")
    if shape is None and meta.get("image_shape"):  # "28,28,1"
        try:
            shape = [int(d) for d in meta["image_shape"].strip("[]() ").split(",")]
        except ValueError:
            return None
    if isinstance(shape, list | tuple) and all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return None


def _checked_pngs(blobs: list, where: str) -> np.ndarray:
    from PIL import UnidentifiedImageError

    try:
        out = [decode_png(blob) for blob in blobs]
    except (UnidentifiedImageError, OSError, TypeError):
        raise UsageError(f"{where}: an image is not a readable PNG") from None
    try:
        return _stack(out)
    except ValueError:
        raise UsageError(f"{where}: PNG images of different sizes") from None


def _tensor_chunk(chunk: pa.Array, shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    """One chunk of a tensor column -> (n, *shape): the extension type, or its list storage (the
    extension not registered) shaped by the declared ``image_shape``."""
    if isinstance(chunk.type, pa.FixedShapeTensorType):
        return chunk.to_numpy_ndarray()  # (n, *shape) in logical (H, W, C) order
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    typ = storage.type
    if not (pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ)):
        raise UsageError(f"{where}: image column of type {chunk.type} is neither a tensor nor PNG bytes")
    if shape is None:
        raise UsageError(
            f"{where}: image column of type {chunk.type} has no shape (no image_shape in the manifest)"
        )
    return _flat_lists(storage, shape)


def _checked_images(
    column: pa.ChunkedArray, meta: dict, manifest: dict, where: str
) -> tuple[np.ndarray, str]:
    """A part file's image column -> (uint8 (N, H, W, C), 'raw' | 'png'), checked against the metadata."""
    declared = (meta.get("image_format") or str(manifest.get("image_format") or "")).lower() or None
    typ = column.type
    bytes_like = pa.types.is_struct(typ) or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
    blobs = _png_blobs(column.combine_chunks()) if bytes_like else None
    if blobs is not None:
        if declared not in (None, "png"):
            raise UsageError(
                f"{where}: image column holds PNG bytes but the metadata says image_format={declared}"
            )
        if any(b is None for b in blobs):
            raise UsageError(f"{where}: an image has no bytes (images stored by path are not read)")
        return _checked_pngs(blobs, where), "png"
    if declared == "png":
        raise UsageError(f"{where}: metadata says image_format=png but the image column is {typ}")
    shape = _declared_shape(meta, manifest)
    chunks = [_tensor_chunk(chunk, shape, where) for chunk in column.chunks]
    arr = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 0), np.uint8)
    if arr.dtype != np.uint8:
        raise UsageError(f"{where}: images are {arr.dtype}, expected uint8")
    if arr.ndim == 3:  # (N, H, W): greyscale without a channel axis
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UsageError(f"{where}: images have shape {arr.shape[1:]}, expected H x W x C")
    return arr, "raw"


@dataclass
class _Part:
    images: np.ndarray  # uint8 (n, H, W, C)
    labels: np.ndarray  # int64 (n,)
    names: set[tuple[int, str]]  # (label, label_name) pairs seen
    image_format: str
    meta: dict[str, str]  # key-value metadata without the vaedist. prefix


def _read_part(fs, root: str, folder: str, name: str, manifest: dict) -> _Part:
    path = join(root, name)
    try:
        sch = pq.read_schema(path, filesystem=fs)
        missing_cols = [c for c in ("label", "image") if c not in sch.names]
        if missing_cols:
            raise UsageError(f"{folder}/{name} has no {missing_cols[0]!r} column: not vaedist generated data")
        cols = ["label", "image"] + (["label_name"] if "label_name" in sch.names else [])
        table = pq.read_table(path, columns=cols, filesystem=fs)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise UsageError(f"{folder}/{name} is not readable Parquet ({first_line(exc)})") from None
    meta = {
        k.decode(errors="replace").removeprefix(META): v.decode(errors="replace")
        for k, v in (sch.metadata or {}).items()
    }
    images, fmt = _checked_images(table.column("image"), meta, manifest, f"{folder}/{name}")
    labels = table.column("label").to_numpy().astype(np.int64)
    names = set()
    if "label_name" in cols:
        names = set(zip(labels.tolist(), table.column("label_name").to_pylist(), strict=True))
    return _Part(images, labels, names, fmt, meta)


def read_generated(folder: str) -> GeneratedSet:
    """Read a generated folder: checks it is complete (``_manifest.json`` present, listed shards present)
    and non-empty, and decodes the image column (fixed-shape tensor, or PNG bytes)."""
    fs, root, entries = _open_generated(folder)
    manifest, raw, names = _complete_manifest(fs, root, folder, entries)
    parts = [_read_part(fs, root, folder, name, manifest) for name in names]
    shapes = {p.images.shape[1:] for p in parts if len(p.images)}
    if len(shapes) > 1:
        raise UsageError(
            f"generated folder {folder} mixes image shapes {', '.join(shape_text(s) for s in sorted(shapes))}"
        )
    labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64)
    if len(labels) == 0:
        raise UsageError(f"generated folder {folder} is empty: its shards hold no rows")
    seen: dict[int, set[str]] = {}
    for label, name in set().union(*(p.names for p in parts)):
        seen.setdefault(label, set()).add(name)
    meta = parts[-1].meta
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    return GeneratedSet(
        folder=folder,
        images=np.concatenate([p.images for p in parts]),
        labels=labels,
        dataset=_first(manifest, "dataset") or _first(meta, "dataset"),
        model_uri=_str(_first(model, "uri") or _first(manifest, "model_uri") or _first(meta, "model_uri")),
        model_version=_str(
            _first(model, "version") or _first(manifest, "model_version") or _first(meta, "model_version")
        ),
        model_run_id=_str(_first(model, "run_id")),
        image_format="+".join(sorted({p.image_format for p in parts})),
        manifest=manifest,
        manifest_sha1=dataset_digest(raw),
        label_names={label: sorted(names) for label, names in seen.items()},
    )
