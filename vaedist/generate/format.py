"""The generated dataset's format: the one place that defines a generated folder, written and read.

    <folder>/_plan.json          the plan, written first (an unfinished folder says what it will hold)
    <folder>/part-00000.parquet  one shard each, written whole under a hidden temporary name, then renamed
    <folder>/_manifest.json      written last: a folder without it is unfinished

Columns, in this order: ``sample_id`` int64 (0..N-1 over the folder), ``label`` int16 (-1 for every row of
an unconditional model), ``label_name`` string ("" there), ``image`` (uint8 (H, W, C) as an Arrow
fixed-shape tensor, or PNG bytes with ``image_format=png``), ``z`` float32[latent]. Every part file's
schema carries ``vaedist.``-prefixed key-value metadata (model, dataset, seed, plan hash, ...).

Pure pyarrow/numpy/Pillow, no Ray: the Ray writer (:mod:`vaedist.generate.writer`), evaluation, tests and
users' own code read and write through here. A plan is anything with :class:`~vaedist.generate.plan.Plan`'s
attributes (duck-typed, so this module stays below the plan in the import order).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist import __version__
from vaedist.errors import UsageError, first_line

if TYPE_CHECKING:
    from vaedist.generate.plan import Plan

MANIFEST = "_manifest.json"
PLAN_FILE = "_plan.json"
MANIFEST_FORMAT = "vaedist-generated/1"
PART_RE = re.compile(r"part-(\d{5,})\.parquet")
# Temporary names: a shard or json file being written, or the writability probe; a killed run leaves them.
TMP_RE = re.compile(r"\.(?:part-\d{5,}\.parquet|_manifest\.json|_plan\.json|write-test)\.\w+\.tmp")
META = "vaedist."  # prefix of the Parquet key-value metadata
COLUMNS = ("sample_id", "label", "label_name", "image", "z")
IMAGE_FORMATS = ("raw", "png")
UNCONDITIONAL_LABEL = -1  # the label of every row from an unconditional model (label_name "")


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def shape_text(shape) -> str:
    """(28, 28, 1) -> '28x28x1', as messages show image shapes."""
    return "x".join(str(int(d)) for d in shape)


def resolve_folder(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root inside it, canonical URI) of a local folder or ``s3://...`` prefix; pyarrow's
    own exception for a URI it cannot open (callers word the message for their flag)."""
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/"), uri.rstrip("/")
    path = str(Path(uri).expanduser().resolve())
    return pafs.LocalFileSystem(), path, path


# --------------------------------------------------------------------------------------------------
# Writing: schema, shard table, Parquet bytes, atomic files, manifest


def schema(plan: Plan) -> pa.Schema:
    """The columns, and the key-value metadata every part file carries."""
    h, w, c = plan.image_shape
    image = pa.fixed_shape_tensor(pa.uint8(), (h, w, c)) if plan.image_format == "raw" else pa.binary()
    metadata = {
        "model_uri": plan.model_uri,
        "model_version": plan.model_version,
        "model_sha256": plan.model_sha256,
        "dataset": plan.dataset,
        "seed": str(plan.seed),
        "temperature": repr(float(plan.temperature)),
        "version": __version__,
        "image_format": plan.image_format,
        "image_shape": ",".join(map(str, plan.image_shape)),
        "plan_hash": plan.hash,
    }
    return pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("label", pa.int16(), nullable=False),
            pa.field("label_name", pa.string(), nullable=False),
            pa.field("image", image, nullable=False),
            pa.field("z", pa.list_(pa.float32(), plan.latent_dim), nullable=False),
        ],
        metadata={META + k: v for k, v in metadata.items()},
    )


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def encode_pngs(images: np.ndarray, threads: int = 1) -> list[bytes]:
    """PNG bytes per image (uint8 (N, H, W, C), C = 1 or 3); zlib runs without the GIL, so threads help."""
    if threads <= 1 or len(images) < 64:
        return [_png(im) for im in images]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_png, images, chunksize=64))


