"""The generated dataset's format: the one definition of a generated folder's files, columns and metadata,
and its writer. :mod:`.reader` reads it back through the names defined here.

    <folder>/_plan.json                          the plan, written first (an unfinished folder says what it will hold)
    <folder>/data/train-00000-of-00004.parquet   one shard each, written whole under a hidden temporary name, then renamed
    <folder>/README.md                           the dataset card (:mod:`.card`), written before the manifest
    <folder>/_manifest.json                      written last: a folder without it is unfinished
    <folder>/_evaluations.json                   figures of ``vaedist evaluate`` runs on the folder (shown on the card)

Why these names: it is the Hugging Face Hub's own repository layout (the card at the root, the data files
in ``data/`` named ``{split}-NNNNN-of-NNNNN``), so the folder uploaded as it is makes a dataset repository,
``datasets.load_dataset(FOLDER)`` follows the card's ``configs``, and ``data/`` holds nothing but shards:
``pd.read_parquet(FOLDER + "/data")``, ``pq.read_table`` and ``load_dataset("parquet", data_dir=...)`` read
it with no options. Temporary files start with ``.``, which every reader skips. Earlier folders keep their
shards at the root, named ``train-NNNNN-of-NNNNN.parquet`` or ``part-NNNNN.parquet``: :mod:`.reader` still
reads them, and the manifest says where each shard is.

Columns, in this order: ``sample_id`` int64 (0..N-1 over the folder), ``label`` int64 (-1 for every row of
an unconditional model), ``label_name`` string ("" there), ``image``, ``z`` float32[latent]. ``image`` is,
with ``image_format="png"`` (the default), the Hugging Face ``Image`` struct ``{bytes: PNG, path: null}``
and the schema carries the ``huggingface`` metadata block declaring the features (``Image``, ``ClassLabel``
with the model's class names), so ``datasets`` gives PIL images and a ``ClassLabel``; with ``"raw"``, a
uint8 (H, W, C) Arrow fixed-shape tensor (faster to write and read; pyarrow, Ray Data and vaedist read it,
``datasets`` cannot). Every shard's schema also carries ``vaedist.``-prefixed metadata (model, dataset,
seed, plan hash, ...).

Pure pyarrow/numpy, no Ray: the Ray writer (:mod:`.writer`), evaluation, tests and users' own code write
through here. :class:`Plan` is defined here, at the bottom of ``generate/``, because every file's bytes
follow from it; :mod:`.plan` decides what goes into one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import vaedist
from vaedist.config import IMAGE_FORMATS
from vaedist.files import join, resolve_folder, write_atomic
from vaedist.generate.png import encode_pngs

MANIFEST = "_manifest.json"
PLAN_FILE = "_plan.json"
CARD = "README.md"
EVALUATIONS = "_evaluations.json"
MANIFEST_FORMAT = "vaedist-generated/1"
SPLIT = "train"  # the one split a generated folder holds, as datasets names it
DATA_DIR = "data"  # the shards' folder, as on the Hub
SHARD_GLOB = f"{DATA_DIR}/{SPLIT}-*.parquet"  # the card's data_files pattern
# a shard file's base name, in data/ or (earlier folders) at the root
PART_RE = re.compile(r"(?:train-(?P<shard>\d{5,})-of-(?P<of>\d{5,})|part-(?P<legacy>\d{5,}))\.parquet")
# Temporary names: a file being written, or the writability probe; a killed run leaves them.
TMP_RE = re.compile(
    r"\.(?:train-\d{5,}-of-\d{5,}\.parquet|part-\d{5,}\.parquet|_manifest\.json|_plan\.json|README\.md"
    r"|_evaluations\.json|write-test)\.\w+\.tmp"
)
META = "vaedist."  # prefix of vaedist's Parquet key-value metadata
HF_META = b"huggingface"  # the key datasets reads its features from
COLUMNS = ("sample_id", "label", "label_name", "image", "z")
PNG_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets' Image
UNCONDITIONAL_LABEL = -1  # the label of every row from an unconditional model (label_name "")
# re-exported: the format's vocabulary, its PNG encoder and file helpers
__all__ = ["IMAGE_FORMATS", "encode_pngs", "join", "resolve_folder", "write_atomic"]


def part_name(shard: int, num_shards: int) -> str:
    """A shard's path inside the folder: ``data/train-00003-of-00010.parquet``."""
    return f"{DATA_DIR}/{SPLIT}-{shard:05d}-of-{num_shards:05d}.parquet"


