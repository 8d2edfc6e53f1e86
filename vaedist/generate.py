"""Batch generation: a trained (C)VAE -> one folder of labelled Parquet shards, on Ray Data.

    plan (shard i -> sample ids, labels, seed) --map_batches(ShardWriter actors)--> part-NNNNN.parquet
    _plan.json (written first)                                                     _manifest.json (last)

Determinism. A sample is a pure function of (model, plan, sample_id):
- its label comes from a fixed interleave of the label-major sequence (:meth:`Plan.label_index`), a
  permutation of ``0..N-1``, so the rows per label are exact and every shard holds every class in
  proportion;
- its z comes from a counter-based generator keyed by (seed, sample_id, dim) (:func:`latents`), not
  from a worker's RNG state, so neither the shard size, nor the workers, nor the decoder batch change
  which z a sample gets. Images are byte-identical for the same model, plan and decoder batch size on
  the same kind of hardware (CPU and GPU kernels may round the last float bit differently).

Resumability (DESIGN.md, "Generated Parquet"). Each shard is written to a hidden temporary name and
renamed when complete, so a part file is either whole or absent. A folder without ``_manifest.json`` is
incomplete: the same command finishes it, rewriting only the shards that are missing or fail
verification (footer readable, row count and plan hash right); a different plan, recorded in
``_plan.json``, is refused rather than mixed in. A complete folder is never rewritten without
``overwrite``; the same plan into it again is a no-op. One generation per folder at a time.

Resources. The decoder dominates, so each actor loads the model once and writes whole shards itself
with pyarrow (Ray Data's ``write_parquet`` names files with a random id per write: a rerun would
duplicate rows); only a small summary row per shard flows back through Ray Data. Actors reserve at
most ``(cluster CPUs - 1) / workers`` CPUs each (half a CPU's worth on a 1-CPU node), so Ray Data's
own tasks always find a CPU to run on (actors holding every CPU of a 2-CPU node hang the pipeline
without an error), while torch runs as many threads as the CPUs the actor stands for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist import __version__
from vaedist.config import GenerateConfig, ResourcesConfig, section_from_dict
from vaedist.errors import UsageError, VaedistError, first_line

MANIFEST = "_manifest.json"
PLAN_FILE = "_plan.json"
MANIFEST_FORMAT = "vaedist-generated/1"
PART_RE = re.compile(r"part-(\d{5,})\.parquet")
# Temporary names: a shard or json file being written, or the writability probe; a killed run leaves them.
TMP_RE = re.compile(r"\.(?:part-\d{5,}\.parquet|_manifest\.json|_plan\.json|write-test)\.\w+\.tmp")
MAX_ROWS = 2**32  # sample ids and the label interleave are computed in uint64: (N - 1)^2 < 2^64
UNCONDITIONAL_LABEL = -1  # the label of every row from an unconditional model (label_name "")
# Test hook for the kill-and-resume test: seconds each actor sleeps after writing a shard.
SHARD_DELAY_ENV = "VAEDIST_GENERATE_SHARD_DELAY_S"
GRID_PER_LABEL = 8  # samples per label in the MLflow picture
META = "vaedist."  # prefix of the Parquet key-value metadata


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


# --------------------------------------------------------------------------------------------------
# The plan: everything that decides the output's bytes


@dataclass(frozen=True)
class Plan:
    """What to generate. Its hash guards resumes (a different plan never mixes into a folder)."""

    model_uri: str
    model_version: str
    model_sha256: str  # of the checkpoint file: an alias that moved is a different plan
    dataset: str
    labels: tuple[int, ...]  # class indices; (-1,) for an unconditional model
    label_names: tuple[str, ...]  # same order as labels; ("",) for an unconditional model
    counts: tuple[int, ...]  # rows per label, same order as labels
    seed: int
    temperature: float
    shard_rows: int
    image_format: str  # raw | png
    image_shape: tuple[int, int, int]  # (H, W, C)
    latent_dim: int

    @property
    def conditional(self) -> bool:
        return self.labels != (UNCONDITIONAL_LABEL,)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.shard_rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists), the form kept in ``_plan.json`` and the manifest."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}))

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(first sample id, rows) of a shard: contiguous ranges of ``0..N-1``."""
        start = shard * self.shard_rows
        return start, min(self.shard_rows, self.total - start)

    @property
    def stride(self) -> int:
        """A multiplier coprime to N near N / golden ratio: ``j -> j * stride mod N`` permutes 0..N-1 and
        spreads consecutive ids evenly over it (three-distance theorem), so shards mix the classes."""
        n = self.total
        a = max(1, round(n * (math.sqrt(5.0) - 1.0) / 2.0))
        while math.gcd(a, n) != 1:
            a += 1
        return a

    def label_index(self, start: int, rows: int) -> np.ndarray:
        """Position in ``labels`` of samples ``start..start+rows-1`` (int64 (rows,)).

        Sample j takes position ``p = j * stride mod N`` of the label-major sequence (counts[0] times
        the first label, then the second, ...); p is a permutation of 0..N-1, so the counts are exact.
        """
        j = np.arange(start, start + rows, dtype=np.uint64)
        p = (j * np.uint64(self.stride)) % np.uint64(self.total)
        return np.searchsorted(np.cumsum(self.counts), p.astype(np.int64), side="right")

    def shard_label_counts(self, shard: int) -> list[int]:
        start, rows = self.shard_range(shard)
        return np.bincount(self.label_index(start, rows), minlength=len(self.labels)).tolist()

    def schema(self) -> pa.Schema:
        """Columns of DESIGN.md's contract, and the key-value metadata every part file carries."""
        h, w, c = self.image_shape
        image = pa.fixed_shape_tensor(pa.uint8(), (h, w, c)) if self.image_format == "raw" else pa.binary()
        metadata = {
            "model_uri": self.model_uri,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "dataset": self.dataset,
            "seed": str(self.seed),
            "temperature": repr(float(self.temperature)),
            "version": __version__,
            "image_format": self.image_format,
            "image_shape": ",".join(map(str, self.image_shape)),
            "plan_hash": self.hash,
        }
        return pa.schema(
            [
                pa.field("sample_id", pa.int64(), nullable=False),
                pa.field("label", pa.int16(), nullable=False),
                pa.field("label_name", pa.string(), nullable=False),
                pa.field("image", image, nullable=False),
                pa.field("z", pa.list_(pa.float32(), self.latent_dim), nullable=False),
            ],
            metadata={META + k: v for k, v in metadata.items()},
        )


