"""Distributed training, the driver: data into the object store, a TorchTrainer, the MLflow run, the model.

``run_training`` checks resources, tracking and storage before anything starts, then fits a TorchTrainer
whose workers run ``worker.train_loop_per_worker`` (the loop itself is in ``worker.py``), and logs /
registers the best checkpoint in MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch

from vaedist import console, tracking
from vaedist.champion import register_checkpoint
from vaedist.cluster import (
    WorkerPlan,
    check_storage_shared,
    claim_run_folder,
    connect_ray,
    plan_workers,
    storage_path,
)
from vaedist.config import ExperimentConfig, check_dataset
from vaedist.data import get_spec, load_split
from vaedist.data.spec import split_digest
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.names import DONE_TAG, MODEL_TAG, VAL_METRIC, VERSION_TAG
from vaedist.worker import train_loop_per_worker


def default_run_name(cfg: ExperimentConfig) -> str:
    """Deterministic from the config: the same command resumes, a changed config starts fresh."""
    import json

    flat = {k: v for k, v in cfg.flatten().items() if not k.startswith("resources.")}
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.variant}-{cfg.model.arch}-{digest}"


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainingData:
    """What the workers read: object refs of [train_x, train_y, val_x, val_y] (the train ones None when the
    train split streams) and, for a streamed split, its rows and the CPUs of each decoding task."""

    refs: list
    stream_rows: int = 0
    decode_cpus: float = 1.0

    @property
    def streams(self) -> bool:
        return self.stream_rows > 0


def decode_cpus(cluster_cpus: float, training_cpus: float) -> float:
    """CPUs per decoding task of a stream: one where the training workers leave one free; else none
    reserved, sharing the workers' cores (as a DataLoader's worker processes do), since a task that waits
    for a CPU the workers hold would stall the stream forever."""
    return 1.0 if cluster_cpus - training_cpus >= 1.0 else 0.0


def put_data(cfg: ExperimentConfig, plan: WorkerPlan, concurrent: int = 1) -> TrainingData:
    """Train and validation arrays into the object store once; every worker maps them zero-copy. A path
    dataset larger than the memory budget (``data.memory_budget``) streams its train split instead
    (``vaedist.streaming``): only the validation split is decoded here. ``concurrent``: runs at once (Tune
    trials), for the CPUs they leave to decoding."""
    from vaedist import streaming

    dataset, val_size = cfg.data.dataset, cfg.data.val_size
    streams = streaming.streams(dataset, cfg.data.memory_budget, streaming.object_store_bytes())
    train = () if streams else load_split(dataset, "train", root=cfg.data.data_dir, val_size=val_size)
    rows = streaming.train_rows(dataset, val_size) if streams else len(train[0])
    if streaming.steps_per_epoch(rows, plan.workers, max(1, cfg.train.batch_size // plan.workers)) == 0:
        raise UsageError(f"train.batch_size {cfg.train.batch_size} is larger than the {rows} training images")
    val = load_split(dataset, "val", root=cfg.data.data_dir, val_size=val_size)  # streamed: decoded alone
    refs = [None, None] if streams else []
    refs += [ray.put(np.ascontiguousarray(a)) for a in (*train, *val)]
    if not streams:
        return TrainingData(refs)
    training = concurrent * plan.workers * plan.cpus_per_worker
    return TrainingData(refs, rows, decode_cpus(ray.cluster_resources().get("CPU", 0.0), training))


# Config keys that say where a job ran, not what it is: never MLflow params (an address may hold a secret).
WHERE_IT_RAN = ("resources.address", "resources.entrypoint_num_cpus", "resources.entrypoint_num_gpus")


def experiment_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """MLflow params: the flattened config (minus where it ran) plus what was resolved from defaults."""
    params = {k: v for k, v in cfg.flatten().items() if k not in WHERE_IT_RAN}
    params["resolved.likelihood"] = cfg.likelihood
    return params


def log_training_data(run_id: str, cfg: ExperimentConfig) -> None:
    """The run's data as MLflow dataset inputs (the UI's Dataset column): train and validation splits.

    MLflow keeps one input per (name, digest) in a run, so each split is its own dataset: digest = the
    data's fingerprint with the split rule (the seeded validation hold-out of ``val_size`` images)."""
    spec = get_spec(cfg.data.dataset)
    for split in ("train", "validation"):
        digest = split_digest(spec.fingerprint, split, cfg.data.val_size)
        source = spec.mirrors[0] if spec.mirrors else spec.source.partition("?")[0]  # official mirror, or the path
        tracking.log_dataset(run_id, f"{spec.name}-{split}", digest, source, split)


def worker_config(cfg: ExperimentConfig, run_id, plan: WorkerPlan, data: TrainingData, progress=None,
                  started: float | None = None) -> dict:  # fmt: skip
    """What ``worker.run_worker`` reads: the flat config, its MLflow run (an id, or in a Tune trial's own
    process a Future of one), threads, data, progress queue, and when the work started (wall clock; the
    worker reports ``startup_s``, that to its first step)."""
    return {"experiment": cfg.flatten(), "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
            "torch_threads": plan.torch_threads, "data_refs": data.refs, "stream_rows": data.stream_rows,
            "decode_cpus": data.decode_cpus, "progress": progress,
            "started_unix_s": time.time() if started is None else started}  # fmt: skip