def decode_png(data: bytes) -> np.ndarray:
    """uint8 (H, W, C) from PNG bytes (greyscale gets its channel axis back)."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[:, :, None] if arr.ndim == 2 else arr


def shard_table(plan: Plan, shard: int, images: np.ndarray, z: np.ndarray, threads: int = 1) -> pa.Table:
    """One shard's rows: images uint8 (rows, H, W, C) and z float32 (rows, L) of its sample ids, in order."""
    start, rows = plan.shard_range(shard)
    idx = plan.label_index(start, rows)  # (rows,) positions in plan.labels
    sch = schema(plan)
    h, w, c = plan.image_shape
    if plan.image_format == "raw":
        storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), h * w * c)
        image = pa.ExtensionArray.from_storage(sch.field("image").type, storage)
    else:
        image = pa.array(encode_pngs(images, threads), pa.binary())
    columns = [
        pa.array(np.arange(start, start + rows, dtype=np.int64)),
        pa.array(np.asarray(plan.labels, dtype=np.int16)[idx]),
        pa.array(np.asarray(plan.label_names, dtype=object)[idx], pa.string()),
        image,
        pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), plan.latent_dim),
    ]
    return pa.Table.from_arrays(columns, schema=sch)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """The file as bytes: zstd, dictionary only for label_name, statistics only for the id columns.

    Parquet has no 8-bit integer type: the tensor's uint8 pixels are stored as INT32. Plain, they give
    zstd 4 bytes per pixel (0.80 byte/pixel after zstd for a briefly trained MNIST model, 115k images/s);
    a dictionary packs them back to 8 bits (0.53, 104k/s); BYTE_STREAM_SPLIT puts each byte of the
    INT32s in its own stream, three of them all zeros, and is both the smallest and the fastest (0.52,
    200k/s; real MNIST: 0.21 byte/pixel). It needs a Parquet reader from 2024 on (pyarrow >= 17).
    """
    encodings = {"z.list.element": "BYTE_STREAM_SPLIT"}
    if isinstance(table.schema.field("image").type, pa.FixedShapeTensorType):  # raw; PNG bytes stay plain
        encodings["image.list.element"] = "BYTE_STREAM_SPLIT"
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=["label_name"],
        column_encoding=encodings,
        write_statistics=["sample_id", "label"],
    )
    return sink.getvalue()


def write_atomic(fs: pafs.FileSystem, root: str, name: str, data: bytes | pa.Buffer) -> None:
    """Write ``root/name`` under a unique hidden temporary name, then rename: whole or absent."""
    tmp = join(root, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, join(root, name))
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_part(
    fs, root: str, plan: Plan, shard: int, images: np.ndarray, z: np.ndarray, threads: int = 1
) -> dict:
    """Write ``part-NNNNN.parquet`` of one shard (rows as in :func:`shard_table`): {"bytes", "sha256"}."""
    data = parquet_bytes(shard_table(plan, shard, images, z, threads))
    write_atomic(fs, root, part_name(shard), data)
    return {"bytes": data.size, "sha256": hashlib.sha256(memoryview(data)).hexdigest()}


def plan_json(plan: Plan) -> bytes:
    return json.dumps(plan.to_dict(), indent=1).encode()