def split_rows(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to integer ``weights``, exactly (largest remainder, Hamilton's
    method; ties go to the earlier label)."""
    whole = sum(weights)
    if whole <= 0:
        raise UsageError("cannot split rows by class frequencies that are all zero")
    quotas = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def parse_labels(value: Any) -> tuple[int, ...] | None:
    """``'all'``/None -> None; ``'0,3,7'`` or ``[0, 3, 7]`` -> (0, 3, 7)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise UsageError(f"--labels: expected class indices like 0,3,7 or 'all', got {value!r}")
        value = [int(p) for p in parts]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise UsageError(f"generate.labels: expected a list of class indices or 'all', got {value!r}")
    if len(set(value)) != len(value):
        raise UsageError(f"labels: {list(value)} lists a class twice")
    return tuple(value)


def configs_from_spec(sections: dict[str, Any]) -> tuple[GenerateConfig, ResourcesConfig]:
    """A generate job spec's ``generate:`` and ``resources:`` sections (``labels: all`` allowed)."""
    gen = dict(sections.get("generate") or {})
    if "labels" in gen:
        gen["labels"] = parse_labels(gen["labels"])
    cfg = section_from_dict(GenerateConfig, gen, "generate")
    return cfg, section_from_dict(ResourcesConfig, sections.get("resources"), "resources")


# --------------------------------------------------------------------------------------------------
# Latents and shards (no Ray: actors, benchmarks and tests call these)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014) on uint64 arrays: a bijective, well-mixed hash."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def latents(seed: int, start: int, rows: int, dim: int, temperature: float = 1.0) -> np.ndarray:
    """z ~ N(0, T^2 I) for samples ``start..start+rows-1``: float32 (rows, dim).

    Counter-based, as in Salmon et al. (2011), "Parallel random numbers: as easy as 1, 2, 3": the
    counter (sample_id, dim, k) is hashed with the seed into uniform bits, and Box-Muller turns the
    pair k = 0, 1 into one normal. No generator state: any worker computes any sample's z alone.
    """
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    ids = np.arange(start, start + rows, dtype=np.uint64)[:, None]  # (rows, 1)
    counter = (ids * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) * np.uint64(2)  # (rows, dim)
    h1 = _splitmix64(_splitmix64(counter) ^ key)
    h2 = _splitmix64(_splitmix64(counter + np.uint64(1)) ^ key)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1): log is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (z * temperature).astype(np.float32)


def decode_images(
    model, z: np.ndarray, labels: np.ndarray | None, batch_size: int, device="cpu"
) -> np.ndarray:
    """The decoder's mean images for latents ``z`` (N, L) [and labels (N,)]: uint8 (N, H, W, C)."""
    import torch

    h, w, c = model.image_shape
    out = np.empty((len(z), h, w, c), dtype=np.uint8)
    with torch.inference_mode():
        for s in range(0, len(z), batch_size):
            zb = torch.from_numpy(z[s : s + batch_size]).to(device)
            yb = None if labels is None else torch.from_numpy(labels[s : s + batch_size]).to(device)
            x = model.generate(zb, yb)  # (B, C, H, W) in [0, 1]
            x = x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, C)
            out[s : s + len(zb)] = x.cpu().numpy()
    return out


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


