"""Distributed training: the per-worker loop (DDP via ray.train.torch) and the TorchTrainer driver.

The Ray-specific lines are few and kept at the edges: ``train_loop_per_worker`` wraps the plain-PyTorch
core in ``vaedist.loop``; ``run_training`` checks resources, tracking and storage before anything starts,
then fits a TorchTrainer and logs/registers the best checkpoint in MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
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

from vaedist import loop, tracking
from vaedist.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model, save_checkpoint
from vaedist.config import ExperimentConfig, ResourcesConfig, from_flat
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.models import BaseVAE, build_model

# Fault injection for the fault-tolerance test: "epoch=E,step=S,rank=R". The worker of that rank exits
# hard at that step the first time only (a marker file next to the checkpoints remembers it).
FAULT_ENV = "VAEDIST_INJECT_FAULT"
NOISE_STREAM = 1  # derive_seed(seed, epoch, rank, NOISE_STREAM): eps draws, apart from the data-order stream
log = logging.getLogger("vaedist.train")
STORAGE_ENV = "VAEDIST_STORAGE_PATH"
DEFAULT_STORAGE = "vaedist-runs"
DONE_TAG = "vaedist.checkpoint"  # set on a train run once it finished: where its best checkpoint is
MODEL_TAG = "vaedist.model_uri"
VERSION_TAG = "vaedist.model_version"


def is_rank_zero() -> bool:
    """The one place that decides who logs and checkpoints."""
    return ray.train.get_context().get_world_rank() == 0


# --------------------------------------------------------------------------------------------------
# Ray connection and resource planning (driver side)


def worker_env() -> dict[str, str]:
    """Variables every Ray worker needs: where MLflow is and where the data are."""
    from vaedist.data import default_data_dir

    return {"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "VAEDIST_DATA_DIR": str(default_data_dir())}


def connect_ray(address: str | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray in-process; idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Inside a Ray job (vaedist submit, ray job submit) the job's runtime env may already set these;
    # Ray refuses to merge a key set twice, and the job's value is the one the user meant.
    job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}).get("env_vars") or {}
    runtime_env = {"env_vars": {k: v for k, v in worker_env().items() if k not in job_env}}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # The dashboard process also serves the State API that Ray Train's controller polls.
            # "local": a new in-process Ray, never some other Ray that happens to run on this machine.
            ray.init(address="local", runtime_env=runtime_env, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = first_line(exc)
        raise VaedistError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {first} "
            "(check --address / RAY_ADDRESS and that the head is running)"
        ) from None


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def scaling_config(self) -> ray.train.ScalingConfig:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ray.train.ScalingConfig(
            num_workers=self.workers, use_gpu=self.use_gpu, resources_per_worker=resources
        )


def plan_workers(
    res: ResourcesConfig, cluster: dict[str, float] | None = None, nodes: list[dict[str, float]] | None = None
) -> WorkerPlan:
    """Check the request against what the cluster has, now, instead of letting Ray wait forever.

    Ray Train V2 retries an unschedulable worker group indefinitely, so a request for GPUs on a
    CPU-only cluster would hang; ``use_gpu`` is derived from ``gpus_per_worker`` and checked here.
    Each worker is one bundle that must fit on one node, so the check is per node (``nodes``: each
    alive node's resources; by default read from Ray, or the whole ``cluster`` as one node).
    On an autoscaling cluster (``resources.scale_timeout_s`` > 0) the missing resources are first
    requested from the autoscaler and awaited for that long.
    """
    live = cluster is None  # read from Ray (and its autoscaler may add nodes), not given by a caller
    if live:
        cluster = ray.cluster_resources()
        nodes = node_resources() if nodes is None else nodes
    nodes = [cluster] if nodes is None else nodes
    if res.gpus_per_worker is None:  # GPUs where present: one per worker if every worker can have one
        res = dataclasses.replace(res, gpus_per_worker=1.0 if bundles_fit(nodes, 0, 1.0) >= res.workers else 0.0)
    if live and res.scale_timeout_s > 0 and _shortfall(res, nodes):
        cluster, nodes = _scale_up(res)
    short = _shortfall(res, nodes)
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if short == "GPU":
        raise UsageError(
            f"asked for {res.workers} worker(s) x {res.gpus_per_worker:g} GPU but the Ray cluster has "
            f"{gpus:g} GPU(s){_per_node(nodes, 'GPU')}; use --gpus-per-worker 0 to train on CPUs"
            + ("" if res.scale_timeout_s else ", or resources.scale_timeout_s to wait for an autoscaler")
        )
    cpus_per_worker = _cpus_per_worker(res, nodes)
    if short == "CPU":
        fit = max(1, bundles_fit(nodes, cpus_per_worker, res.gpus_per_worker))
        raise UsageError(
            f"asked for {res.workers} worker(s) x {cpus_per_worker:g} CPU but the Ray cluster has {cpus:g} "
            f"CPU(s){_per_node(nodes, 'CPU')}; use --workers {fit} or fewer CPUs per worker"
        )
    return WorkerPlan(res.workers, float(cpus_per_worker), float(res.gpus_per_worker))


def node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _per_node(nodes: list[dict[str, float]], key: str) -> str:
    if len(nodes) <= 1:
        return ""
    return f" ({' + '.join(f'{n.get(key, 0.0):g}' for n in nodes)} on {len(nodes)} nodes)"


def bundles_fit(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many (cpus, gpus) worker bundles the nodes hold, each bundle on one node."""
    total = 0
    for node in nodes:
        fit = math.floor(node.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else 2**31  # cpus 0: GPUs only
        if gpus > 0:
            fit = min(fit, math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
        total += fit
    return total


def _cpus_per_worker(res: ResourcesConfig, nodes: list[dict[str, float]]) -> float:
    """The request's CPUs per worker, else the most that still places every worker (at least 1)."""
    if res.cpus_per_worker:
        return res.cpus_per_worker
    total = sum(n.get("CPU", 0.0) for n in nodes)
    for cpus in range(max(1, math.floor(total / res.workers)), 1, -1):
        if bundles_fit(nodes, cpus, res.gpus_per_worker) >= res.workers:
            return float(cpus)
    return 1.0


def _shortfall(res: ResourcesConfig, nodes: list[dict[str, float]]) -> str | None:
    """'GPU' or 'CPU' if the nodes cannot hold the worker group at all, else None."""
    if res.gpus_per_worker > 0 and bundles_fit(nodes, 0, res.gpus_per_worker) < res.workers:
        return "GPU"
    if bundles_fit(nodes, _cpus_per_worker(res, nodes), res.gpus_per_worker) < res.workers:
        return "CPU"
    return None


def _scale_up(res: ResourcesConfig) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Ask the autoscaler for the worker group's bundles and wait until they exist (or time out)."""
    from ray.autoscaler.sdk import request_resources

    bundle = {"CPU": res.cpus_per_worker or 1.0}
    if res.gpus_per_worker:
        bundle["GPU"] = res.gpus_per_worker
    request_resources(bundles=[bundle] * res.workers)
    # The request stands until it is replaced: withdraw it when this driver exits, or the autoscaler
    # would keep those nodes up forever. (atexit runs last-registered first: before ray.shutdown.)
    atexit.unregister(_withdraw_resource_request)  # once, however many jobs this driver scaled up for
    atexit.register(_withdraw_resource_request)
    deadline = time.monotonic() + res.scale_timeout_s
    nodes = node_resources()
    while _shortfall(res, nodes) and time.monotonic() < deadline:
        time.sleep(5)
        nodes = node_resources()
    return ray.cluster_resources(), nodes


def _withdraw_resource_request() -> None:
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):
        if ray.is_initialized():
            request_resources(bundles=[])


def storage_path(path: str | None = None) -> str:
    """Where Ray keeps checkpoints: --storage-path, $VAEDIST_STORAGE_PATH, or ./vaedist-runs."""
    # Inside a Ray job the working directory is a temporary copy of the project: keep checkpoints in
    # the home folder instead, where they outlive the job.
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    default = str(Path.home() / DEFAULT_STORAGE) if in_job else DEFAULT_STORAGE
    path = path or os.environ.get(STORAGE_ENV) or default
    if "://" in path:
        return path  # s3://, gs://, ... : checked by pyarrow when Ray writes
    local = Path(path).expanduser().resolve()
    try:
        local.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"storage path {local} is not writable ({exc.strerror}); pass --storage-path to a writable folder"
        ) from None
    return str(local)


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_storage_shared(storage: str) -> None:
    """On a multi-node cluster, every node must see the same checkpoint folder (NFS, or s3://...).

    A node-local path would "work" until a worker on another node restores from a checkpoint it cannot
    see; instead, write a marker here and read it back from a task pinned to every alive node.
    """
    if "://" in storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len({n["NodeManagerAddress"] for n in nodes}) <= 1 and len(nodes) <= 1:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = os.urandom(8).hex()
    marker = Path(storage) / f".shared-check-{token}"
    marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0)(_read_marker)
        seen = ray.get([
            read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes
        ])  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, got in zip(nodes, seen, strict=True) if got != token]
    if blind:
        raise UsageError(
            f"storage path {storage} is not shared across nodes ({', '.join(sorted(set(blind)))} cannot see it): "
            "use a shared mount (NFS) on every node or an s3:// / gs:// URI via --storage-path or VAEDIST_STORAGE_PATH"
        )


