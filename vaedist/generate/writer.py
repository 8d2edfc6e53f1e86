"""The writer: a Ray Data actor pool renders whole shards into the output folder; the folder's state.

    shard indices --map_batches(ShardWriter actors)--> train-NNNNN-of-NNNNN.parquet (+ a summary row per shard)

The decoder dominates, so each actor loads the model once and writes whole shards itself with pyarrow
(Ray Data's ``write_parquet`` names files with a random id per write: a rerun would duplicate rows); only
a small summary row per shard flows back through Ray Data. Each shard is written to a hidden temporary
name and renamed when complete (:func:`vaedist.generate.format.write_atomic`), so a part file is either
whole or absent, and a rerun resumes by writing only the shards that are missing or fail verification.
Actor sizing is :func:`vaedist.cluster.plan_actors`'s: actors leave a CPU to Ray Data's own tasks (actors
holding every CPU of a 2-CPU node hang the pipeline without an error), while a CPU actor renders as many
shards at once as the CPUs it stands for, each on one torch thread (Ray Data's threaded actor calls: the
model is only read, and torch releases the GIL inside its ops).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vaedist.errors import UsageError, first_line
from vaedist.generate.card import finish_folder
from vaedist.generate.format import (
    CARD,
    DATA_DIR,
    EVALUATIONS,
    MANIFEST,
    PLAN_FILE,
    TMP_RE,
    Plan,
    build_manifest,
    join,
    part_matches,
    part_name,
    plan_json,
    resolve_folder,
    shard_of,
    write_atomic,
    write_part,
)
from vaedist.generate.plan import FolderAction, OutputState
from vaedist.sampling import decode, latents

# Seconds each actor sleeps after writing a shard, read by the actor itself: the kill-and-resume test
# sets it so that a run is still going when it is killed. Unset in production.
SHARD_DELAY_ENV = "VAEDIST_GENERATE_SHARD_DELAY_S"


def resolve_out(out: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root inside it, canonical URI) of an output folder or ``s3://...`` prefix."""
    try:
        return resolve_folder(out)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UsageError(f"--out {out}: {first_line(exc)}") from None


# --------------------------------------------------------------------------------------------------
# Rendering a shard with the one sampler (vaedist.sampling): the actors, the benchmark and tests call these


def write_shard(
    model, plan: Plan, shard: int, fs, root: str, batch_size: int, device="cpu", threads=1
) -> dict:
    """Render shard ``shard`` and write its file; returns its summary (rows, bytes, sha256, timing)."""
    started = time.time()  # wall clock: the driver tells start-up from work by it (driver._write_shards)
    start, rows = plan.shard_range(shard)
    z = latents(plan.seed, start, rows, plan.latent_dim, plan.temperature)  # (rows, L)
    t0 = time.perf_counter()
    images = decode(model, z, plan.shard_labels(shard), batch_size, device)  # (rows, H, W, C)
    decode_seconds = time.perf_counter() - t0
    written = write_part(fs, root, plan, shard, images, z, threads)
    return {
        "shard": shard,
        "rows": rows,
        "bytes": written["bytes"],
        "sha256": written["sha256"],
        "decode_seconds": decode_seconds,
        "started_unix_s": started,
    }


class ShardWriter:
    """A Ray Data actor: loads the model once, then renders and writes whole shards (one per input row).

    Returns one summary row per shard; the images never travel through Ray's object store.
    """

    def __init__(self, model: bytes | list, plan: dict[str, Any], out: str, threads: int, use_gpu: bool,
                 batch_size: int):  # fmt: skip
        from vaedist.checkpoint import load_worker_model

        if isinstance(model, list):
            # [ObjectRef]: a ref inside a list travels as a small argument (Ray warns about large ones).
            import ray

            model = ray.get(model[0])
        self.model, self.device = load_worker_model(model, threads, use_gpu)
        self.plan = Plan.from_dict(plan)
        self.fs, self.root, _ = resolve_out(out)
        self.threads, self.batch_size = threads, batch_size
        self.delay_s = float(os.environ.get(SHARD_DELAY_ENV) or 0.0)

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


def run_shards(
    plan: Plan, todo: list[int], out: str, model_bytes: bytes, actors, batch_size: int
) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline: shard indices -> ShardWriter actors -> one summary row per finished shard.

    ``actors``: a :class:`vaedist.cluster.ActorPlan` (workers, CPUs and GPUs each, shards at once, torch
    threads of each, whether Ray Data restarts a lost actor).
    """
    import ray

    writer_kwargs = {
        "model": [ray.put(model_bytes)],
        "plan": plan.to_dict(),
        "out": out,
        "threads": actors.threads,
        "use_gpu": actors.use_gpu,
        "batch_size": batch_size,
    }
    for row in shard_pipeline(todo, actors, ShardWriter, writer_kwargs).iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def shard_pipeline(todo: list[int], actors, writer: type, writer_kwargs: dict[str, Any]):
    """The lazy Ray Data dataset behind :func:`run_shards`: one block per shard index, mapped by an actor
    pool of ``writer`` (a callable class: ``{"shard": (1,) int}`` batch -> one summary row) as ``actors``
    plans it, with vaedist's console settings. ``benchmarks/generate_throughput.py`` runs it with a
    do-nothing writer to measure Ray Data's own floor."""
    import ray

    from vaedist import console

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # vaedist prints its own progress line per finished shard
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    console.quiet_ray_data_console()
    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    # Ray Data 2.60 takes max_restarts only through its **ray_remote_args, deprecated (to be removed in
    # Ray 2.64, which constraints.txt keeps out) with no named replacement yet: its warning is held back.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            writer,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=actors.workers,
                max_concurrent_calls_per_actor=actors.calls,
                enable_true_multi_threading=actors.calls > 1,
            ),
            fn_constructor_kwargs=writer_kwargs,
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus or None,
            udf_modifying_row_count=False,
            **({} if actors.restarts else {"max_restarts": 0}),
        )