def shard_table(plan: Plan, shard: int, images: np.ndarray, z: np.ndarray, threads: int = 1) -> pa.Table:
    """One shard's rows in the contract's schema."""
    start, rows = plan.shard_range(shard)
    idx = plan.label_index(start, rows)
    schema = plan.schema()
    h, w, c = plan.image_shape
    if plan.image_format == "raw":
        storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), h * w * c)
        image = pa.ExtensionArray.from_storage(schema.field("image").type, storage)
    else:
        image = pa.array(encode_pngs(images, threads), pa.binary())
    columns = [
        pa.array(np.arange(start, start + rows, dtype=np.int64)),
        pa.array(np.asarray(plan.labels, dtype=np.int16)[idx]),
        pa.array(np.asarray(plan.label_names, dtype=object)[idx], pa.string()),
        image,
        pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), plan.latent_dim),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


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


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def write_atomic(fs: pafs.FileSystem, root: str, name: str, data: bytes | pa.Buffer) -> None:
    """Write ``root/name`` under a unique hidden temporary name, then rename: whole or absent."""
    tmp = _join(root, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, _join(root, name))
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def resolve_out(out: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root inside it, canonical URI) of an output folder or ``s3://...`` prefix."""
    if "://" in out:
        try:
            fs, root = pafs.FileSystem.from_uri(out)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise UsageError(f"--out {out}: {str(exc).splitlines()[0]}") from None
        return fs, root.rstrip("/"), out.rstrip("/")
    path = str(Path(out).expanduser().resolve())
    return pafs.LocalFileSystem(), path, path


class ShardWriter:
    """A Ray Data actor: loads the model once, then renders and writes whole shards (one per input row).

    Returns one summary row per shard; the images never travel through Ray's object store.
    """

    def __init__(
        self,
        model: bytes | list,
        plan: dict[str, Any],
        out: str,
        threads: int,
        use_gpu: bool,
        batch_size: int,
        delay_s: float = 0.0,
    ):
        import torch

        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if isinstance(model, list):
            # [ObjectRef]: a ref inside a list travels as a small argument (Ray warns about large ones).
            import ray

            model = ray.get(model[0])
        self.model = model_from_bytes(model).to(self.device)
        self.plan = plan_from_dict(plan)
        self.fs, self.root, _ = resolve_out(out)
        self.threads, self.batch_size, self.delay_s = threads, batch_size, delay_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            write_shard(
                self.model, self.plan, int(i), self.fs, self.root, self.batch_size, self.device, self.threads
            )
            for i in batch["shard"]
        ]
        if self.delay_s:
            time.sleep(self.delay_s)
        return {
            key: np.array([r[key] for r in rows], dtype=object if key == "sha256" else None)
            for key in rows[0]
        }


def write_shard(
    model, plan: Plan, shard: int, fs, root: str, batch_size: int, device="cpu", threads=1
) -> dict:
    """Render shard ``shard`` and write ``part-NNNNN.parquet``; returns its summary (rows, bytes, sha256)."""
    t0 = time.perf_counter()
    start, rows = plan.shard_range(shard)
    z = latents(plan.seed, start, rows, plan.latent_dim, plan.temperature)
    labels = (
        np.asarray(plan.labels, dtype=np.int64)[plan.label_index(start, rows)] if plan.conditional else None
    )
    t1 = time.perf_counter()
    images = decode_images(model, z, labels, batch_size, device)
    decode_seconds = time.perf_counter() - t1
    data = parquet_bytes(shard_table(plan, shard, images, z, threads))
    write_atomic(fs, root, part_name(shard), data)
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    return {
        "shard": shard,
        "rows": rows,
        "bytes": data.size,
        "sha256": digest,
        "seconds": time.perf_counter() - t0,
        "decode_seconds": decode_seconds,
    }


def model_from_bytes(data: bytes):
    """A model in eval mode from a ``model.pt``'s bytes (weights only: loading runs no pickled code)."""
    import torch

    from vaedist.models import build_model_from_hparams

    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = build_model_from_hparams(ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def plan_from_dict(d: dict[str, Any]) -> Plan:
    values = {f.name: d[f.name] for f in fields(Plan)}
    for key in ("labels", "label_names", "counts", "image_shape"):
        values[key] = tuple(values[key])
    return Plan(**values)


# --------------------------------------------------------------------------------------------------
# Reading (plain pyarrow / pandas / numpy)


def _infer_shape(n: int) -> tuple[int, int, int]:
    for c in (3, 1):
        side = math.isqrt(n // c)
        if n % c == 0 and side * side * c == n:
            return side, side, c
    raise ValueError(f"cannot infer the image shape of {n} values: pass shape=(H, W, C)")


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[:, :, None] if arr.ndim == 2 else arr


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
            return _stack([_decode_png(b) for b in col.to_pylist()])
        if pa.types.is_fixed_size_list(col.type):
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
            return flat.reshape(len(col), *(shape or _infer_shape(col.type.list_size)))
        raise ValueError(f"not a generated image column: {col.type}")
    if isinstance(col, np.ndarray) and col.dtype == np.uint8 and col.ndim == 4:
        return col  # a Ray Data batch of the raw format: already (N, H, W, C)
    values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col, dtype=object)
    if len(values) == 0:
        return np.empty((0, *(shape or (0, 0, 0))), dtype=np.uint8)
    if isinstance(values[0], bytes | bytearray | memoryview):  # PNG bytes
        return _stack([_decode_png(bytes(b)) for b in values])
    flat = np.stack([np.asarray(v, dtype=np.uint8).reshape(-1) for v in values])  # (N, H*W*C)
    return flat.reshape(len(values), *(shape or _infer_shape(flat.shape[1])))


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).astype(np.uint8, copy=False) if images else np.empty((0, 0, 0, 0), np.uint8)


