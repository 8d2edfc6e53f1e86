"""Where work runs: connect to Ray, plan workers and actors against what the nodes hold, storage checks.

One rule for "GPUs where present" (``gpus_where_present``) serves training workers, Tune trials and
generate actors. Every plan is checked per node (a worker or an actor is one bundle on one node) before
anything starts, because Ray waits forever for a bundle no node can hold. The planners take plain
resource dicts, so they are unit-tested without Ray; the functions that read Ray's node list are marked.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from vaedist import console, tracking
from vaedist.config import ResourcesConfig
from vaedist.errors import UsageError, VaedistError, first_line, redact_url

STORAGE_ENV = "VAEDIST_STORAGE_PATH"
DEFAULT_STORAGE = "vaedist-runs"
RUN_MARKER = ".vaedist-mlflow-run"


def worker_env() -> dict[str, str]:
    """Variables every Ray worker needs: where MLflow is, where the data are, what reaches the terminal."""
    from vaedist.data import default_data_dir

    return {
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
        "VAEDIST_DATA_DIR": str(default_data_dir()),
        **console.worker_env(os.environ),
    }


# A new local Ray instance lives and dies with this process: no node of it is ever drained or preempted,
# so Ray Train's preemption watcher (one more process per fit(), ~1 s of start-up on 2 CPUs, and a
# core_worker.cc "max_restarts > 0" error line on every run) watches for nothing. Clusters keep it.
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def is_local(address: str | None) -> bool:
    """Whether work runs on a new in-process Ray instance (no ``--address``, no ``$RAY_ADDRESS``)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def head_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that a Ray address names: ``host:port`` (the head's GCS) or ``ray://host:port`` (Ray
    Client); None for what only Ray resolves (``auto``, ``local``, a name without a port)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in rest:
        return None
    return host.strip("[]"), int(port)


def check_head_answers(address: str, timeout_s: float = 5.0) -> None:
    """ConnectionError at once where nothing listens at ``address``: ``ray.init`` would retry for
    minutes, printing C++ warnings, before it gives up."""
    endpoint = head_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {endpoint[0]}:{endpoint[1]} ({first_line(exc)})") from None


def connect_ray(address: str | None = None) -> str | None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray in-process; idempotent.

    Returns a line for the user saying where work runs (None when Ray was connected already).
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    local = is_local(address)
    env = worker_env() | (LOCAL_ONLY_ENV if local else {})
    # Workers' output still reaches this terminal (log_to_driver), for their warnings and errors; their
    # INFO lines are kept off it at the source (console.worker_env, RunConfig's LoggingConfig). The
    # logging_level is this driver's "ray" logger's ("Started a local Ray instance", Tune's INFO lines).
    level = console.ray_logging_level(console.is_verbose())
    console.drop_token_auth_notice()
    # Every command that starts Ray records an MLflow run next: its store opens while Ray starts. MLflow is
    # imported there first, before the environment below is changed for ray.init (it reads it at import).
    tracking.open_store_in_background()
    try:
        if local:
            # A new local instance's processes (raylet, and the workers it starts) inherit this process's
            # environment, so the workers get theirs from it rather than from a runtime env: a job with a
            # runtime env, even env_vars only, cannot use the workers Ray prestarts at ray.init (one per
            # CPU), and each actor then waits for a fresh process. Measured on 2 CPUs: an actor ready
            # 1.1 s after creation instead of 2.1 s; a whole `vaedist generate` of 40,000 images in
            # 13.5-14.6 s instead of 14.7-18.0 s (docs/benchmarks.md). Without an address, "local": a new in-process
            # Ray, never some other Ray that happens to run on this machine. Its dashboard also serves
            # the State API that Ray Train's controller polls.
            with console.environment(env):
                context = ray.init(address="local", log_to_driver=True, logging_level=level)
        else:
            check_head_answers(address)
            # Inside a Ray job (vaedist submit, ray job submit) the job's runtime env may already set
            # these; Ray refuses to merge a key set twice, and the job's value is the one the user meant.
            job_env = (
                json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
            ).get("env_vars") or {}
            runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in job_env}}
            context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = first_line(exc)
        raise VaedistError(
            f"cannot connect to Ray at {redact_url(address) if address else 'a new local instance'}: {first} "
            "(check --address / RAY_ADDRESS and that the head is running)"
        ) from None
    where = f"the Ray cluster at {redact_url(address)}" if address else "a new local instance"
    dashboard = getattr(context, "dashboard_url", None)  # "host:port", or "" without a dashboard
    return f"Ray: {where}" + (f", dashboard http://{dashboard.removeprefix('http://')}" if dashboard else "")


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
    if res.gpus_per_worker is None:
        res = dataclasses.replace(res, gpus_per_worker=gpus_where_present(res.workers, nodes))
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