def default_run_name(cfg: ExperimentConfig) -> str:
    """Deterministic from the config: the same command resumes, a changed config starts fresh."""
    import hashlib
    import json

    flat = {k: v for k, v in cfg.flatten().items() if not k.startswith("resources.")}
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.variant}-{cfg.model.arch}-{digest}"


class Generator(torch.nn.Module):
    """(z, label) -> images (B, C, H, W) in [0, 1]: the part of a VAE that MLflow serves."""

    def __init__(self, model: BaseVAE):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.generate(z, label if self.model.conditional else None)


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


def _maybe_inject_fault(cfg: dict, epoch: int, step: int, rank: int) -> None:
    spec = cfg.get("_fault")
    if not spec:
        return
    want = dict(part.split("=") for part in spec.split(","))
    if (int(want.get("epoch", -1)), int(want.get("step", -1)), int(want.get("rank", 0))) != (epoch, step, rank):
        return
    marker = Path(cfg["_marker_dir"]) / ".fault-injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec)
    # Crash only once the controller has registered the previous epoch's checkpoint, so the test
    # exercises "resume from the last checkpoint" rather than a race with the controller's polling.
    ray.train.get_all_reported_checkpoints(timeout_s=60)
    os._exit(1)  # a hard crash, as if the worker's node died