def load_manifest(out: str) -> dict[str, Any]:
    """The manifest of a complete generation folder (UsageError if absent: the folder is incomplete)."""
    fs, root, uri = resolve_out(out)
    try:
        with fs.open_input_stream(_join(root, MANIFEST)) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise UsageError(f"{uri} has no {MANIFEST}: the generation run is incomplete or absent") from None


# --------------------------------------------------------------------------------------------------
# The output folder


@dataclass
class OutputState:
    parts: dict[int, pafs.FileInfo] = field(default_factory=dict)
    tmp: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None

    @property
    def empty(self) -> bool:
        return not (self.parts or self.tmp or self.foreign or self.manifest or self.plan)


def _read_json(fs, path: str, uri: str) -> dict[str, Any]:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{uri}/{path.rsplit('/', 1)[-1]} is unreadable ({exc}); pass --overwrite to start over"
        ) from None


def inspect_output(fs: pafs.FileSystem, root: str, uri: str) -> OutputState:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return OutputState()
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"--out {uri} is a file, not a folder")
    state = OutputState()
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        name = entry.base_name
        if entry.type == pafs.FileType.File and (m := PART_RE.fullmatch(name)):
            state.parts[int(m.group(1))] = entry
        elif entry.type == pafs.FileType.File and TMP_RE.fullmatch(name):
            state.tmp.append(name)
        elif entry.type == pafs.FileType.File and name == MANIFEST:
            state.manifest = _read_json(fs, entry.path, uri)
        elif entry.type == pafs.FileType.File and name == PLAN_FILE:
            state.plan = _read_json(fs, entry.path, uri)
        else:
            state.foreign.append(name + ("/" if entry.type == pafs.FileType.Directory else ""))
    state.foreign.sort()
    return state


def _check_writable(root: str) -> None:
    """Fail before anything is written if the folder (or the nearest existing parent) refuses a file."""
    path = Path(root)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create --out {root}: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UsageError(f"cannot write to --out {root}: {probe} is not writable ({exc.strerror})") from None


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in new:
        if old.get(key) != new[key]:
            return f"{key} {old.get(key)!r} there, {new[key]!r} now"
    return "a different plan"


def verify_part(fs, root: str, plan: Plan, shard: int) -> bool:
    """A part file from an earlier attempt is kept if its footer reads back with the right rows and plan."""
    try:
        meta = pq.read_metadata(_join(root, part_name(shard)), filesystem=fs)
        kv = meta.metadata or {}
        return (
            meta.num_rows == plan.shard_range(shard)[1]
            and kv.get(f"{META}plan_hash".encode()) == plan.hash.encode()
        )
    except (OSError, pa.ArrowException):
        return False


