"""Batch generation: a trained (C)VAE -> one folder of labelled Parquet shards, on Ray Data.

    plan (shard i -> sample ids, labels, seed) --map_batches(ShardWriter actors)--> data/train-NNNNN-of-NNNNN.parquet
    _plan.json (written first)                                         README.md (the dataset card), _manifest.json (last)

The rooms, bottom first (each imports only those above it in this list):
- :mod:`.png` encodes the images; :mod:`.format` is the one definition of the generated folder: the
  :class:`~.format.Plan` (everything that decides its bytes), file names, columns, metadata (vaedist's and
  the ``huggingface`` features), the shard table, the manifest.
- :mod:`.card` writes the Hub dataset card (``README.md``), keeps evaluation figures on it and makes the
  folder's last two writes; :mod:`.reader` reads it all back (:func:`~.reader.read_images`,
  :func:`~.reader.read_generated`), in this layout and the earlier ones.
- :mod:`.plan`: what to generate (labels, rows per label) and what to do with the output folder
  (:func:`~.plan.decide_action`, :func:`~.plan.decide_repair` -> :class:`~.plan.FolderAction`). Pure.
- :mod:`.writer`: the Ray Data actor pool that renders shards with the one sampler
  (:mod:`vaedist.sampling`) and writes them, and the output folder's files.
- :mod:`.driver`: ``run_generate``: prepare from the checkpoint's header (every check, nothing written),
  write, record in MLflow.

Determinism: a sample is a pure function of (model, plan, sample_id); images are byte-identical for the
same model, plan and decoder batch size on the same kind of hardware (CPU and GPU kernels may round the
last float bit differently). Resumability: a folder without ``_manifest.json`` is unfinished and the same
command finishes it, rewriting only the shards that are missing or fail verification (footer readable,
row count and plan hash right); a different plan, recorded in ``_plan.json``, is refused rather than
mixed in. The same command on a complete folder verifies every shard against the SHA-256 its manifest
records and rewrites only those that differ or are missing (a repair), naming each; a complete folder is
otherwise never rewritten without ``overwrite``. One generation per folder at a time.

Everything below is importable from ``vaedist.generate`` as before the split.
"""

from vaedist.generate.card import finish_folder, record_evaluation
from vaedist.generate.driver import (
    GRID_PER_LABEL,
    GenerateResult,
    Prepared,
    build_plan,
    describe,
    prepare,
    run_generate,
    run_name,
    sample_grid,
)
from vaedist.generate.format import (
    CARD,
    COLUMNS,
    DATA_DIR,
    IMAGE_FORMATS,
    MANIFEST,
    MANIFEST_FORMAT,
    META,
    PART_RE,
    PLAN_FILE,
    SHARD_GLOB,
    TMP_RE,
    UNCONDITIONAL_LABEL,
    Plan,
    build_manifest,
    dataset_digest,
    parquet_bytes,
    part_name,
    schema,
    shard_of,
    shard_table,
    write_atomic,
    write_part,
)
from vaedist.generate.plan import (
    MAX_ROWS,
    FolderAction,
    ModelFacts,
    OutputState,
    configs_from_spec,
    damaged_shards,
    decide_action,
    decide_repair,
    label_counts,
    parse_labels,
    plan_labels,
    split_rows,
)
from vaedist.generate.png import decode_png, encode_pngs
from vaedist.generate.reader import GeneratedSet, read_generated, read_images
from vaedist.generate.writer import (
    SHARD_DELAY_ENV,
    ShardWriter,
    check_writable,
    inspect_output,
    resolve_out,
    run_shards,
    sha256_file,
    shard_digests,
    verify_part,
    write_folder,
    write_shard,
)
from vaedist.sampling import decode as decode_images
from vaedist.sampling import latents

__all__ = [
    "CARD", "COLUMNS", "DATA_DIR", "GRID_PER_LABEL", "IMAGE_FORMATS", "MANIFEST", "MANIFEST_FORMAT", "MAX_ROWS", "META", "PART_RE",
    "PLAN_FILE", "SHARD_DELAY_ENV", "SHARD_GLOB", "TMP_RE", "UNCONDITIONAL_LABEL",
    "FolderAction", "GenerateResult", "GeneratedSet", "ModelFacts", "OutputState", "Plan", "Prepared", "ShardWriter",
    "build_manifest", "build_plan", "check_writable", "configs_from_spec", "damaged_shards", "dataset_digest", "decide_action", "decide_repair", "decode_images",
    "decode_png", "describe", "encode_pngs", "finish_folder", "inspect_output", "label_counts", "latents", "parquet_bytes",
    "parse_labels", "part_name", "plan_labels", "prepare", "read_generated", "read_images", "record_evaluation",
    "resolve_out", "run_generate", "run_name", "run_shards", "sample_grid", "schema", "sha256_file",
    "shard_digests", "shard_of", "shard_table", "split_rows", "verify_part", "write_atomic", "write_folder", "write_part", "write_shard",
]  # fmt: skip