def build_manifest(
    plan: Plan, shards: dict[int, dict[str, Any]], model_info: dict[str, str], request: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a complete folder: ``shards`` maps every shard to its {"bytes", "sha256"};
    ``model_info`` holds the registered name and run id where known, ``request`` what the user asked."""
    sch = schema(plan)
    return {
        "format": MANIFEST_FORMAT,
        "vaedist_version": __version__,
        "plan_hash": plan.hash,
        "model": {
            "uri": plan.model_uri,
            "version": plan.model_version,
            "name": model_info.get("name", ""),
            "run_id": model_info.get("run_id", ""),
            "sha256": plan.model_sha256,
        },
        "dataset": plan.dataset,
        "seed": plan.seed,
        "temperature": plan.temperature,
        "image_format": plan.image_format,
        "image_shape": list(plan.image_shape),
        "latent_dim": plan.latent_dim,
        "rows": plan.total,
        "rows_per_label": [
            {"label": k, "name": n, "rows": c}
            for k, n, c in zip(plan.labels, plan.label_names, plan.counts, strict=True)
        ],
        "bytes": sum(s["bytes"] for s in shards.values()),
        "request": request,
        "plan": plan.to_dict(),
        "schema": [{"name": f.name, "type": str(f.type)} for f in sch],
        "schema_metadata": {k.decode(): v.decode() for k, v in sch.metadata.items()},
        "shards": [
            {
                "file": part_name(i),
                "shard": i,
                "first_sample_id": plan.shard_range(i)[0],
                "rows": plan.shard_range(i)[1],
                "rows_per_label": plan.shard_label_counts(i),
                "bytes": shards[i]["bytes"],
                "sha256": shards[i]["sha256"],
            }
            for i in range(plan.num_shards)
        ],
    }


def write_manifest(fs, root: str, manifest: dict[str, Any]) -> None:
    write_atomic(fs, root, MANIFEST, json.dumps(manifest, indent=1).encode())


def write_folder(
    out: str,
    plan: Plan,
    images: np.ndarray,
    z: np.ndarray,
    *,
    model_info: dict[str, str] | None = None,
    request: dict[str, Any] | None = None,
    manifest: bool = True,
) -> dict[str, Any] | None:
    """A whole folder in this process, from every row in sample-id order: images uint8 (N, H, W, C), z
    float32 (N, L). The files the Ray writer produces shard by shard; ``manifest=False`` leaves the
    folder unfinished. Returns the manifest (None without one)."""
    fs, root, _ = resolve_folder(out)
    fs.create_dir(root, recursive=True)
    write_atomic(fs, root, PLAN_FILE, plan_json(plan))
    shards = {}
    for shard in range(plan.num_shards):
        start, rows = plan.shard_range(shard)
        shards[shard] = write_part(
            fs, root, plan, shard, images[start : start + rows], z[start : start + rows]
        )
    if not manifest:
        return None
    built = build_manifest(plan, shards, model_info or {}, request or {})
    write_manifest(fs, root, built)
    return built


def part_matches(fs, root: str, shard: int, rows: int, plan_hash: str) -> bool:
    """Whether a part file's footer reads back with ``rows`` rows written for ``plan_hash``."""
    try:
        meta = pq.read_metadata(join(root, part_name(shard)), filesystem=fs)
        kv = meta.metadata or {}
        return meta.num_rows == rows and kv.get(f"{META}plan_hash".encode()) == plan_hash.encode()
    except (OSError, pa.ArrowException):
        return False


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


def read_images(data: Any, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) from generated rows, whichever ``image_format`` wrote them.

    ``data``: a pyarrow Table or pandas DataFrame with an ``image`` column, or that column itself
    (pyarrow array, pandas Series, a Ray Data batch's numpy array). pyarrow keeps the tensor shape; pandas
    turns it into flat arrays, whose shape is taken from ``shape`` or inferred for square images.
    """
    col = data["image"] if isinstance(data, pa.Table | dict) or hasattr(data, "columns") else data
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if isinstance(col.type, pa.FixedShapeTensorType):
            return np.array(col.to_numpy_ndarray(), dtype=np.uint8)  # a writable copy (torch.from_numpy)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            return _stack([decode_png(b) for b in col.to_pylist()])
        if pa.types.is_fixed_size_list(col.type):
            return _flat_lists(col, shape or _infer_shape(col.type.list_size)).astype(np.uint8, copy=False)
        raise ValueError(f"not a generated image column: {col.type}")
    if isinstance(col, np.ndarray) and col.dtype == np.uint8 and col.ndim == 4:
        return col  # a Ray Data batch of the raw format: already (N, H, W, C)
    values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col, dtype=object)
    if len(values) == 0:
        return np.empty((0, *(shape or (0, 0, 0))), dtype=np.uint8)
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


def _shard_names(manifest: dict) -> list[str] | None:
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return None
    names = []
    for entry in shards:  # {"file": "part-00000.parquet", "rows": ..., "sha256": ...} or a bare name
        name = _first(entry, "file", "path", "name") if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            return None
        names.append(name.rsplit("/", 1)[-1])
    return names


def _open_generated(folder: str) -> tuple[Any, str, set[str]]:
    """(filesystem, root, the names of its files) of a folder that exists."""
    try:
        fs, root, _ = resolve_folder(folder)
    except Exception as exc:  # pyarrow raises several types for unsupported / unreachable URIs
        raise UsageError(f"cannot open generated folder {folder}: {exc}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"generated folder {folder} does not exist (write one with vaedist generate)")
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"generated data {folder} is not a folder (pass the folder vaedist generate wrote)")
    return (
        fs,
        root,
        {f.base_name for f in fs.get_file_info(pafs.FileSelector(root)) if f.type == pafs.FileType.File},
    )


def _complete_manifest(fs, root: str, folder: str, entries: set[str]) -> tuple[dict, bytes, list[str]]:
    """(manifest, its bytes, the part files to read) of a complete folder; UsageError otherwise."""
    parts = sorted(name for name in entries if PART_RE.fullmatch(name))
    if MANIFEST not in entries:
        if not parts:
            raise UsageError(
                f"generated folder {folder} is empty: no {MANIFEST} and no part-NNNNN.parquet files"
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
    listed = _shard_names(manifest)
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
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        if declared not in (None, "png"):
            raise UsageError(
                f"{where}: image column holds bytes but the metadata says image_format={declared}"
            )
        return _checked_pngs(column.to_pylist(), where), "png"
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
        manifest_sha1=hashlib.sha1(raw).hexdigest(),
        label_names={label: sorted(names) for label, names in seen.items()},
    )