def shard_of(name: str) -> int | None:
    """The shard index a shard file's path inside the folder holds (``data/train-...``, or an earlier
    folder's ``train-...`` / ``part-...`` at the root), None for any other name."""
    m = PART_RE.fullmatch(name.removeprefix(f"{DATA_DIR}/"))
    return None if m is None else int(m.group("shard") or m.group("legacy"))


def shape_text(shape) -> str:
    """(28, 28, 1) -> '28x28x1', as messages show image shapes."""
    return "x".join(str(int(d)) for d in shape)


# --------------------------------------------------------------------------------------------------
# The plan: what decides every byte of a folder


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
    image_format: str  # one of IMAGE_FORMATS
    image_shape: tuple[int, int, int]  # (H, W, C)
    latent_dim: int
    class_names: tuple[str, ...] = ()  # every class of the model by index (the ClassLabel); () unconditional

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}  # plans before 0.5: no class_names
        for key in ("labels", "label_names", "counts", "image_shape", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

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

    def shard_labels(self, shard: int) -> np.ndarray | None:
        """The class index of each of a shard's rows, int64 (rows,), as the decoder takes them; None for
        an unconditional model."""
        if not self.conditional:
            return None
        return np.asarray(self.labels, dtype=np.int64)[self.label_index(*self.shard_range(shard))]


# --------------------------------------------------------------------------------------------------
# Schema: columns, vaedist's metadata, the huggingface features


def class_names(plan: Plan) -> list[str]:
    """Every class of the model by index (the ClassLabel's names): the plan's, else its labels' names."""
    names = list(getattr(plan, "class_names", ()) or ())
    if names:
        return names
    known = dict(zip(plan.labels, plan.label_names, strict=True))
    return [known.get(i, str(i)) for i in range(max(plan.labels) + 1)]


def hf_features(plan: Plan) -> dict[str, Any]:
    """The features as ``datasets`` serialises them into the schema (``Features.to_dict()``, datasets >= 4)."""
    label = (
        {"names": class_names(plan), "_type": "ClassLabel"}
        if plan.conditional
        else {"dtype": "int64", "_type": "Value"}  # every row -1: no classes to name
    )
    return {
        "sample_id": {"dtype": "int64", "_type": "Value"},
        "label": label,
        "label_name": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "z": {"feature": {"dtype": "float32", "_type": "Value"}, "length": plan.latent_dim, "_type": "List"},
    }


def schema(plan: Plan) -> pa.Schema:
    """The columns, and the key-value metadata every shard carries."""
    h, w, c = plan.image_shape
    png = plan.image_format == "png"
    image = PNG_STRUCT if png else pa.fixed_shape_tensor(pa.uint8(), (h, w, c))
    metadata = {
        "model_uri": plan.model_uri,
        "model_version": plan.model_version,
        "model_sha256": plan.model_sha256,
        "dataset": plan.dataset,
        "seed": str(plan.seed),
        "temperature": repr(float(plan.temperature)),
        "version": vaedist.__version__,
        "image_format": plan.image_format,
        "image_shape": ",".join(map(str, plan.image_shape)),
        "plan_hash": plan.hash,
    }
    metadata = {(META + k).encode(): v.encode() for k, v in metadata.items()}
    if png:  # datasets has no feature for an Arrow tensor, so raw declares none
        metadata[HF_META] = json.dumps({"info": {"features": hf_features(plan)}}).encode()
    # nullable, though no value is ever null: datasets takes a declared feature only where its Arrow field
    # equals the column's, nullability included (datasets.Features.from_arrow_schema)
    return pa.schema(
        [
            pa.field("sample_id", pa.int64()),
            pa.field("label", pa.int64()),
            pa.field("label_name", pa.string()),
            pa.field("image", image),
            pa.field("z", pa.list_(pa.float32(), plan.latent_dim)),
        ],
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------------
# Writing: shard table, Parquet bytes, atomic files, manifest


def image_column(images: np.ndarray, image_format: str, typ: pa.DataType, threads: int = 1) -> pa.Array:
    """The image column of uint8 (rows, H, W, C) images in ``image_format``, of schema type ``typ``."""
    if image_format == "raw":
        storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), images[0].size)
        return pa.ExtensionArray.from_storage(typ, storage)
    pngs = pa.array(encode_pngs(images, threads), pa.binary())
    return pa.StructArray.from_arrays([pngs, pa.nulls(len(pngs), pa.string())], fields=list(PNG_STRUCT))