def build_trainer(
    cfg: ExperimentConfig,
    name: str,
    storage: str,
    run_id: str,
    plan: WorkerPlan,
    data: TrainingData,
    callbacks: list | None = None,
    progress=None,
) -> ray.train.torch.TorchTrainer:
    """One TorchTrainer; the same ``name`` and ``storage`` resume from its latest checkpoint.

    ``progress``: a Ray queue that rank 0 puts its progress on for this driver's display, or None.
    """
    claim_run_folder(storage, name, run_id)
    streamed = {}
    if data.streams:
        from vaedist import streaming

        ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch display is vaedist's own
        train = streaming.train_dataset(cfg.data.dataset, cfg.data.val_size, cfg.train.seed, num_cpus=data.decode_cpus)
        streamed = {"datasets": {"train": train}, "dataset_config": streaming.dataset_config()}
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, run_id, plan, data, progress),
        **streamed,
        scaling_config=plan.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=VAL_METRIC,
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            # The console level of Ray Train's own loggers, in its controller and in every worker.
            logging_config=console.train_logging_config(),
        ),
    )


@dataclass
class TrainResult:
    name: str
    run_id: str
    model_uri: str
    version: str
    checkpoint: str
    metrics: dict[str, float]
    champion: bool
    fit_started_unix_s: float = 0.0


def _finished_before(cfg: ExperimentConfig, name: str, register: bool) -> TrainResult | None:
    """The run of this name if it finished before with this config (params are immutable): reused, not
    retrained. A different config under the same name is refused."""
    done = tracking.finished_run(cfg.data.dataset, name)
    if done is None:
        return None
    tracking.check_same_params(done, experiment_params(cfg), name)
    tags = done.data.tags
    if not tags.get(DONE_TAG) or not (tags.get(MODEL_TAG) or not register):
        return None  # finished, but its model was never registered: train (resumes) and register
    return TrainResult(
        name=name, run_id=done.info.run_id, model_uri=tags.get(MODEL_TAG, ""), version=tags.get(VERSION_TAG, ""),
        checkpoint=tags[DONE_TAG], metrics=dict(done.data.metrics), champion=False,
    )  # fmt: skip


def _fit(trainer: ray.train.torch.TorchTrainer, name: str, storage: str, run_id: str):
    """``trainer.fit()`` -> (result, best checkpoint); a failed run is marked FAILED in MLflow."""
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        tracking.end_run(run_id, "FAILED")
        raise VaedistError(f"training {name} failed: {first_line(exc)} (logs under {storage}/{name})") from None
    best = result.get_best_checkpoint(VAL_METRIC, "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise VaedistError(f"training {name} produced no checkpoint (see {storage}/{name})")
    return result, best


@contextlib.contextmanager
def _progress_display(cfg: ExperimentConfig, echo):
    """Rank 0 -> this driver: a Ray queue that rank 0 puts its progress on (yielded, for the workers'
    config), drawn here by a side thread while the body runs (console.EpochDisplay)."""
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # takes no CPU a worker needs

    def receive(timeout_s: float):
        try:
            return queue.get(block=timeout_s > 0, timeout=timeout_s or None)
        except Empty:
            return None

    mode = console.progress_mode(console.stderr_isatty(), console.is_verbose())
    try:
        with console.following(receive, console.EpochDisplay(cfg.train.epochs, echo, mode)):
            yield queue
    finally:
        queue.shutdown()


def start_driver(cfg: ExperimentConfig, storage: str | None, echo) -> tuple[str, str]:
    """(tracking URI, storage path) once a training or search driver may start: the config checked against
    its dataset, the MLflow store reachable, Ray connected (where it runs said)."""
    check_dataset(cfg)
    uri = tracking.checked_tracking_uri()
    storage = storage_path(storage)
    where = connect_ray(cfg.resources.address)
    if where:
        echo(where)
    return uri, storage


def run_training(
    cfg: ExperimentConfig,
    name: str | None = None,
    storage: str | None = None,
    parent_run_id: str | None = None,
    register: bool = True,
    echo=print,
) -> TrainResult:
    """Train ``cfg`` on Ray (local or ``cfg.resources.address``), log it to MLflow, register the model."""
    name = name or default_run_name(cfg)
    uri, storage = start_driver(cfg, storage, echo)
    plan = plan_workers(cfg.resources)
    check_storage_shared(storage)
    done = _finished_before(cfg, name, register)
    if done is not None:
        echo(f"{name} already trained (MLflow run {done.run_id}); reusing it - pass a new --name to retrain")
        return done

    data = put_data(cfg, plan)
    params = experiment_params(cfg)
    run_id = tracking.find_or_create_run(cfg.data.dataset, name, params, kind="train", parent_run_id=parent_run_id)
    log_training_data(run_id, cfg)
    if data.streams:
        echo(f"the train split ({data.stream_rows} images) is larger than the memory budget: it streams through "
             "Ray Data, decoded as training goes (--memory-budget sets the budget)")  # fmt: skip
    echo(f"training {name}: {plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU"
         f"{f' x {plan.gpus_per_worker:g} GPU' if plan.use_gpu else ''}; MLflow run {run_id} in {tracking.shown_uri(uri)}")  # fmt: skip
    with _progress_display(cfg, echo) as progress:
        try:
            trainer = build_trainer(cfg, name, storage, run_id, plan, data, progress=progress)
        except UsageError:
            tracking.end_run(run_id, "FAILED")
            raise
        fit_started = time.time()
        result, best = _fit(trainer, name, storage, run_id)
    model_uri, version, moved = "", "", False
    if register:
        echo(f"registering the best checkpoint ({Path(best.path).name}) as a model in MLflow")
        model_uri, version, moved, _ = register_checkpoint(best, run_id, cfg.data.dataset)
    tracking.set_run_tags(run_id, {DONE_TAG: best.path})
    tracking.end_run(run_id, "FINISHED")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    return TrainResult(name=name, run_id=run_id, model_uri=model_uri, version=version, checkpoint=best.path,
                       metrics=metrics, champion=moved, fit_started_unix_s=fit_started)  # fmt: skip
