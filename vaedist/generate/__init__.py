"""Batch generation: a trained (C)VAE -> one folder of labelled Parquet shards, on Ray Data.

    plan (shard i -> sample ids, labels, seed) --map_batches(ShardWriter actors)--> part-NNNNN.parquet
    _plan.json (written first)                                                     _manifest.json (last)

Four rooms:
- :mod:`.plan`: what to generate (the plan, labels, rows per label, latents) and what to do with the
  output folder (:func:`~.plan.decide_action` -> :class:`~.plan.FolderAction`). Pure.
- :mod:`.format`: the generated Parquet itself: columns, metadata, file names, manifest, PNG, the shard
  table, and the readers (:func:`~.format.read_images`, :func:`~.format.read_generated`).
- :mod:`.writer`: the Ray Data actor pool that renders and writes shards, and the output folder's files.
- :mod:`.driver`: ``run_generate``: prepare (every check, nothing written), write, record in MLflow.

Determinism: a sample is a pure function of (model, plan, sample_id); images are byte-identical for the
same model, plan and decoder batch size on the same kind of hardware (CPU and GPU kernels may round the
last float bit differently). Resumability: a folder without ``_manifest.json`` is unfinished and the same
command finishes it, rewriting only the shards that are missing or fail verification (footer readable,
row count and plan hash right); a different plan, recorded in ``_plan.json``, is refused rather than
mixed in. A complete folder is never rewritten without ``overwrite``. One generation per folder at a time.

Everything below is importable from ``vaedist.generate`` as before the split.
"""

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
    COLUMNS,
    IMAGE_FORMATS,
    MANIFEST,
    MANIFEST_FORMAT,
    META,
    PART_RE,
    PLAN_FILE,
    TMP_RE,
    UNCONDITIONAL_LABEL,
    GeneratedSet,
    build_manifest,
    decode_png,
    encode_pngs,
    parquet_bytes,
    part_name,
    read_generated,
    read_images,
    schema,
    shard_table,
    write_atomic,
    write_folder,
    write_part,
)
from vaedist.generate.plan import (
    MAX_ROWS,
    FolderAction,
    ModelFacts,
    OutputState,
    Plan,
    configs_from_spec,
    decide_action,
    label_counts,
    latents,
    parse_labels,
    plan_labels,
    split_rows,
)
from vaedist.generate.writer import (
    SHARD_DELAY_ENV,
    ShardWriter,
    check_writable,
    decode_images,
    inspect_output,
    resolve_out,
    run_shards,
    sha256_file,
    verify_part,
    write_shard,
)

__all__ = [
    "COLUMNS", "GRID_PER_LABEL", "IMAGE_FORMATS", "MANIFEST", "MANIFEST_FORMAT", "MAX_ROWS", "META", "PART_RE",
    "PLAN_FILE", "SHARD_DELAY_ENV", "TMP_RE", "UNCONDITIONAL_LABEL",
    "FolderAction", "GenerateResult", "GeneratedSet", "ModelFacts", "OutputState", "Plan", "Prepared", "ShardWriter",
    "build_manifest", "build_plan", "check_writable", "configs_from_spec", "decide_action", "decode_images",
    "decode_png", "describe", "encode_pngs", "inspect_output", "label_counts", "latents", "parquet_bytes",
    "parse_labels", "part_name", "plan_labels", "prepare", "read_generated", "read_images",
    "resolve_out", "run_generate", "run_name", "run_shards", "sample_grid", "schema", "sha256_file",
    "shard_table", "split_rows", "verify_part", "write_atomic", "write_folder", "write_part", "write_shard",
]  # fmt: skip