def sha256_file(fs, path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------------------------------
# Preparing a run: every check, nothing written


@dataclass
class Prepared:
    cfg: GenerateConfig
    plan: Plan
    model_bytes: bytes
    model_info: dict[str, str]  # name, version, run_id where known
    fs: Any
    root: str
    uri: str
    state: OutputState
    action: str  # new | resume | overwrite | complete
    todo: list[int]  # shards to write
    kept: list[int]  # shards of an earlier attempt that verify

    @property
    def rows_todo(self) -> int:
        return sum(self.plan.shard_range(i)[1] for i in self.todo)


def _dataset_of(ckpt: dict[str, Any], path: Path) -> str:
    dataset = (ckpt.get("config") or {}).get("data.dataset") or ckpt.get("hparams", {}).get("dataset")
    if not dataset:
        raise UsageError(f"checkpoint {path} does not say which dataset it was trained on (no data.dataset)")
    return str(dataset)


def _counts(cfg: GenerateConfig, dataset: str, labels: tuple[int, ...], conditional: bool) -> tuple[int, ...]:
    if cfg.per_label is not None:
        if cfg.class_balance != "uniform":
            raise UsageError(
                "--class-balance applies to --total only (--per-label gives every label the same rows)"
            )
        return (cfg.per_label,) * len(labels)
    if cfg.class_balance == "uniform" or not conditional:
        return tuple(split_rows(cfg.total, [1] * len(labels)))
    from vaedist.data import load_split

    _, y = load_split(dataset, "train_full", progress=False)
    freq = np.bincount(y, minlength=max(labels) + 1)
    return tuple(split_rows(cfg.total, [int(freq[i]) for i in labels]))


def prepare(cfg: GenerateConfig) -> Prepared:
    """Resolve the model, build the plan, inspect the output folder; raise UsageError on any bad input."""
    from vaedist import tracking
    from vaedist.checkpoint import load_model
    from vaedist.data import get_spec

    path = tracking.resolve_checkpoint(cfg.model)
    model, ckpt = load_model(path)
    model_bytes = path.read_bytes()
    dataset = _dataset_of(ckpt, path)
    try:
        class_names = list(get_spec(dataset).class_names)
    except (UsageError, KeyError, ValueError):
        class_names = []
    if len(class_names) != model.num_classes:
        class_names = [str(i) for i in range(model.num_classes)]

    if model.conditional:
        labels = cfg.labels if cfg.labels is not None else tuple(range(model.num_classes))
        bad = [k for k in labels if not 0 <= k < model.num_classes]
        if bad:
            raise UsageError(
                f"label {bad[0]} is not a class of the model ({dataset} has classes 0..{model.num_classes - 1})"
            )
        names = tuple(class_names[k] for k in labels)
    else:
        if cfg.labels is not None:
            raise UsageError(
                f"{cfg.model} is an unconditional model ({model.hparams.get('variant')}): it cannot generate given "
                "labels; omit --labels (its rows get label -1)"
            )
        labels, names = (UNCONDITIONAL_LABEL,), ("",)
    counts = _counts(cfg, dataset, labels, model.conditional)
    if sum(counts) > MAX_ROWS:
        raise UsageError(
            f"{sum(counts):,} rows is more than one generation run holds ({MAX_ROWS:,}); split it"
        )

    info = tracking.model_version_info(cfg.model) if cfg.model.startswith("models:/") else {}
    if cfg.model.startswith("runs:/"):
        info = {"run_id": cfg.model[len("runs:/") :].split("/", 1)[0]}
    plan = Plan(
        model_uri=cfg.model,
        model_version=str(info.get("version", "")),
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        dataset=dataset,
        labels=tuple(labels),
        label_names=names,
        counts=counts,
        seed=cfg.seed,
        temperature=float(cfg.temperature),
        shard_rows=cfg.shard_rows,
        image_format=cfg.image_format,
        image_shape=tuple(model.image_shape),
        latent_dim=model.latent_dim,
    )

    fs, root, uri = resolve_out(cfg.out)
    try:
        state = inspect_output(fs, root, uri)
    except OSError as exc:  # an unreachable bucket, missing credentials, a permission error
        first = first_line(exc)
        raise UsageError(f"cannot list --out {uri}: {first}") from None
    if state.foreign:
        more = f" and {len(state.foreign) - 1} more" if len(state.foreign) > 1 else ""
        raise UsageError(
            f"--out {uri} holds files that are not from vaedist generate ({state.foreign[0]}{more}); "
            "use an empty or new folder"
        )
    new = plan.to_dict()
    everything = list(range(plan.num_shards))
    kept: list[int] = []
    if state.manifest is not None:
        old = state.manifest.get("plan") or {}
        if cfg.overwrite:
            action = "overwrite"
        elif old == new:
            absent = [s["file"] for s in state.manifest.get("shards", []) if not PART_RE.fullmatch(s["file"])
                      or int(PART_RE.fullmatch(s["file"]).group(1)) not in state.parts]  # fmt: skip
            if absent:
                raise UsageError(
                    f"--out {uri} is complete but {absent[0]} is missing; pass --overwrite to regenerate it"
                )
            action, everything, kept = "complete", [], everything
        else:
            raise UsageError(
                f"--out {uri} already holds a complete generation run of another plan "
                f"({_first_difference(old, new)}); pass --overwrite to replace it, or choose another --out"
            )
    elif cfg.overwrite and not state.empty:
        action = "overwrite"
    elif state.plan is not None:
        if state.plan != new:
            raise UsageError(
                f"--out {uri} holds an unfinished run of another plan ({_first_difference(state.plan, new)}); "
                "rerun it with the same arguments to finish it, or pass --overwrite to start over"
            )
        extra = sorted(i for i in state.parts if i >= plan.num_shards)
        if extra:
            raise UsageError(
                f"--out {uri} holds {part_name(extra[0])}, which is not in its plan; pass --overwrite"
            )
        action = "resume"
        kept = [i for i in sorted(state.parts) if verify_part(fs, root, plan, i)]
    elif state.parts:
        raise UsageError(
            f"--out {uri} holds part files but no {PLAN_FILE}, so they cannot be verified; "
            "pass --overwrite to start over, or choose another --out"
        )
    else:
        action = "new"
    if action != "complete" and "://" not in cfg.out:
        _check_writable(root)
    todo = sorted(set(everything) - set(kept))
    return Prepared(cfg, plan, model_bytes, info, fs, root, uri, state, action, todo, kept)


def describe(p: Prepared) -> list[str]:
    plan = p.plan
    per = ", ".join(f"{n or '-'}={c:,}" for n, c in zip(plan.label_names, plan.counts, strict=True))
    version = f" version {plan.model_version}" if plan.model_version else ""
    doing = {
        "new": f"new folder: {plan.num_shards} shard(s) to write",
        "resume": f"unfinished: {len(p.kept)} shard(s) verified, {len(p.todo)} to write",
        "overwrite": f"--overwrite: its vaedist files are replaced, {plan.num_shards} shard(s) to write",
        "complete": "complete with the same plan: nothing to do",
    }[p.action]
    return [
        f"plan {plan.hash}: {plan.total:,} rows of {plan.dataset} in {plan.num_shards} shard(s) of <= {plan.shard_rows:,}",
        f"  rows per label  {per}",
        f"  model           {plan.model_uri}{version} (sha256 {plan.model_sha256[:12]})",
        f"  sampling        z ~ N(0, {plan.temperature:g}^2 I), seed {plan.seed}, images {plan.image_format}",
        f"  out             {p.uri} ({doing})",
    ]


# --------------------------------------------------------------------------------------------------
# Resources and the Ray Data pipeline


@dataclass(frozen=True)
class ActorPlan:
    workers: int
    num_cpus: float  # reserved per actor: leaves a CPU for Ray Data's own tasks
    num_gpus: float
    threads: int  # torch threads per actor: the CPUs it stands for

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0


def plan_actors(res: ResourcesConfig, cluster: dict[str, float], node_cpus: float | None = None) -> ActorPlan:
    """Check the request against the cluster now (Ray would wait forever for a missing GPU)."""
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    w = res.workers
    # None: GPUs where present (one per actor if every actor can have one), as in training.
    g = float(res.gpus_per_worker) if res.gpus_per_worker is not None else (1.0 if gpus >= w else 0.0)
    if g > 0 and gpus < g * w:
        raise UsageError(
            f"asked for {w} worker(s) x {g:g} GPU but the Ray cluster has {gpus:g} GPU(s); "
            "use --gpus-per-worker 0 to generate on CPUs"
        )
    if res.cpus_per_worker is not None and res.cpus_per_worker * w > cpus:
        raise UsageError(
            f"asked for {w} worker(s) x {res.cpus_per_worker:g} CPU but the Ray cluster has {cpus:g} CPU(s)"
        )
    if g == 0 and w > cpus:
        raise UsageError(
            f"asked for {w} decoder worker(s) but the Ray cluster has {cpus:g} CPU(s); use --workers {max(1, int(cpus))}"
        )
    if res.cpus_per_worker is not None and node_cpus is not None and res.cpus_per_worker > node_cpus:
        raise UsageError(
            f"asked for {res.cpus_per_worker:g} CPU per worker but the largest Ray node has {node_cpus:g}; "
            "an actor runs on one node: use --cpus-per-worker <= that"
        )
    # An actor lives on one node: by default it takes its share of the cluster, at most one node's CPUs
    # (a larger request could never be placed, and Ray would wait for it forever).
    share = res.cpus_per_worker or min(cpus / w, node_cpus or cpus)
    threads = max(1, int(share))
    headroom = 1.0 if cpus >= 2 else cpus / 2
    num_cpus = round(min(float(share), (cpus - headroom) / w), 3)
    return ActorPlan(w, max(num_cpus, 0.001), g, threads)


def _node_cpus() -> float | None:
    from vaedist.train import node_resources

    sizes = [n.get("CPU", 0.0) for n in node_resources()]
    return max(sizes) if sizes else None


def run_shards(p: Prepared, actors: ActorPlan, delay_s: float = 0.0) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline: shard indices -> ShardWriter actors -> one summary row per finished shard."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # vaedist prints its own progress line per finished shard
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    ds = ray.data.from_items([{"shard": i} for i in p.todo], override_num_blocks=len(p.todo))
    ds = ds.map_batches(
        ShardWriter,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors.workers),
        fn_constructor_kwargs={
            "model": [ray.put(p.model_bytes)],
            "plan": p.plan.to_dict(),
            "out": p.uri,
            "threads": actors.threads,
            "use_gpu": actors.use_gpu,
            "batch_size": p.cfg.batch_size,
            "delay_s": delay_s,
        },
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus or None,
        udf_modifying_row_count=False,
    )
    for row in ds.iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass
class GenerateResult:
    out: str
    plan_hash: str
    status: str  # written | complete (nothing to do) | dry-run
    rows: int
    rows_per_label: dict[str, int]
    shards: int
    shards_written: int = 0
    bytes: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0  # rows written / seconds from the pipeline's start to the last shard
    startup_seconds: float = 0.0  # of those seconds, before the first shard's work began (actor start)
    decoder_busy_fraction: float = 0.0  # decoder seconds / (wall seconds x workers)
    run_id: str | None = None
    manifest: dict[str, Any] | None = None


def run_name(p: Prepared) -> str:
    """Deterministic from the folder and the plan: a resumed run continues the same MLflow run."""
    folder = p.uri.rstrip("/").rsplit("/", 1)[-1] or "out"
    return f"generate-{folder}-{hashlib.sha1(f'{p.uri}|{p.plan.hash}'.encode()).hexdigest()[:8]}"


def _params(p: Prepared) -> dict[str, Any]:
    """The plan and the folder: what the run name is derived from (MLflow params are immutable, so a
    request that gives the same plan another way, --total vs --per-label, goes into tags instead)."""
    return {
        **{f"plan.{k}": v for k, v in p.plan.to_dict().items()},
        "plan.hash": p.plan.hash,
        "generate.out": p.uri,
    }


