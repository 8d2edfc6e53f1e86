"""Distributed training: the per-worker loop (DDP via ray.train.torch) and the TorchTrainer driver.

The Ray-specific lines are few and kept at the edges: ``train_loop_per_worker`` wraps the plain-PyTorch
core in ``vaedist.loop``; ``run_training`` checks resources, tracking and storage before anything starts,
then fits a TorchTrainer and logs/registers the best checkpoint in MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from vaedist import console, loop, tracking
from vaedist.champion import MODEL_TAG, VERSION_TAG, register_checkpoint
from vaedist.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from vaedist.cluster import (
    WorkerPlan,
    check_storage_shared,
    claim_run_folder,
    connect_ray,
    plan_workers,
    storage_path,
)
from vaedist.config import ExperimentConfig, from_flat
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.models import BaseVAE, build_model

# Fault injection for the fault-tolerance test: "epoch=E,step=S,rank=R". The worker of that rank exits
# hard at that step the first time only (a marker file next to the checkpoints remembers it).
FAULT_ENV = "VAEDIST_INJECT_FAULT"
NOISE_STREAM = 1  # derive_seed(seed, epoch, rank, NOISE_STREAM): eps draws, apart from the data-order stream
DONE_TAG = "vaedist.checkpoint"  # set on a train run once it finished: where its best checkpoint is


def is_rank_zero() -> bool:
    """The one place that decides who logs and checkpoints."""
    return ray.train.get_context().get_world_rank() == 0


def default_run_name(cfg: ExperimentConfig) -> str:
    """Deterministic from the config: the same command resumes, a changed config starts fresh."""
    import hashlib
    import json

    flat = {k: v for k, v in cfg.flatten().items() if not k.startswith("resources.")}
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.variant}-{cfg.model.arch}-{digest}"


# --------------------------------------------------------------------------------------------------
# The per-worker loop


class WorkerExiting(RuntimeError):
    """Raised in the training thread when its process is exiting (e.g. ASHA stopped the trial)."""


class StopAtExit:
    """Lets the training thread leave torch before its process exits.

    Ray Train runs the loop in a daemon thread. When Ray shuts a worker down mid-epoch (ASHA stopping a
    trial), the interpreter finalizes while that thread is inside a torch op; CPython < 3.14 then kills
    the thread with pthread_exit, whose forced unwind through torch's C++ frames aborts the process with
    a "Fatal Python error: Aborted" stack in the user's logs. Here an atexit hook (atexit runs before
    finalization) asks the loop to stop at its next step (``check``) and joins the thread.
    """

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self.requested = threading.Event()
        self._thread = threading.current_thread()
        self._lock = threading.Lock()

    def __enter__(self) -> StopAtExit:
        atexit.register(self._on_exit)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            # Once the exit hook runs, atexit is iterating its callbacks: leave them alone.
            if not self.requested.is_set():
                atexit.unregister(self._on_exit)

    def _on_exit(self) -> None:
        with self._lock:
            self.requested.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self.timeout_s)

    def check(self) -> None:
        if self.requested.is_set():
            raise WorkerExiting("the worker process is exiting; training stopped at a step boundary")


def _maybe_inject_fault(epoch: int, step: int, rank: int) -> None:
    """The fault-tolerance test's hook: ``$VAEDIST_INJECT_FAULT`` in the workers' environment.

    Format ``run=NAME,epoch=E,step=S,rank=R,marker=PATH``: the worker of rank R of run NAME exits hard at
    that step, once (the marker file remembers it). The test sets it in Ray's runtime env.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want = dict(part.split("=", 1) for part in spec.split(","))
    if want.get("run") != ray.train.get_context().get_experiment_name():
        return
    if (int(want.get("epoch", -1)), int(want.get("step", -1)), int(want.get("rank", 0))) != (
        epoch,
        step,
        rank,
    ):
        return
    marker = Path(want["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec)
    # Crash only once the controller has registered the previous epoch's checkpoint, so the test
    # exercises "resume from the last checkpoint" rather than a race with the controller's polling.
    ray.train.get_all_reported_checkpoints(timeout_s=60)
    os._exit(1)  # a hard crash, as if the worker's node died


@dataclass
class Worker:
    """What one rank holds for the whole run: its place, the model, the optimizer and the data."""

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    core: BaseVAE  # the plain model (rank 0 checkpoints and pictures it)
    objective: torch.nn.Module  # the DDP-wrapped ElboObjective(core) the optimizer steps through
    optimizer: torch.optim.Optimizer
    data: tuple[torch.Tensor, ...]  # train_x (N, H, W, C) uint8, train_y (N,), val_x, val_y
    start_epoch: int

    @property
    def num_dims(self) -> int:
        return int(np.prod(self.core.image_shape))


def _set_up_worker(config: dict[str, Any]) -> Worker:
    """Model, optimizer and data on this rank; resumes from Ray Train's latest checkpoint if there is one."""
    cfg = from_flat(config["experiment"])
    ctx = ray.train.get_context()
    torch.set_num_threads(config["torch_threads"])
    spec = get_spec(cfg.data.dataset)
    data = tuple(torch.from_numpy(np.array(ray.get(r))) for r in config["data_refs"])

    loop.seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    core = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective = ray.train.torch.prepare_model(loop.ElboObjective(core))
    device = ray.train.torch.get_device()
    core = core.to(device)
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.train.lr)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        core.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
    return Worker(
        cfg, ctx.get_world_rank(), ctx.get_world_size(), device, core, objective, optimizer, data, start_epoch
    )


def _node_ids(world: int) -> list[str]:
    """The node of every rank, so a user (and the multi-node test) can see the placement."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, mine)
    return nodes


def _open_logging(config: dict[str, Any], w: Worker, nodes: list[str]):
    """Rank 0's MLflow run logger (tags, system metrics) and the fixed inputs of its pictures."""
    from vaedist.pictures import EpochPictures

    # The tracking URI comes explicitly from the driver: a worker's own cwd/env may differ.
    logger = tracking.RunLogger(config["run_id"], config["tracking_uri"])
    logger.set_tags({"vaedist.nodes": ",".join(n[:12] for n in nodes), "vaedist.num_nodes": len(set(nodes))})
    logger.start_system_metrics()
    _, _, val_x, val_y = w.data
    class_names = get_spec(w.cfg.data.dataset).class_names
    pictures = EpochPictures(w.core, val_x.numpy(), val_y.numpy(), class_names, seed=w.cfg.train.seed)
    return logger, pictures


def _run_epoch(w: Worker, epoch: int, on_step) -> dict[str, float]:
    """One epoch of training on this rank's slice, then validation; sums all-reduced over ranks."""
    cfg, (train_x, train_y, val_x, val_y) = w.cfg, w.data
    per_rank_batch = max(1, cfg.train.batch_size // w.world)
    t0 = time.perf_counter()
    indices = loop.epoch_indices(len(train_x), epoch, cfg.train.seed, w.rank, w.world)
    steps = len(indices) // per_rank_batch
    generator = torch.Generator().manual_seed(loop.derive_seed(cfg.train.seed, epoch, w.rank))
    # The global RNG draws the reparameterization noise (and the AE's latent noise): seeded per
    # (epoch, rank) so DDP ranks draw different eps, and a resumed epoch draws what it drew before.
    torch.manual_seed(loop.derive_seed(cfg.train.seed, epoch, w.rank, NOISE_STREAM))

    def beta_at(step: int) -> float:
        return loop.kl_weight(epoch, step, steps, cfg.train.beta, cfg.train.kl_warmup_epochs)

    train_sums = loop.train_epoch(
        w.objective, w.core, w.optimizer, train_x, train_y, indices, per_rank_batch,
        beta_at, cfg.train.free_bits, generator, w.device, on_step,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    val_rows = loop.shard_range(len(val_x), w.rank, w.world)
    val_sums = loop.evaluate(w.core, val_x, val_y, val_rows, 512, cfg.train.seed, w.device)
    train_t, val_t = train_sums.as_tensor(), val_sums.as_tensor()
    if w.world > 1:
        torch.distributed.all_reduce(train_t)
        torch.distributed.all_reduce(val_t)
    tr, va = loop.Sums.means(train_t, w.num_dims), loop.Sums.means(val_t, w.num_dims)
    return {
        "epoch": epoch + 1,
        "train_loss": tr["loss"],
        "train_neg_elbo": tr["neg_elbo"],
        "val_neg_elbo": va["neg_elbo"],
        "val_recon": va["recon"],
        "val_kl": va["kl"],
        "val_bits_per_dim": va["bits_per_dim"],
        "train_images_per_s": train_t[4].item() / max(seconds, 1e-9),  # Sums slot 4: images seen
        "beta": beta_at(steps),
    }


def _log_epoch(w: Worker, metrics: dict[str, float], logger, pictures) -> None:
    """Rank 0's metrics and (every ``image_every`` epochs and at the end) pictures."""
    epoch = int(metrics["epoch"])
    logger.log_metrics(
        {k: v for k, v in metrics.items() if k not in ("epoch", "first_step_unix_s")}, step=epoch
    )
    if not is_rank_zero():
        return
    if pictures is not None and (epoch % w.cfg.train.image_every == 0 or epoch == w.cfg.train.epochs):
        for key, image in pictures.render().items():
            logger.log_image(key, image, step=epoch)


def _report_epoch(w: Worker, metrics: dict[str, float], cfg_flat: dict[str, Any]) -> None:
    """Every rank reports (``ray.train.report`` is a barrier); rank 0 attaches the checkpoint."""
    epoch = int(metrics["epoch"])
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if is_rank_zero():
            save_checkpoint(Path(d) / CHECKPOINT_FILE, w.core, w.optimizer, epoch, cfg_flat, metrics)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config``: flat ExperimentConfig + data refs + run id + the driver's
    progress queue (None: no display, e.g. a Tune trial, whose progress Tune itself reports)."""
    console.quiet_worker_console()
    w = _set_up_worker(config)
    nodes = _node_ids(w.world)
    queue = config.get("progress") if is_rank_zero() else None
    progress = console.StepReporter(queue.put_nowait if queue is not None else None)
    # Rank 0's MLflow client and picture inputs are opened on a side thread while the first steps run:
    # nothing is logged before the first epoch ends, and the ~2 s of imports and connecting would
    # otherwise hold back the first step (on a GPU worker the device would sit idle meanwhile).
    logger: tracking.RunLogger | tracking.NullLogger = tracking.NullLogger()
    pictures, opening = None, None
    if is_rank_zero():
        side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaedist-mlflow")
        opening = side.submit(_open_logging, config, w, nodes)
        side.shutdown(wait=False)
    first_step_at: list[float] = []  # wall clock of this worker's first step (start-up cost)
    with StopAtExit() as stop_at_exit:
        try:
            for epoch in range(w.start_epoch, w.cfg.train.epochs):

                def on_step(step: int, steps: int, epoch: int = epoch) -> None:
                    if not first_step_at:
                        first_step_at.append(time.time())
                    stop_at_exit.check()
                    _maybe_inject_fault(epoch, step, w.rank)
                    progress.step(epoch + 1, step, steps)

                metrics = _run_epoch(w, epoch, on_step)
                metrics["first_step_unix_s"] = first_step_at[0] if first_step_at else 0.0
                progress.epoch(metrics)
                if opening is not None:
                    logger, pictures = opening.result()
                    opening = None
                _log_epoch(w, metrics, logger, pictures)
                _report_epoch(w, metrics, config["experiment"])
        finally:
            if opening is not None:  # the loop ended before its first epoch did: close what was opened
                with contextlib.suppress(Exception):
                    logger, _ = opening.result()
            logger.close()


# --------------------------------------------------------------------------------------------------
# The driver


def put_data(cfg: ExperimentConfig, plan: WorkerPlan) -> list:
    """Train and validation arrays into the object store once; every worker maps them zero-copy."""
    train = load_split(cfg.data.dataset, "train", root=cfg.data.data_dir, val_size=cfg.data.val_size)
    val = load_split(cfg.data.dataset, "val", root=cfg.data.data_dir, val_size=cfg.data.val_size)
    if plan.workers * max(1, cfg.train.batch_size // plan.workers) > len(train[0]):
        raise UsageError(
            f"train.batch_size {cfg.train.batch_size} is larger than the {len(train[0])} training images"
        )
    return [ray.put(np.ascontiguousarray(a)) for a in (*train, *val)]


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
        rule = f"{spec.fingerprint}/{split}/val_size={cfg.data.val_size}"
        digest = hashlib.sha256(rule.encode()).hexdigest()[:16]
        source = spec.mirrors[0] if spec.mirrors else spec.source.partition("?")[0]  # official mirror, or the path
        tracking.log_dataset(run_id, f"{spec.name}-{split}", digest, source, split)


def build_trainer(
    cfg: ExperimentConfig,
    name: str,
    storage: str,
    run_id: str,
    plan: WorkerPlan,
    data_refs: list,
    callbacks: list | None = None,
    progress=None,
) -> ray.train.torch.TorchTrainer:
    """One TorchTrainer; the same ``name`` and ``storage`` resume from its latest checkpoint.

    ``progress``: a Ray queue that rank 0 puts its progress on for this driver's display, or None.
    """
    claim_run_folder(storage, name, run_id)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.flatten(),
            "run_id": run_id,
            "tracking_uri": tracking.tracking_uri(),
            "torch_threads": plan.torch_threads,
            "data_refs": data_refs,
            "progress": progress,
        },
        scaling_config=plan.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_neg_elbo",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            # The console level of Ray Train's own loggers, in its controller and in every worker.
            logging_config=ray.train.LoggingConfig(log_level=console.train_log_level(console.is_verbose())),
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
    best = result.get_best_checkpoint("val_neg_elbo", "min") if result.best_checkpoints else result.checkpoint
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
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    storage = storage_path(storage)
    where = connect_ray(cfg.resources.address)
    if where:
        echo(where)
    plan = plan_workers(cfg.resources)
    check_storage_shared(storage)
    done = _finished_before(cfg, name, register)
    if done is not None:
        echo(f"{name} already trained (MLflow run {done.run_id}); reusing it - pass a new --name to retrain")
        return done

    data_refs = put_data(cfg, plan)
    params = experiment_params(cfg)
    run_id = tracking.find_or_create_run(cfg.data.dataset, name, params, kind="train", parent_run_id=parent_run_id)
    log_training_data(run_id, cfg)
    echo(f"training {name}: {plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU"
         f"{f' x {plan.gpus_per_worker:g} GPU' if plan.use_gpu else ''}; MLflow run {run_id} in {tracking.shown_uri(uri)}")  # fmt: skip
    with _progress_display(cfg, echo) as progress:
        try:
            trainer = build_trainer(cfg, name, storage, run_id, plan, data_refs, progress=progress)
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
