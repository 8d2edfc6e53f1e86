"""The driver of ``vaedist generate``: prepare (every check, nothing written), then run the writer on Ray
and record the run in MLflow (kind ``generate`` in ``vaedist/<dataset>``)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from vaedist.config import GenerateConfig, ResourcesConfig
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.generate import writer
from vaedist.generate.card import finish_folder
from vaedist.generate.format import (
    MANIFEST,
    build_manifest,
    dataset_digest,
    dataset_name,
    join,
    manifest_bytes,
    part_name,
)
from vaedist.generate.plan import (
    FolderAction,
    ModelFacts,
    OutputState,
    Plan,
    damaged_shards,
    decide_action,
    decide_repair,
    label_counts,
    plan_labels,
)
from vaedist.generate.reader import read_shard
from vaedist.names import MODEL_RUN_TAG, MODEL_TAG, VERSION_TAG

if TYPE_CHECKING:  # the checkpoint module imports torch: loaded when a model is read, not with the package
    from vaedist.checkpoint import ModelHeader

GRID_PER_LABEL = 8  # samples per label in the MLflow picture


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
    action: FolderAction
    todo: list[int]  # shards to write
    kept: list[int]  # shards of an earlier attempt that verify
    damaged: dict[int, str] = field(default_factory=dict)  # repair: shard -> how it differs from the manifest

    @property
    def rows_todo(self) -> int:
        return sum(self.plan.shard_range(i)[1] for i in self.todo)


def _model_facts(cfg: GenerateConfig) -> tuple[ModelFacts, ModelHeader, bytes]:
    """(what the plan needs to know of the model, the checkpoint's header, its bytes): read from the
    checkpoint alone, without building the model (the actors do, once each)."""
    from vaedist import tracking
    from vaedist.checkpoint import header, load_vaedist_checkpoint

    path = tracking.resolve_checkpoint(cfg.model)
    model_bytes = path.read_bytes()
    head = header(load_vaedist_checkpoint(model_bytes))
    if not head.dataset:
        raise UsageError(f"checkpoint {path} does not say which dataset it was trained on (no data.dataset)")
    class_names = list(head.class_names) or spec_class_names(head.dataset)
    if len(class_names) != head.num_classes:
        class_names = [str(i) for i in range(head.num_classes)]
    facts = ModelFacts(cfg.model, head.dataset, head.conditional, head.num_classes, tuple(class_names),
                       head.variant, head.fingerprint)  # fmt: skip
    return facts, head, model_bytes


def spec_class_names(dataset: str | None) -> list[str]:
    """Class names of a checkpoint that does not keep them (written before models kept their facts), from
    its dataset as this vaedist knows it; [] for a dataset it does not know or cannot open."""
    from vaedist.data import get_spec

    try:
        return list(get_spec(dataset).class_names) if dataset else []
    except Exception:  # a user's folder gone or changed, a name this version does not know: numbers only
        return []


def _train_freq(head: ModelHeader, labels: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """The training set's rows per class: the checkpoint's, or (a checkpoint without them) counted again."""

    def freq() -> np.ndarray:
        if head.class_counts:
            return np.asarray(head.class_counts, dtype=np.int64)
        from vaedist.data import load_split

        _, y = load_split(head.dataset, "train_full", progress=False)
        return np.bincount(y, minlength=max(labels) + 1)

    return freq


def _model_info(uri: str) -> dict[str, str]:
    from vaedist import tracking

    if uri.startswith("runs:/"):
        return {"run_id": uri[len("runs:/") :].split("/", 1)[0]}
    return tracking.model_version_info(uri) if uri.startswith("models:/") else {}


def build_plan(cfg: GenerateConfig) -> tuple[Plan, bytes, dict[str, str]]:
    """(plan, the checkpoint's bytes, model info) of a request; UsageError on any bad input."""
    facts, head, model_bytes = _model_facts(cfg)
    labels, names = plan_labels(cfg.labels, facts)
    counts = label_counts(cfg, labels, facts.conditional, _train_freq(head, labels))
    info = {**_model_info(cfg.model), "dataset_fingerprint": facts.dataset_fingerprint}
    plan = Plan(
        model_uri=cfg.model,
        model_version=str(info.get("version", "")),
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        dataset=facts.dataset,
        labels=labels,
        label_names=names,
        counts=counts,
        seed=cfg.seed,
        temperature=float(cfg.temperature),
        shard_rows=cfg.shard_rows,
        image_format=cfg.image_format,
        image_shape=head.image_shape,
        latent_dim=head.latent_dim,
        class_names=facts.class_names if facts.conditional else (),
    )
    return plan, model_bytes, info


def prepare(cfg: GenerateConfig) -> Prepared:
    """Resolve the model, build the plan, inspect the output folder; raise UsageError on any bad input."""
    plan, model_bytes, info = build_plan(cfg)
    fs, root, uri = writer.resolve_out(cfg.out)
    try:
        state = writer.inspect_output(fs, root, uri)
    except OSError as exc:  # an unreachable bucket, missing credentials, a permission error
        raise UsageError(f"cannot list --out {uri}: {first_line(exc)}") from None
    action = decide_action(state, plan, cfg.overwrite, uri)
    damaged = {}
    if action is FolderAction.COMPLETE:  # verify every shard against the manifest's checksums
        damaged = damaged_shards(state.manifest, writer.shard_digests(fs, root, state.manifest))
        action = decide_repair(state.manifest, plan, damaged, uri)
    everything = list(range(plan.num_shards))
    kept = {
        FolderAction.COMPLETE: everything,
        FolderAction.RESUME: [i for i in sorted(state.parts) if writer.verify_part(fs, root, plan, i)],
        FolderAction.REPAIR: [i for i in everything if i not in damaged],
    }.get(action, [])
    if action is not FolderAction.COMPLETE and "://" not in cfg.out:
        writer.check_writable(root)
    todo = sorted(set(everything) - set(kept))
    return Prepared(cfg, plan, model_bytes, info, fs, root, uri, state, action, todo, kept, damaged)


def describe(p: Prepared) -> list[str]:
    plan = p.plan
    per = ", ".join(f"{n or '-'}={c:,}" for n, c in zip(plan.label_names, plan.counts, strict=True))
    version = f" version {plan.model_version}" if plan.model_version else ""
    doing = {
        FolderAction.NEW: f"new folder: {plan.num_shards} shard(s) to write",
        FolderAction.RESUME: f"unfinished: {len(p.kept)} shard(s) verified, {len(p.todo)} to write",
        FolderAction.OVERWRITE: f"--overwrite: its vaedist files are replaced, {plan.num_shards} shard(s) to write",
        FolderAction.COMPLETE: "complete with the same plan: every shard verified, nothing to do",
        FolderAction.REPAIR: f"complete, but {len(p.damaged)} shard(s) damaged: rewriting them",
    }[p.action]
    repairs = [f"  repair          {part_name(i, plan.num_shards)} {why}: rewriting it" for i, why in sorted(p.damaged.items())]
    return [
        f"plan {plan.hash}: {plan.total:,} rows of {plan.dataset} in {plan.num_shards} shard(s) of <= {plan.shard_rows:,}",
        f"  rows per label  {per}",
        f"  model           {plan.model_uri}{version} (sha256 {plan.model_sha256[:12]})",
        f"  sampling        z ~ N(0, {plan.temperature:g}^2 I), seed {plan.seed}, images {plan.image_format}",
        f"  out             {p.uri} ({doing})",
        *repairs,
    ]


# --------------------------------------------------------------------------------------------------
# The run


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
    decoder_busy_fraction: float = 0.0  # decoder seconds / (wall seconds x shards rendered at once)
    run_id: str | None = None
    manifest: dict[str, Any] | None = None
    # Seconds of the whole call by phase: prepare (model, plan, folder), start (Ray, the MLflow run),
    # pipeline (= seconds), finish (manifest, MLflow metrics and the sample grid)
    phases: dict[str, float] = field(default_factory=dict)


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


def _tags(p: Prepared) -> dict[str, Any]:
    plan, cfg = p.plan, p.cfg
    return {
        MODEL_TAG: plan.model_uri,
        VERSION_TAG: plan.model_version,
        MODEL_RUN_TAG: p.model_info.get("run_id", ""),
        "vaedist.model_sha256": plan.model_sha256,
        "vaedist.output": p.uri,
        "vaedist.plan_hash": plan.hash,
        "generate.labels": "all" if cfg.labels is None else ",".join(map(str, cfg.labels)),
        "generate.per_label": cfg.per_label,
        "generate.total": cfg.total,
        "generate.class_balance": cfg.class_balance,
    }


def _request(cfg: GenerateConfig) -> dict[str, Any]:
    """What the user asked for (the plan is what it resolved to), kept in the manifest."""
    return {
        "labels": None if cfg.labels is None else list(cfg.labels),
        "per_label": cfg.per_label,
        "total": cfg.total,
        "class_balance": cfg.class_balance,
    }


def sample_grid(fs, root: str, plan: Plan, per_label: int = GRID_PER_LABEL) -> np.ndarray:
    """Generated samples per label, read back from the part files: RGB uint8 (figures.labelled_rows)."""
    from vaedist.figures import labelled_rows

    h, w, c = plan.image_shape
    picked: dict[int, list[np.ndarray]] = {k: [] for k in plan.labels}
    for shard in range(plan.num_shards):
        images, labels = read_shard(fs, join(root, part_name(shard, plan.num_shards)))
        for k in plan.labels:
            need = per_label - len(picked[k])
            if need > 0:
                picked[k].extend(images[labels == k][:need])
        if all(len(picked[k]) >= min(per_label, c_) for k, c_ in zip(plan.labels, plan.counts, strict=True)):
            break
    rows = [k for k, c_ in zip(plan.labels, plan.counts, strict=True) if c_ > 0]
    grid = np.zeros((len(rows), per_label, h, w, c), dtype=np.uint8)  # (labels, per_label, H, W, C)
    for r, k in enumerate(rows):
        if picked[k]:
            grid[r, : len(picked[k])] = np.stack(picked[k])
    names = [plan.label_names[plan.labels.index(k)] or "samples" for k in rows]
    return labelled_rows(grid, names, title=f"generated {plan.dataset} (plan {plan.hash})")


@dataclass
class _Written:
    """What the pipeline did: every shard's {"bytes", "sha256"} (kept ones included) and its timing."""

    shards: dict[int, dict[str, Any]]
    rows: int = 0  # rows written now
    seconds: float = 0.0  # from the pipeline's start to the last shard
    startup: float = 0.0  # of those, before the first shard's work began
    decoding: float = 0.0  # decoder seconds, summed over the actors


def _write_shards(p: Prepared, actors, echo: Callable[[str], None]) -> _Written:
    """Run the actor pool over the shards still to write, printing progress at most once a second."""
    done = _Written(writer.kept_summaries(p.fs, p.root, p.plan, p.kept))
    total, last_echo = p.rows_todo, 0.0
    t0, t0_unix, first_work = time.perf_counter(), time.time(), math.inf
    if p.todo:
        try:
            for row in writer.run_shards(p.plan, p.todo, p.uri, p.model_bytes, actors, p.cfg.batch_size):
                done.shards[int(row["shard"])] = row
                done.rows += int(row["rows"])
                done.decoding += float(row["decode_seconds"])
                first_work = min(first_work, float(row["started_unix_s"]))
                now = time.perf_counter()
                if now - last_echo >= 1.0 or done.rows == total:
                    last_echo = now
                    echo(f"  {done.rows:,}/{total:,} rows ({100 * done.rows / total:.0f}%), "
                         f"{len(done.shards)}/{p.plan.num_shards} shards, {done.rows / (now - t0):,.0f} images/s")  # fmt: skip
        except Exception as exc:  # Ray wraps the actor's error; its first line says what happened
            raise VaedistError(
                f"generation into {p.uri} failed: {first_line(exc)} (rerun to resume)"
            ) from None
    done.seconds = time.perf_counter() - t0
    if first_work < math.inf:
        # Start-up: until the first shard's work began, on the actors' clocks. Not "arrival minus work":
        # Ray Data hands a finished row over up to ~1 s later (measured on 2 CPUs).
        done.startup = max(0.0, first_work - t0_unix)
    missing = [i for i in range(p.plan.num_shards) if i not in done.shards]
    if missing:
        raise VaedistError(f"generation into {p.uri} lost shard(s) {missing[:5]} (rerun to resume)")
    return done


def _metrics(p: Prepared, done: _Written, manifest: dict[str, Any], slots: int) -> dict[str, float]:
    """``slots``: shards rendered at once over all actors (workers x calls)."""
    plan, seconds = p.plan, done.seconds
    metrics = {
        "rows": plan.total,
        "rows_written": done.rows,
        "shards": plan.num_shards,
        "shards_written": len(p.todo),
        "seconds": seconds,
        "images_per_s": done.rows / seconds if seconds > 0 else 0.0,
        "startup_s": done.startup,  # Ray Data and actor start, model load: 3-5 s on 2 CPUs, once per run
        # Share of the wall time the decoders were busy: the end-to-end / decoder-only ratio measured
        # within the run itself, so other load on the machine cancels out.
        "decoder_busy_fraction": done.decoding / (seconds * slots) if seconds > 0 else 0.0,
        "bytes_per_image": manifest["bytes"] / plan.total,
        "bytes_per_pixel": manifest["bytes"] / plan.total / math.prod(plan.image_shape),
    }
    if plan.conditional:
        metrics.update({f"rows_label_{k}": c for k, c in zip(plan.labels, plan.counts, strict=True)})
    return metrics


def _start(p: Prepared, resources: ResourcesConfig, echo: Callable[[str], None]):
    """Join Ray, size the actor pool, open (or resume) the MLflow run: (actors, run id, logger)."""
    from vaedist import tracking
    from vaedist.cluster import connect_ray, is_local, node_resources, plan_actors

    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    where = connect_ray(resources.address)
    if where:
        echo(where)
    actors = plan_actors(resources, node_resources()).for_shards(len(p.todo))
    actors = replace(actors, restarts=not is_local(resources.address))
    run_id = tracking.find_or_create_run(p.plan.dataset, run_name(p), _params(p), kind="generate")
    logger = tracking.RunLogger(run_id, uri)
    logger.set_tags(_tags(p))
    echo(
        f"generating with {actors.workers} worker(s) x {actors.calls} shard(s) at a time x {actors.threads} thread(s)"
        f"{f' x {actors.num_gpus:g} GPU' if actors.use_gpu else ''}; MLflow run {run_id} in {tracking.shown_uri(uri)}"
    )
    return actors, run_id, logger


def _already_complete(p: Prepared, result: GenerateResult, echo: Callable[[str], None]) -> GenerateResult:
    result.status, result.manifest = "complete", p.state.manifest
    result.bytes = int(p.state.manifest.get("bytes", 0))
    echo(f"done: {p.uri} is already complete with this plan (pass --overwrite to generate it again)")
    return result


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

    started = time.perf_counter()
    p = prepare(cfg)
    plan = p.plan
    for line in describe(p):
        echo(line)
    per_label = {n or "-": c for n, c in zip(plan.label_names, plan.counts, strict=True)}
    result = GenerateResult(p.uri, plan.hash, "dry-run", plan.total, per_label, plan.num_shards)
    if dry_run:
        return result
    if p.action is FolderAction.COMPLETE:
        return _already_complete(p, result, echo)
    prepared = time.perf_counter()
    actors, run_id, logger = _start(p, resources or ResourcesConfig(), echo)
    ready = time.perf_counter()
    try:
        writer.prepare_folder(p.fs, p.root, plan, p.state, p.action)
        done = _write_shards(p, actors, echo)
        manifest = build_manifest(plan, done.shards, p.model_info, _request(p.cfg))
        finish_folder(p.fs, p.root, manifest)
        # the folder as the run's dataset (context "generated"); evaluations log it again as their input
        digest = dataset_digest(manifest_bytes(manifest))
        tracking.log_dataset(run_id, dataset_name(p.uri), digest, p.uri, "generated")
        metrics = _metrics(p, done, manifest, actors.workers * actors.calls)
        logger.log_metrics(metrics, step=0)
        logger.log_image("generated_samples", sample_grid(p.fs, p.root, plan), step=0)
        logger.log_dict(manifest, f"generate/{MANIFEST}")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    echo(
        f"done: {plan.total:,} rows in {plan.num_shards} shard(s), {manifest['bytes'] / plan.total:,.0f} bytes/image, "
        f"{metrics['images_per_s']:,.0f} images/s; dataset card {p.uri}/README.md, manifest {MANIFEST}"
    )
    phases = {"prepare": prepared - started, "start": ready - prepared, "pipeline": done.seconds}
    phases["finish"] = time.perf_counter() - ready - done.seconds
    return GenerateResult(
        p.uri, plan.hash, "written", plan.total, per_label, plan.num_shards, len(p.todo), manifest["bytes"],
        done.seconds, metrics["images_per_s"], done.startup, metrics["decoder_busy_fraction"], run_id, manifest,
        phases,
    )  # fmt: skip