def shard_table(plan: Plan, shard: int, images: np.ndarray, z: np.ndarray, threads: int = 1) -> pa.Table:
    """One shard's rows: images uint8 (rows, H, W, C) and z float32 (rows, L) of its sample ids, in order."""
    start, rows = plan.shard_range(shard)
    idx = plan.label_index(start, rows)  # (rows,) positions in plan.labels
    sch = schema(plan)
    columns = [
        pa.array(np.arange(start, start + rows, dtype=np.int64)),
        pa.array(np.asarray(plan.labels, dtype=np.int64)[idx]),
        pa.array(np.asarray(plan.label_names, dtype=object)[idx], pa.string()),
        image_column(images, plan.image_format, sch.field("image").type, threads),
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
    PNG bytes are already deflated: zstd over them gains little, but costs little too.
    """
    encodings = {"z.list.element": "BYTE_STREAM_SPLIT"}
    if isinstance(table.schema.field("image").type, pa.FixedShapeTensorType):
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


def write_part(
    fs, root: str, plan: Plan, shard: int, images: np.ndarray, z: np.ndarray, threads: int = 1
) -> dict:
    """Write one shard's file (rows as in :func:`shard_table`): {"bytes", "sha256"}."""
    data = parquet_bytes(shard_table(plan, shard, images, z, threads))
    write_atomic(fs, root, part_name(shard, plan.num_shards), data)
    return {"bytes": data.size, "sha256": hashlib.sha256(memoryview(data)).hexdigest()}


def plan_json(plan: Plan) -> bytes:
    return json.dumps(plan.to_dict(), indent=1).encode()


def build_manifest(
    plan: Plan, shards: dict[int, dict[str, Any]], model_info: dict[str, str], request: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a complete folder: ``shards`` maps every shard to its {"bytes", "sha256"};
    ``model_info`` holds the registered name and run id where known (and the training data's
    ``dataset_fingerprint``), ``request`` what the user asked."""
    sch = schema(plan)
    return {
        "format": MANIFEST_FORMAT,
        "vaedist_version": vaedist.__version__,
        "plan_hash": plan.hash,
        "model": {
            "uri": plan.model_uri,
            "version": plan.model_version,
            "name": model_info.get("name", ""),
            "run_id": model_info.get("run_id", ""),
            "sha256": plan.model_sha256,
        },
        "dataset": plan.dataset,
        "dataset_fingerprint": model_info.get("dataset_fingerprint", ""),
        "seed": plan.seed,
        "temperature": plan.temperature,
        "image_format": plan.image_format,
        "image_shape": list(plan.image_shape),
        "latent_dim": plan.latent_dim,
        "class_names": class_names(plan) if plan.conditional else [],
        "rows": plan.total,
        "rows_per_label": [
            {"label": k, "name": n, "rows": c}
            for k, n, c in zip(plan.labels, plan.label_names, plan.counts, strict=True)
        ],
        "bytes": sum(s["bytes"] for s in shards.values()),
        "request": request,
        "plan": plan.to_dict(),
        "schema": [{"name": f.name, "type": str(f.type)} for f in sch],
        "schema_metadata": {
            k.decode(): v.decode() for k, v in sch.metadata.items() if k.startswith(META.encode())
        },
        "shards": [
            {
                "file": part_name(i, plan.num_shards),
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


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def dataset_digest(manifest_file: bytes) -> str:
    """The generated set's identity (MLflow dataset digest, evaluation run names): the manifest file's
    SHA-1, which covers every shard's SHA-256."""
    return hashlib.sha1(manifest_file).hexdigest()


def dataset_name(uri: str) -> str:
    """The generated set's MLflow dataset name: ``generated/<folder name>``."""
    return "generated/" + uri.rstrip("/").rsplit("/", 1)[-1]


def write_manifest(fs, root: str, manifest: dict[str, Any]) -> None:
    write_atomic(fs, root, MANIFEST, manifest_bytes(manifest))


def part_matches(fs, root: str, plan: Plan, shard: int) -> bool:
    """Whether a shard file's footer reads back with the plan's rows, written for the plan's hash."""
    try:
        meta = pq.read_metadata(join(root, part_name(shard, plan.num_shards)), filesystem=fs)
        kv = meta.metadata or {}
        rows = plan.shard_range(shard)[1]
        return meta.num_rows == rows and kv.get(f"{META}plan_hash".encode()) == plan.hash.encode()
    except (OSError, pa.ArrowException):
        return False