def gpus_where_present(workers: int, nodes: list[dict[str, float]]) -> float:
    """GPUs per worker when the request names none: one each if every worker can have its own, else 0."""
    return 1.0 if bundles_fit(nodes, 0, 1.0) >= workers else 0.0


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


@dataclass(frozen=True)
class ActorPlan:
    workers: int
    num_cpus: float  # reserved per actor: leaves a CPU for Ray Data's own tasks
    num_gpus: float
    threads: int  # torch threads of each shard an actor renders
    calls: int = 1  # shards an actor renders at once (threads x calls: the CPUs it stands for)
    # Ray Data restarts a lost pool actor and retries its shard (a preempted node on a cluster); off on a
    # local instance (``is_local``), where nothing is preempted: a crash fails the run at once, a rerun
    # resumes, and the driver's core worker logs no error line about restartable actors (ray#53727).
    restarts: bool = True

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    def for_shards(self, shards: int) -> ActorPlan:
        """The plan for ``shards`` to render: where there are fewer than the actors' calls, each shard gets
        the torch threads of the calls that would sit idle (a 1-shard job still uses every core)."""
        if self.use_gpu or shards >= self.workers * self.calls:
            return self
        calls = max(1, -(-shards // self.workers))  # ceil
        return dataclasses.replace(self, threads=self.threads * self.calls // calls, calls=calls)


def plan_actors(res: ResourcesConfig, nodes: list[dict[str, float]]) -> ActorPlan:
    """Check a generate/evaluate actor pool against the nodes now (Ray would wait forever for a missing GPU).

    ``nodes``: each alive node's resources (``node_resources()``). An actor lives on one node.
    """
    cpus = sum(float(n.get("CPU", 0.0)) for n in nodes)
    gpus = sum(float(n.get("GPU", 0.0)) for n in nodes)
    node_cpus = max((float(n.get("CPU", 0.0)) for n in nodes), default=cpus)
    w = res.workers
    g = float(res.gpus_per_worker) if res.gpus_per_worker is not None else gpus_where_present(w, nodes)
    if g > 0 and bundles_fit(nodes, 0, g) < w:
        raise UsageError(
            f"asked for {w} worker(s) x {g:g} GPU but the Ray cluster has {gpus:g} GPU(s){_per_node(nodes, 'GPU')}; "
            "use --gpus-per-worker 0 to run on CPUs"
        )
    if res.cpus_per_worker is not None and res.cpus_per_worker * w > cpus:
        raise UsageError(
            f"asked for {w} worker(s) x {res.cpus_per_worker:g} CPU but the Ray cluster has {cpus:g} CPU(s)"
        )
    if g == 0 and w > cpus:
        raise UsageError(
            f"asked for {w} decoder worker(s) but the Ray cluster has {cpus:g} CPU(s); use --workers {max(1, int(cpus))}"
        )
    if res.cpus_per_worker is not None and res.cpus_per_worker > node_cpus:
        raise UsageError(
            f"asked for {res.cpus_per_worker:g} CPU per worker but the largest Ray node has {node_cpus:g}; "
            "an actor runs on one node: use --cpus-per-worker <= that"
        )
    # By default an actor takes its share of the cluster, at most one node's CPUs (a larger request could
    # never be placed, and Ray would wait for it forever).
    share = res.cpus_per_worker or min(cpus / w, node_cpus)
    cores = max(1, int(share))
    headroom = 1.0 if cpus >= 2 else cpus / 2  # a CPU left for Ray Data's own tasks
    num_cpus = round(min(float(share), (cpus - headroom) / w), 3)
    # A CPU actor renders one shard per core it stands for, each on one torch thread: the small
    # convolutions of these decoders gain little from threads inside an op (on 2 cores, two one-thread
    # decoders ran 1.2-1.6x the images/s of one two-thread call in a main thread, where an actor's single
    # call runs, and 1.0-1.25x one in a pool thread), and one shard's encoding and Parquet write overlap
    # another's decoding: end to end after start-up, 0.68 -> 0.78-0.97 of the better bare way
    # (benchmarks/generate_throughput.py, docs/benchmarks.md). A GPU actor renders one shard at a time.
    threads, calls = (cores, 1) if g > 0 else (1, cores)
    return ActorPlan(w, max(num_cpus, 0.001), g, threads, calls)


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