# --------------------------------------------------------------------------------------------------
# The output folder: read its state, check it can be written, prepare it, verify kept shards


def _read_json(fs, path: str, uri: str) -> dict[str, Any]:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{uri}/{path.rsplit('/', 1)[-1]} is unreadable ({exc}); pass --overwrite to start over"
        ) from None


def _sort_entry(state: OutputState, fs, entry, rel: str, uri: str) -> None:
    """File ``rel`` (its path inside the folder) into ``state`` by kind."""
    base, is_file = entry.base_name, entry.type == pafs.FileType.File
    in_data = rel.startswith(f"{DATA_DIR}/")
    if is_file and (i := shard_of(rel)) is not None and i not in state.parts:
        state.parts[i] = rel
    elif is_file and TMP_RE.fullmatch(base):
        state.tmp.append(rel)
    elif is_file and not in_data and base == MANIFEST:
        state.manifest = _read_json(fs, entry.path, uri)
    elif is_file and not in_data and base == PLAN_FILE:
        state.plan = _read_json(fs, entry.path, uri)
    elif is_file and not in_data and base in (CARD, EVALUATIONS):
        state.extras.append(rel)
    else:
        state.foreign.append(rel + ("/" if entry.type == pafs.FileType.Directory else ""))


def inspect_output(fs: pafs.FileSystem, root: str, uri: str) -> OutputState:
    """The files of an output folder and of its ``data/``, sorted by kind (an absent folder is an empty
    state)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return OutputState()
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"--out {uri} is a file, not a folder")
    state = OutputState()
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        if entry.base_name == DATA_DIR and entry.type == pafs.FileType.Directory:
            for inner in fs.get_file_info(pafs.FileSelector(entry.path)):
                _sort_entry(state, fs, inner, f"{DATA_DIR}/{inner.base_name}", uri)
        else:
            _sort_entry(state, fs, entry, entry.base_name, uri)
    state.foreign.sort()
    return state


def check_writable(root: str) -> None:
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


def verify_part(fs, root: str, plan: Plan, shard: int) -> bool:
    """A part file from an earlier attempt is kept if its footer reads back with the right rows and plan."""
    return part_matches(fs, root, plan, shard)


def _clear(fs, root: str, state: OutputState) -> None:
    """--overwrite: remove this folder's vaedist files only, the manifest first (so a kill halfway leaves
    an unfinished folder, never a 'complete' one with parts missing)."""
    names = ([MANIFEST] if state.manifest is not None else []) + (
        [PLAN_FILE] if state.plan is not None else []
    )
    names += [state.parts[i] for i in sorted(state.parts)] + state.extras + state.tmp
    for name in names:
        fs.delete_file(join(root, name))


def prepare_folder(fs, root: str, plan: Plan, state: OutputState, action: FolderAction) -> None:
    """Before the first shard: clear the folder (overwrite) or the temporary files a killed attempt left
    (only whole files are ever renamed in), and write ``_plan.json`` unless resuming or repairing (a
    repair keeps the manifest until it is rewritten: a rerun killed halfway verifies the shards again)."""
    if action is FolderAction.OVERWRITE:
        _clear(fs, root, state)
    else:
        for name in state.tmp:
            fs.delete_file(join(root, name))
    fs.create_dir(join(root, DATA_DIR), recursive=True)
    if action not in (FolderAction.RESUME, FolderAction.REPAIR):
        write_atomic(fs, root, PLAN_FILE, plan_json(plan))


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
    fs.create_dir(join(root, DATA_DIR), recursive=True)
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
    finish_folder(fs, root, built)
    return built


def sha256_file(fs, path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def shard_digests(fs, root: str, manifest: dict[str, Any]) -> dict[str, str | None]:
    """The SHA-256 of every shard file a manifest lists, as found now (None: missing or unreadable)."""
    digests: dict[str, str | None] = {}
    for entry in manifest.get("shards", []):
        try:
            digests[entry["file"]] = sha256_file(fs, join(root, entry["file"]))[0]
        except OSError:
            digests[entry["file"]] = None
    return digests


def kept_summaries(fs, root: str, plan: Plan, kept: list[int]) -> dict[int, dict[str, Any]]:
    """{"bytes", "sha256"} of the shards an earlier attempt wrote, for the manifest."""
    out = {}
    for i in kept:
        digest, size = sha256_file(fs, join(root, part_name(i, plan.num_shards)))
        out[i] = {"bytes": size, "sha256": digest}
    return out