def _open_logging(config: dict[str, Any], cfg: ExperimentConfig, nodes: list, core: BaseVAE,
                  val_x: torch.Tensor, val_y: torch.Tensor, class_names: tuple[str, ...]):  # fmt: skip
    """Rank 0's MLflow run logger (tags, system metrics) and the fixed inputs of its pictures."""
    from vaedist.pictures import EpochPictures

    # The tracking URI comes explicitly from the driver: a worker's own cwd/env may differ.
    logger = tracking.RunLogger(config["run_id"], config["tracking_uri"])
    logger.set_tags({"vaedist.nodes": ",".join(n[:12] for n in nodes), "vaedist.num_nodes": len(set(nodes))})
    logger.start_system_metrics()
    pictures = EpochPictures(core, val_x.numpy(), val_y.numpy(), class_names, seed=cfg.train.seed)
    return logger, pictures


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config``: flat ExperimentConfig + data refs + run id."""
    cfg = from_flat(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()

    spec = get_spec(cfg.data.dataset)
    train_x, train_y, val_x, val_y = (torch.from_numpy(np.array(ray.get(r))) for r in config["data_refs"])
    num_dims = int(np.prod(spec.image_shape))

    loop.seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    core = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective = ray.train.torch.prepare_model(loop.ElboObjective(core))
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

    # Where every rank runs, so a user (and the multi-node test) can see the placement.
    nodes = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    else:
        nodes = [ray.get_runtime_context().get_node_id()]

    # Rank 0's MLflow client and picture inputs are opened on a side thread while the first steps run:
    # nothing is logged before the first epoch ends, and the ~2 s of imports and connecting would
    # otherwise hold back the first step (on a GPU worker the device would sit idle meanwhile).
    logger: tracking.RunLogger | tracking.NullLogger = tracking.NullLogger()
    pictures = None
    opening = None
    if is_rank_zero():
        side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaedist-mlflow")
        opening = side.submit(_open_logging, config, cfg, nodes, core, val_x, val_y, spec.class_names)
        side.shutdown(wait=False)
    per_rank_batch = max(1, cfg.train.batch_size // world)

    first_step_at: list[float | None] = [None]  # wall clock of this worker's first step (start-up cost)
    with StopAtExit() as stop_at_exit:
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                t0 = time.perf_counter()
                indices = loop.epoch_indices(len(train_x), epoch, cfg.train.seed, rank, world)
                steps = len(indices) // per_rank_batch
                generator = torch.Generator().manual_seed(loop.derive_seed(cfg.train.seed, epoch, rank))
                # The global RNG draws the reparameterization noise (and the AE's latent noise): seeded per
                # (epoch, rank) so DDP ranks draw different eps, and a resumed epoch draws what it drew before.
                torch.manual_seed(loop.derive_seed(cfg.train.seed, epoch, rank, NOISE_STREAM))

                def beta_at(step: int, epoch: int = epoch, steps: int = steps) -> float:
                    return loop.kl_weight(epoch, step, steps, cfg.train.beta, cfg.train.kl_warmup_epochs)

                def on_step(step: int, epoch: int = epoch) -> None:
                    if first_step_at[0] is None:
                        first_step_at[0] = time.time()
                    stop_at_exit.check()
                    _maybe_inject_fault(config, epoch, step, rank)

                train_sums = loop.train_epoch(
                    objective, core, optimizer, train_x, train_y, indices, per_rank_batch,
                    beta_at, cfg.train.free_bits, generator, device, on_step,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                val_sums = loop.evaluate(
                    core, val_x, val_y, loop.shard_range(len(val_x), rank, world), 512, cfg.train.seed, device
                )
                train_t, val_t = train_sums.as_tensor(), val_sums.as_tensor()
                if world > 1:
                    torch.distributed.all_reduce(train_t)
                    torch.distributed.all_reduce(val_t)
                tr, va = loop.Sums.means(train_t, num_dims), loop.Sums.means(val_t, num_dims)
                metrics = {
                    "epoch": epoch + 1,
                    "train_loss": tr["loss"],
                    "train_neg_elbo": tr["neg_elbo"],
                    "val_neg_elbo": va["neg_elbo"],
                    "val_recon": va["recon"],
                    "val_kl": va["kl"],
                    "val_bits_per_dim": va["bits_per_dim"],
                    "train_images_per_s": train_t[4].item() / max(seconds, 1e-9),
                    "beta": beta_at(steps),
                    "first_step_unix_s": first_step_at[0] or 0.0,
                }
                if opening is not None:
                    logger, pictures = opening.result()
                    opening = None
                logger.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "first_step_unix_s")}, step=epoch + 1)
                if is_rank_zero():
                    # Ray Train routes a worker's logging to the driver's console (print would be teed twice).
                    log.info(
                        f"[vaedist] epoch {epoch + 1}/{cfg.train.epochs}: train -ELBO {tr['neg_elbo']:.2f}, "
                        f"val -ELBO {va['neg_elbo']:.2f} nats ({va['bits_per_dim']:.4f} bits/dim), "
                        f"{metrics['train_images_per_s']:,.0f} img/s"
                    )
                last = epoch + 1 == cfg.train.epochs
                if pictures is not None and ((epoch + 1) % cfg.train.image_every == 0 or last):
                    for key, image in pictures.render().items():
                        logger.log_image(key, image, step=epoch + 1)

                with tempfile.TemporaryDirectory() as d:
                    ckpt = None
                    if is_rank_zero():
                        save_checkpoint(
                            Path(d) / CHECKPOINT_FILE, core, optimizer, epoch + 1, config["experiment"], metrics
                        )
                        ckpt = ray.train.Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
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
        raise UsageError(f"train.batch_size {cfg.train.batch_size} is larger than the {len(train[0])} training images")
    return [ray.put(np.ascontiguousarray(a)) for a in (*train, *val)]


# Config keys that say where a job ran, not what it is: never MLflow params (an address may hold a secret).
WHERE_IT_RAN = ("resources.address", "resources.entrypoint_num_cpus", "resources.entrypoint_num_gpus")


def experiment_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """MLflow params: the flattened config (minus where it ran) plus what was resolved from defaults."""
    params = {k: v for k, v in cfg.flatten().items() if k not in WHERE_IT_RAN}
    params["resolved.likelihood"] = cfg.likelihood
    return params


RUN_MARKER = ".vaedist-mlflow-run"


def claim_run_folder(storage: str, name: str, run_id: str) -> None:
    """Tie ``<storage>/<name>`` to one MLflow run, so Ray never resumes another run's checkpoints.

    Ray Train resumes from whatever checkpoints a run folder holds. A folder left by a run recorded in a
    different MLflow store (or by a deleted run) would silently hand this run its finished checkpoints.
    """
    if "://" in storage:
        return  # object stores: the name is derived from the config, the user owns the bucket
    folder = Path(storage) / name
    marker = folder / RUN_MARKER
    if marker.exists():
        owner = marker.read_text().strip()
        if owner != run_id:
            raise UsageError(
                f"{folder} holds checkpoints of another run (MLflow run {owner}, not {run_id} in "
                f"{tracking.shown_uri()}); use a new --name, another --storage-path, or delete that folder"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(
            f"{folder} already holds files that no vaedist run claims; use a new --name, another "
            "--storage-path, or delete that folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)


def build_trainer(
    cfg: ExperimentConfig,
    name: str,
    storage: str,
    run_id: str,
    plan: WorkerPlan,
    data_refs: list,
    callbacks: list | None = None,
) -> ray.train.torch.TorchTrainer:
    """One TorchTrainer; the same ``name`` and ``storage`` resume from its latest checkpoint."""
    claim_run_folder(storage, name, run_id)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.flatten(),
            "run_id": run_id,
            "tracking_uri": tracking.tracking_uri(),
            "_fault": os.environ.get(FAULT_ENV),
            "torch_threads": plan.torch_threads,
            "data_refs": data_refs,
            "_marker_dir": str(Path(storage) / name) if "://" not in storage else tempfile.gettempdir(),
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
        ),
    )


def register_checkpoint(checkpoint: ray.train.Checkpoint | str, run_id: str, dataset: str) -> tuple[str, str, bool, float]:
    """Log a checkpoint's generator to ``run_id``, register it, move ``champion`` if it is better.

    Once per run: a run that already registered its model (a rerun of a finished search, a search resumed
    after its registration) gets that version back, so reruns never pile up duplicate versions (and a
    pipeline's generate step, keyed on the version, finds its finished output).
    Returns (model URI, version, became champion, validation -ELBO).
    """
    registered = tracking.registered_model_of_run(run_id, MODEL_TAG, VERSION_TAG)
    if registered is not None:
        model_uri, version, val_metric, val_set = registered
        rescore = champion_rescorer(lambda: tracking.resolve_checkpoint(model_uri))
        moved, _ = tracking.promote_if_better(dataset, version, val_metric, val_set, rescore)
        return model_uri, version, moved, val_metric
    if isinstance(checkpoint, str):
        checkpoint = ray.train.Checkpoint(checkpoint)
    with checkpoint.as_directory() as d:
        ckpt_file = Path(d) / CHECKPOINT_FILE
        model, state = load_model(ckpt_file)
        val_metric = float(state["metrics"]["val_neg_elbo"])
        val_set = validation_set(state["config"], model)
        # Batch of 2: torch.export specialises a batch dimension of size 1 to a constant.
        z = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(0))
        example = (z, torch.arange(2, dtype=torch.int64)) if model.conditional else (z,)
        model_uri, version = tracking.log_model(
            run_id, dataset, ckpt_file, Generator(model), example, val_metric, val_set
        )
        tracking.set_run_tags(run_id, {MODEL_TAG: model_uri, VERSION_TAG: version})
        moved, _ = tracking.promote_if_better(
            dataset, version, val_metric, val_set, champion_rescorer(lambda: ckpt_file)
        )
    return model_uri, version, moved, val_metric


def validation_set(config: dict[str, Any], model: BaseVAE) -> str:
    """What a validation -ELBO was measured on: only numbers on the same images and pixel coding compare
    (a Bernoulli model's nats on binarized pixels say nothing against a logistic model's on 8-bit ones)."""
    coding = "binarized" if model.likelihood.binarized else "8-bit"
    return f"{config['data.dataset']}/val{config['data.val_size']}/{coding}"


def champion_rescorer(new_checkpoint):
    """``rescore`` for ``tracking.promote_if_better``: both models' -ELBO on the new model's validation set.

    Run on the driver, one process and one set of random draws for both, so the two numbers compare;
    None (no comparison, the champion stays) when they code pixels differently.
    """

    def rescore(champion_uri: str) -> tuple[float, float] | None:
        new_model, state = load_model(new_checkpoint())
        champion, _ = load_model(tracking.resolve_checkpoint(champion_uri))
        if (champion.likelihood.binarized, champion.image_shape) != (new_model.likelihood.binarized, new_model.image_shape):
            log.warning(
                f"[vaedist] not compared with the champion ({champion_uri}): it models "
                f"{'binarized' if champion.likelihood.binarized else '8-bit'} pixels, this model "
                f"{'binarized' if new_model.likelihood.binarized else '8-bit'} ones, so their -ELBOs do not compare; "
                "the champion stays (move the alias in the MLflow UI if you mean to)"
            )
            return None
        cfg = state["config"]
        seed = int(cfg.get("train.seed", 0))
        x, y = (torch.from_numpy(np.array(a)) for a in load_split(
            cfg["data.dataset"], "val", val_size=int(cfg["data.val_size"]), progress=False
        ))  # fmt: skip
        scores = []
        for model in (new_model, champion):
            torch.manual_seed(seed)  # the same eps draws for both
            sums = loop.evaluate(model, x, y, np.arange(len(x)), 512, seed, torch.device("cpu"))
            scores.append(loop.Sums.means(sums.as_tensor(), int(np.prod(model.image_shape)))["neg_elbo"])
        log.info(f"[vaedist] champion {champion_uri} re-scored on this model's validation set: "
                 f"{scores[1]:.2f} vs {scores[0]:.2f} nats")  # fmt: skip
        return scores[0], scores[1]

    return rescore


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
    connect_ray(cfg.resources.address)
    plan = plan_workers(cfg.resources)
    check_storage_shared(storage)
    done = tracking.finished_run(cfg.data.dataset, name)
    if done is not None:
        tracking.check_same_params(done, experiment_params(cfg), name)
    if done is not None and done.data.tags.get(DONE_TAG) and (done.data.tags.get(MODEL_TAG) or not register):
        # The same name finished before (same config: params are immutable): reuse it, train nothing.
        echo(f"{name} already trained (MLflow run {done.info.run_id}); reusing it - pass a new --name to retrain")
        return TrainResult(
            name=name, run_id=done.info.run_id, model_uri=done.data.tags.get(MODEL_TAG, ""),
            version=done.data.tags.get(VERSION_TAG, ""), checkpoint=done.data.tags[DONE_TAG],
            metrics=dict(done.data.metrics), champion=False,
        )  # fmt: skip

    data_refs = put_data(cfg, plan)
    params = experiment_params(cfg)
    run_id = tracking.find_or_create_run(cfg.data.dataset, name, params, kind="train", parent_run_id=parent_run_id)
    echo(f"training {name}: {plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU"
         f"{f' x {plan.gpus_per_worker:g} GPU' if plan.use_gpu else ''}; MLflow run {run_id} in {tracking.shown_uri(uri)}")  # fmt: skip
    try:
        trainer = build_trainer(cfg, name, storage, run_id, plan, data_refs)
    except UsageError:
        tracking.end_run(run_id, "FAILED")
        raise
    fit_started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        tracking.end_run(run_id, "FAILED")
        first = first_line(exc)
        raise VaedistError(f"training {name} failed: {first} (logs under {storage}/{name})") from None

    best = result.get_best_checkpoint("val_neg_elbo", "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise VaedistError(f"training {name} produced no checkpoint (see {storage}/{name})")
    model_uri, version, moved = "", "", False
    if register:
        model_uri, version, moved, _ = register_checkpoint(best, run_id, cfg.data.dataset)
    tracking.set_run_tags(run_id, {DONE_TAG: best.path})
    tracking.end_run(run_id, "FINISHED")
    return TrainResult(
        name=name,
        run_id=run_id,
        model_uri=model_uri,
        version=version,
        checkpoint=best.path,
        metrics={k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)},
        champion=moved,
        fit_started_unix_s=fit_started,
    )