def _manifest(p: Prepared, shards: dict[int, dict[str, Any]]) -> dict[str, Any]:
    plan = p.plan
    schema = plan.schema()
    return {
        "format": MANIFEST_FORMAT,
        "vaedist_version": __version__,
        "plan_hash": plan.hash,
        "model": {
            "uri": plan.model_uri,
            "version": plan.model_version,
            "name": p.model_info.get("name", ""),
            "run_id": p.model_info.get("run_id", ""),
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
        "request": {
            "labels": None if p.cfg.labels is None else list(p.cfg.labels),
            "per_label": p.cfg.per_label,
            "total": p.cfg.total,
            "class_balance": p.cfg.class_balance,
        },
        "plan": plan.to_dict(),
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "schema_metadata": {k.decode(): v.decode() for k, v in schema.metadata.items()},
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


def sample_grid(fs, root: str, plan: Plan, per_label: int = GRID_PER_LABEL) -> np.ndarray:
    """Generated samples per label, read back from the part files: RGB uint8 (figures.labelled_rows)."""
    from vaedist.figures import labelled_rows

    h, w, c = plan.image_shape
    picked: dict[int, list[np.ndarray]] = {k: [] for k in plan.labels}
    for shard in range(plan.num_shards):
        table = pq.read_table(_join(root, part_name(shard)), filesystem=fs, columns=["label", "image"])
        images, labels = read_images(table), table["label"].to_numpy()
        for k in plan.labels:
            need = per_label - len(picked[k])
            if need > 0:
                picked[k].extend(images[labels == k][:need])
        if all(len(picked[k]) >= min(per_label, c_) for k, c_ in zip(plan.labels, plan.counts, strict=True)):
            break
    rows = [k for k, c_ in zip(plan.labels, plan.counts, strict=True) if c_ > 0]
    grid = np.zeros((len(rows), per_label, h, w, c), dtype=np.uint8)
    for r, k in enumerate(rows):
        if picked[k]:
            grid[r, : len(picked[k])] = np.stack(picked[k])
    names = [plan.label_names[plan.labels.index(k)] or "samples" for k in rows]
    return labelled_rows(grid, names, title=f"generated {plan.dataset} (plan {plan.hash})")


def _clear(fs, root: str, state: OutputState) -> None:
    """--overwrite: remove this folder's vaedist files only, the manifest first (so a kill halfway leaves
    an unfinished folder, never a 'complete' one with parts missing)."""
    names = ([MANIFEST] if state.manifest is not None else []) + (
        [PLAN_FILE] if state.plan is not None else []
    )
    names += [part_name(i) for i in sorted(state.parts)] + state.tmp
    for name in names:
        fs.delete_file(_join(root, name))


def run_generate(
    cfg: GenerateConfig,
    resources: ResourcesConfig | None = None,
    echo: Callable[[str], None] = print,
    dry_run: bool = False,
) -> GenerateResult:
    """Generate ``cfg``'s synthetic dataset on Ray (local, or ``resources.address``), record it in MLflow.

    Every check runs before anything is written (UsageError, exit 2); a folder left unfinished by a
    crash is finished by the same call; a complete one with the same plan is left alone.
    """
    from vaedist import tracking

    resources = resources or ResourcesConfig()
    p = prepare(cfg)
    cfg = p.cfg
    plan = p.plan
    per_label = {n or "-": c for n, c in zip(plan.label_names, plan.counts, strict=True)}
    for line in describe(p):
        echo(line)
    result = GenerateResult(p.uri, plan.hash, "dry-run", plan.total, per_label, plan.num_shards)
    if dry_run:
        return result
    if p.action == "complete":
        result.status, result.manifest = "complete", p.state.manifest
        result.bytes = int(p.state.manifest.get("bytes", 0))
        echo(f"done: {p.uri} is already complete with this plan (pass --overwrite to generate it again)")
        return result

    from vaedist.train import connect_ray

    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    connect_ray(resources.address)
    import ray

    actors = plan_actors(resources, ray.cluster_resources(), _node_cpus())
    run_id = tracking.find_or_create_run(plan.dataset, run_name(p), _params(p), kind="generate")
    logger = tracking.RunLogger(run_id, uri)
    logger.set_tags(
        {
            "vaedist.model_uri": plan.model_uri,
            "vaedist.model_version": plan.model_version,
            "vaedist.model_run_id": p.model_info.get("run_id", ""),
            "vaedist.model_sha256": plan.model_sha256,
            "vaedist.output": p.uri,
            "vaedist.plan_hash": plan.hash,
            "generate.labels": "all" if cfg.labels is None else ",".join(map(str, cfg.labels)),
            "generate.per_label": cfg.per_label,
            "generate.total": cfg.total,
            "generate.class_balance": cfg.class_balance,
        }
    )
    echo(
        f"generating with {actors.workers} worker(s) x {actors.threads} thread(s)"
        f"{f' x {actors.num_gpus:g} GPU' if actors.use_gpu else ''}; MLflow run {run_id} in {tracking.shown_uri(uri)}"
    )
    try:
        if p.action == "overwrite":
            _clear(p.fs, p.root, p.state)
        else:
            for name in p.state.tmp:  # left by a killed attempt; only whole files are ever renamed in
                p.fs.delete_file(_join(p.root, name))
        p.fs.create_dir(p.root, recursive=True)
        if p.action != "resume":
            write_atomic(p.fs, p.root, PLAN_FILE, json.dumps(plan.to_dict(), indent=1).encode())

        shards: dict[int, dict[str, Any]] = {}
        for i in p.kept:
            digest, size = sha256_file(p.fs, _join(p.root, part_name(i)))
            shards[i] = {"bytes": size, "sha256": digest}
        total_todo, done_rows, last_echo, startup, decoding = p.rows_todo, 0, 0.0, 0.0, 0.0
        t0 = time.perf_counter()
        if p.todo:
            delay = float(os.environ.get(SHARD_DELAY_ENV) or 0.0)
            try:
                for row in run_shards(p, actors, delay):
                    shards[int(row["shard"])] = row
                    done_rows += int(row["rows"])
                    decoding += float(row["decode_seconds"])
                    now = time.perf_counter()
                    if done_rows == int(
                        row["rows"]
                    ):  # the first shard: what came before its work is start-up
                        startup = max(0.0, now - t0 - float(row["seconds"]))
                    if now - last_echo >= 1.0 or done_rows == total_todo:
                        last_echo = now
                        echo(
                            f"  {done_rows:,}/{total_todo:,} rows ({100 * done_rows / total_todo:.0f}%), "
                            f"{len(shards)}/{plan.num_shards} shards, {done_rows / (now - t0):,.0f} images/s"
                        )
            except Exception as exc:  # Ray wraps the actor's error; its first line says what happened
                first = first_line(exc)
                raise VaedistError(f"generation into {p.uri} failed: {first} (rerun to resume)") from None
        seconds = time.perf_counter() - t0
        missing = [i for i in range(plan.num_shards) if i not in shards]
        if missing:
            raise VaedistError(f"generation into {p.uri} lost shard(s) {missing[:5]} (rerun to resume)")
        manifest = _manifest(p, shards)
        write_atomic(p.fs, p.root, MANIFEST, json.dumps(manifest, indent=1).encode())

        rate = done_rows / seconds if seconds > 0 else 0.0
        metrics = {
            "rows": plan.total,
            "rows_written": done_rows,
            "shards": plan.num_shards,
            "shards_written": len(p.todo),
            "seconds": seconds,
            "images_per_s": rate,
            "startup_s": startup,  # actor start, model load: ~4 s on 2 CPUs, paid once per run
            # Share of the wall time the decoders were busy: the end-to-end / decoder-only ratio measured
            # within the run itself, so other load on the machine cancels out.
            "decoder_busy_fraction": decoding / (seconds * actors.workers) if seconds > 0 else 0.0,
            "bytes_per_image": manifest["bytes"] / plan.total,
            "bytes_per_pixel": manifest["bytes"] / plan.total / math.prod(plan.image_shape),
        }
        if plan.conditional:
            metrics.update({f"rows_label_{k}": c for k, c in zip(plan.labels, plan.counts, strict=True)})
        logger.log_metrics(metrics, step=0)
        logger.log_image("generated_samples", sample_grid(p.fs, p.root, plan), step=0)
        logger.log_dict(manifest, "generate/_manifest.json")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    echo(
        f"done: {plan.total:,} rows in {plan.num_shards} shard(s), {manifest['bytes'] / plan.total:,.0f} bytes/image, "
        f"{rate:,.0f} images/s; manifest {p.uri}/{MANIFEST}"
    )
    return GenerateResult(
        p.uri, plan.hash, "written", plan.total, per_label, plan.num_shards, len(p.todo),
        manifest["bytes"], seconds, rate, startup, metrics["decoder_busy_fraction"], run_id, manifest,
    )  # fmt: skip
