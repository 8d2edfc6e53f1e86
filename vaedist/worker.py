"""The training loop of one worker: model, optimizer, data, epochs, reports; wherever it runs.

``run_worker(config, place)`` is the same loop for a rank of a Ray Train worker group (``TrainPlace``:
DDP, ``ray.train.report``) and for a single-worker Tune trial (``TunePlace``: Tune's function API in
the trial's own process, issue 15). The plain-PyTorch steps are in ``vaedist.loop``; rank 0 logs to
MLflow (``tracking.RunLogger``) and checkpoints.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedist import console, loop, tracking
from vaedist.checkpoint import dataset_facts, load_checkpoint, save_checkpoint
from vaedist.config import ExperimentConfig, from_flat
from vaedist.data import get_spec
from vaedist.errors import UsageError
from vaedist.models import BaseVAE, build_model
from vaedist.names import CHECKPOINT_FILE, NODES_TAG, NUM_NODES_TAG, VAL_METRIC
from vaedist.places import Place, TrainPlace

# Fault injection for the fault-tolerance test: "run=NAME,epoch=E,step=S,rank=R,marker=PATH". The worker
# of that rank exits hard at that step the first time only (a marker file next to the checkpoints).
FAULT_ENV = "VAEDIST_INJECT_FAULT"
NOISE_STREAM = 1  # derive_seed(seed, epoch, rank, NOISE_STREAM): eps draws, apart from the data-order stream


def is_rank_zero() -> bool:
    """The one place that decides who logs and checkpoints, for code that runs under Ray Train (CAS)."""
    import ray.train

    return ray.train.get_context().get_world_rank() == 0


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


def _maybe_inject_fault(place: Place, epoch: int, step: int) -> None:
    """The fault-tolerance test's hook: ``$VAEDIST_INJECT_FAULT`` in the workers' environment.

    The worker of rank R of run NAME exits hard at that step, once (the marker file remembers it). The
    test sets it in Ray's runtime env.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want = dict(part.split("=", 1) for part in spec.split(","))
    if want.get("run") != place.run_name:
        return
    wanted = (int(want.get("epoch", -1)), int(want.get("step", -1)), int(want.get("rank", 0)))
    if wanted != (epoch, step, place.rank):
        return
    marker = Path(want["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec)
    # Crash only once the previous epoch's checkpoint is registered, so the test exercises "resume from
    # the last checkpoint" rather than a race with the controller's polling.
    place.wait_for_checkpoints()
    os._exit(1)  # a hard crash, as if the worker's node died


@dataclass
class Worker:
    """What one rank holds for the whole run: its place, the model, the optimizer and the data."""

    cfg: ExperimentConfig
    place: Place
    core: BaseVAE  # the plain model (rank 0 checkpoints and pictures it)
    objective: torch.nn.Module  # ElboObjective(core), DDP-wrapped on a multi-worker run: what the optimizer steps
    optimizer: torch.optim.Optimizer
    data: tuple[torch.Tensor | None, ...]  # train_x (N, H, W, C) uint8, train_y (N,), val_x, val_y; train None if streamed
    start_epoch: int
    autocast_dtype: torch.dtype | None = None  # train.precision on this device (loop.autocast_dtype)
    stream: Any = None  # a streamed train split: this rank's ray.data.DataIterator
    stream_rows: int = 0  # rows of the whole streamed train split
    facts: dict[str, Any] = field(default_factory=dict)  # checkpoint.dataset_facts: what every checkpoint keeps

    @property
    def rank(self) -> int:
        return self.place.rank

    @property
    def world(self) -> int:
        return self.place.world

    @property
    def device(self) -> torch.device:
        return self.place.device

    @property
    def num_dims(self) -> int:
        return int(np.prod(self.core.image_shape))


def _set_up_worker(config: dict[str, Any], place: Place) -> Worker:
    """Model, optimizer and data on this rank; resumes from the place's latest checkpoint if there is one."""
    import ray

    cfg = from_flat(config["experiment"])
    torch.set_num_threads(config["torch_threads"])
    spec = get_spec(cfg.data.dataset)
    data = tuple(None if r is None else torch.from_numpy(np.array(ray.get(r))) for r in config["data_refs"])
    rows = config.get("stream_rows", 0)
    stream = place.train_stream(cfg.data.dataset, cfg.data.val_size, cfg.train.seed, config["decode_cpus"]) if rows else None

    loop.seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    core = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective = place.wrap(loop.ElboObjective(core))
    core = core.to(place.device)
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.train.lr)
    start_epoch = 0
    with place.resume_from() as folder:
        if folder is not None:
            state = load_checkpoint(folder / CHECKPOINT_FILE)
            core.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
    try:
        dtype = loop.autocast_dtype(cfg.train.precision, place.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # the data's facts, once: every checkpoint carries them (train + val labels: the official training set)
    labels = None if data[1] is None else np.concatenate([data[1].numpy(), data[3].numpy()])
    facts = dataset_facts(spec.name, spec.fingerprint, spec.class_names, labels, cfg.data.val_size)
    return Worker(cfg, place, core, objective, optimizer, data, start_epoch, dtype, stream, rows, facts)


def _node_ids(world: int) -> list[str]:
    """The node of every rank, so a user (and the multi-node test) can see the placement."""
    import ray

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
    run_id = config["run_id"]
    if not isinstance(run_id, str):  # a Future: a Tune trial makes its MLflow run while the loop starts
        run_id = run_id.result()
    logger = tracking.RunLogger(run_id, config["tracking_uri"])
    logger.set_tags({NODES_TAG: ",".join(n[:12] for n in nodes), NUM_NODES_TAG: len(set(nodes))})
    logger.start_system_metrics()
    _, _, val_x, val_y = w.data
    class_names = tuple(w.facts["class_names"])
    pictures = EpochPictures(w.core, val_x.numpy(), val_y.numpy(), class_names, seed=w.cfg.train.seed)
    return logger, pictures


def _run_epoch(w: Worker, epoch: int, on_step) -> dict[str, float]:
    """One epoch of training on this rank's slice, then validation; sums all-reduced over ranks."""
    cfg, (train_x, train_y, val_x, val_y) = w.cfg, w.data
    per_rank_batch = max(1, cfg.train.batch_size // w.world)
    t0 = time.perf_counter()
    if w.stream is not None:  # decoded as it streams (vaedist.streaming); every rank gets rows // world
        from vaedist import streaming

        steps = streaming.steps_per_epoch(w.stream_rows, w.world, per_rank_batch)
        batches = streaming.shard_batches(w.stream, per_rank_batch, epoch, cfg.train.seed, w.rank)
    else:
        indices = loop.epoch_indices(len(train_x), epoch, cfg.train.seed, w.rank, w.world)
        steps = len(indices) // per_rank_batch
        batches = loop.index_batches(train_x, train_y, indices, per_rank_batch)
    generator = torch.Generator().manual_seed(loop.derive_seed(cfg.train.seed, epoch, w.rank))
    # The global RNG draws the reparameterization noise (and the AE's latent noise): seeded per
    # (epoch, rank) so DDP ranks draw different eps, and a resumed epoch draws what it drew before.
    torch.manual_seed(loop.derive_seed(cfg.train.seed, epoch, w.rank, NOISE_STREAM))

    def beta_at(step: int) -> float:
        return loop.kl_weight(epoch, step, steps, cfg.train.beta, cfg.train.kl_warmup_epochs)

    train_sums = loop.train_epoch(
        w.objective, w.core, w.optimizer, batches, steps, beta_at, cfg.train.free_bits, generator, w.device, on_step,
        autocast_dtype=w.autocast_dtype,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    val_rows = loop.shard_range(len(val_x), w.rank, w.world)
    val_sums = loop.evaluate(w.core, val_x, val_y, val_rows, 512, cfg.train.seed, w.device)
    train_t, val_t = train_sums.as_tensor(), val_sums.as_tensor()
    if w.world > 1:
        torch.distributed.all_reduce(train_t)
        torch.distributed.all_reduce(val_t)
    tr, va = loop.Sums.means(train_t, w.num_dims), loop.Sums.means(val_t, w.num_dims)
    per_layer = {f"val_{k}": v for k, v in va.items() if k.startswith("kl_layer")}  # hierarchical models
    return {
        **per_layer,
        "epoch": epoch + 1,
        "train_loss": tr["loss"],
        "train_neg_elbo": tr["neg_elbo"],
        VAL_METRIC: va["neg_elbo"],
        "val_recon": va["recon"],
        "val_kl": va["kl"],
        "val_bits_per_dim": va["bits_per_dim"],
        "train_images_per_s": train_t[4].item() / max(seconds, 1e-9),  # Sums slot 4: images seen
        "beta": beta_at(steps),
    }


class EpochLog:
    """Rank 0's MLflow logging, off the training thread: the run logger and picture inputs are opened on a
    side thread while the first steps run (~2 s of imports and connecting), and each epoch's metrics and
    pictures (rendered from a copy of the model as it was at the epoch's end) are logged there while the
    checkpoint is written. ``wait`` before the epoch's report: Tune may end a trial's process right after a
    report (ASHA's stop, the search's end), and an epoch it has seen must be whole in MLflow. (Logging an
    epoch beside the next one's training was tried: the search's end kills the actors it is still
    stopping, cutting the last stopped trial's pictures short; tests/test_tune.py checks for that.)"""

    def __init__(self, config: dict[str, Any], w: Worker, nodes: list[str]):
        self.w = w
        self.side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaedist-mlflow")
        self.opening = self.side.submit(_open_logging, config, w, nodes)
        self.logger: tracking.RunLogger | tracking.NullLogger = tracking.NullLogger()
        self.startup_logged = False
        self.pending: list = []  # futures of epochs being logged

    def epoch(self, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        due = epoch % self.w.cfg.train.image_every == 0 or epoch == self.w.cfg.train.epochs
        snapshot = copy.deepcopy(self.w.core) if due else None  # the model as it is at the epoch's end
        self.pending.append(self.side.submit(self._log, dict(metrics), snapshot))

    def wait(self) -> None:
        """Until every submitted epoch is logged; a failed log fails the run, as one on this thread would."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def _log(self, metrics: dict[str, float], snapshot: BaseVAE | None) -> None:
        self.logger, pictures = self.opening.result()
        epoch = int(metrics["epoch"])
        if not self.startup_logged:
            self.logger.log_metrics({"startup_s": metrics["startup_s"]}, step=0)
            self.startup_logged = True
        # not per-epoch figures (startup_s is at step 0)
        once = ("epoch", "first_step_unix_s", "loop_entered_unix_s", "startup_s")
        self.logger.log_metrics({k: v for k, v in metrics.items() if k not in once}, step=epoch)
        if snapshot is not None:
            pictures.model = snapshot
            for key, image in pictures.render().items():
                self.logger.log_image(key, image, step=epoch)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every epoch's logs, then end the logger (system metrics); a failed log is raised unless
        the loop is already failing (its error is the one to see)."""
        self.side.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self.logger, _ = self.opening.result()
        self.logger.close()
        if raise_errors:
            for future in self.pending:
                future.result()


def _report_epoch(w: Worker, metrics: dict[str, float], cfg_flat: dict[str, Any], log: EpochLog | None) -> None:
    """Every rank reports (``ray.train.report`` is a barrier); rank 0 attaches the checkpoint, written while
    its epoch is being logged, and reports once the epoch is in MLflow."""
    epoch = int(metrics["epoch"])
    with tempfile.TemporaryDirectory() as d:
        folder = None
        if w.rank == 0:
            save_checkpoint(Path(d) / CHECKPOINT_FILE, w.core, w.optimizer, epoch, cfg_flat, metrics, w.facts)
            folder = Path(d)
        if log is not None:
            log.wait()
        w.place.report(metrics, folder, epoch)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker of a TorchTrainer."""
    run_worker(config, TrainPlace())


def run_worker(config: dict[str, Any], place: Place) -> None:
    """The loop at ``place``. ``config``: flat ExperimentConfig + data refs + run id + tracking URI + the
    driver's progress queue (None: no display, e.g. a Tune trial, whose progress Tune itself reports)."""
    entered = time.time()  # Ray's part of the start-up ends here, vaedist's (data, model, DDP) begins
    console.quiet_worker_console()
    w = _set_up_worker(config, place)
    nodes = _node_ids(w.world)
    queue = config.get("progress") if w.rank == 0 else None
    progress = console.StepReporter(queue.put_nowait if queue is not None else None)
    log = EpochLog(config, w, nodes) if w.rank == 0 else None  # MLflow, off the training thread
    first_step_at: list[float] = []  # wall clock of this worker's first step (start-up cost)
    with StopAtExit() as stop_at_exit:
        try:
            for epoch in range(w.start_epoch, w.cfg.train.epochs):

                def on_step(step: int, steps: int, epoch: int = epoch) -> None:
                    if not first_step_at:
                        first_step_at.append(time.time())
                    stop_at_exit.check()
                    _maybe_inject_fault(place, epoch, step)
                    progress.step(epoch + 1, step, steps)

                metrics = _run_epoch(w, epoch, on_step)
                metrics["first_step_unix_s"] = first_step_at[0] if first_step_at else 0.0
                metrics["loop_entered_unix_s"] = entered
                # Start-up: from the driver's fit() (or the Tune trial's start) to this process's first step.
                metrics["startup_s"] = max(0.0, metrics["first_step_unix_s"] - config["started_unix_s"])
                progress.epoch(metrics)
                if log is not None:
                    log.epoch(metrics)
                _report_epoch(w, metrics, config["experiment"], log)
        except BaseException:
            if log is not None:
                log.close(raise_errors=False)
            raise
        if log is not None:
            log.close()
