"""Ray Tune over Ray Train: search architecture size, latent size, epochs (and more) per dataset.

A trial of one worker runs the training loop in the trial's own process through Tune's function API
(``worker.run_worker`` at a ``places.TunePlace``: ``ray.tune.report`` with checkpoints,
``ray.tune.get_checkpoint`` to resume), with no Train controller, placement group or worker process of
its own. A trial of several workers is a Tune function that builds and fits a TorchTrainer with
``RunConfig(name=<search>-<trial id>, callbacks=[TuneReportCallback()])`` (the Ray 2.60 way,
docs/ARCHITECTURE.md "Facts of the stack"). ASHA stops weak trials early on validation -ELBO. MLflow gets one parent run per search and one child run per trial, so the UI's
compare / parallel-coordinates views show the search; the best trial's model is registered and becomes
``champion`` only if it beats the current one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from vaedist import console, tracking
from vaedist.champion import register_checkpoint
from vaedist.cluster import (
    WorkerPlan,
    bundles_fit,
    check_storage_shared,
    node_resources,
    plan_workers,
)
from vaedist.config import ExperimentConfig, TuneConfig, from_flat
from vaedist.errors import VaedistError
from vaedist.names import BEST_MODEL_TAG, BEST_TRIAL_TAG, STOPPED_EARLY_TAG, TRIAL_ID_TAG, VAL_METRIC
from vaedist.train import (
    WHERE_IT_RAN,
    TrainingData,
    build_trainer,
    experiment_params,
    log_training_data,
    put_data,
    start_driver,
    worker_config,
)


def to_tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """``{"model.latent_dim": {"choice": [8, 16]}}`` -> ``{"model.latent_dim": tune.choice([8, 16])}``."""
    out = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            out[key] = ray.tune.choice(args)
        elif kind == "grid":
            out[key] = ray.tune.grid_search(args)
        elif kind == "uniform":
            out[key] = ray.tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = ray.tune.loguniform(*args)
        elif kind == "randint":
            out[key] = ray.tune.randint(*args)
    return out


def max_epochs(base: ExperimentConfig, tune_cfg: TuneConfig) -> int:
    """ASHA's max_t: the most epochs any trial can ask for."""
    dist = tune_cfg.search_space.get("train.epochs")
    if not dist:
        return base.train.epochs
    kind, args = next(iter(dist.items()))
    # randint's upper bound is exclusive (Ray Tune, like numpy): randint [2, 9] draws at most 8 epochs.
    return int(max(args)) - 1 if kind == "randint" else int(max(args))


def concurrent_trials(
    plan: WorkerPlan, tune_cfg: TuneConfig, nodes: list[dict[str, float]] | None = None
) -> int:
    """How many trials fit at once: each needs ``workers`` bundles of (CPU, GPU), each on one node."""
    nodes = node_resources() if nodes is None else nodes
    fits = max(1, bundles_fit(nodes, plan.cpus_per_worker, plan.gpus_per_worker) // plan.workers)
    return min(fits, tune_cfg.max_concurrent_trials) if tune_cfg.max_concurrent_trials else fits


def search_name(job_name: str, base: ExperimentConfig, tune_cfg: TuneConfig) -> str:
    """Deterministic from the job and its config: a rerun of the same search resumes it."""
    payload = json.dumps(
        {"base": {k: v for k, v in base.flatten().items() if not k.startswith("resources.")},
         "tune": tune_cfg.__dict__}, sort_keys=True, default=str,
    )  # fmt: skip
    return f"{job_name}-{hashlib.sha1(payload.encode()).hexdigest()[:8]}"


def run_trial(
    config: dict[str, Any],
    base_flat: dict[str, Any],
    name: str,
    parent_run_id: str,
    storage: str,
    plan: WorkerPlan,
    data: TrainingData,
    tracking_uri: str,
) -> None:
    """One trial (runs in a Tune actor): merge the sampled values into the base config and fit."""
    # The driver's store, whatever this process's environment says: a Ray started before the driver set
    # $MLFLOW_TRACKING_URI (by the user, a notebook, a test) gave its workers another one.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    started = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    flat = {**base_flat, **config}
    trial_name = f"{name}-{trial_id}"
    params = {k: v for k, v in flat.items() if k not in WHERE_IT_RAN}

    def open_run(cfg: ExperimentConfig | None = None) -> str:
        run_id = tracking.find_or_create_run(
            flat["data.dataset"], trial_name, params, kind="trial", parent_run_id=parent_run_id
        )
        tracking.set_run_tags(run_id, {TRIAL_ID_TAG: trial_id})
        if cfg is not None:
            log_training_data(run_id, cfg)
        return run_id

    try:
        cfg = from_flat(flat)  # a ConfigError here fails this trial only; the search goes on
    except Exception:
        open_run()  # the child run exists even so: the trial shows up in MLflow as FAILED
        raise
    if plan.workers > 1:
        trainer = build_trainer(cfg, trial_name, storage, open_run(cfg), plan, data, callbacks=[TuneReportCallback()])
        trainer.fit()
        return
    from vaedist.places import TunePlace
    from vaedist.worker import run_worker

    # The MLflow child run is made on a side thread while the loop sets up and takes its first steps (~1 s
    # of a trial's start-up here): the worker needs its id only when it first logs, after the first epoch.
    side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaedist-trial-run")
    run_id = side.submit(open_run, cfg)
    side.shutdown(wait=False)
    run_worker(worker_config(cfg, run_id, plan, data, started=started), TunePlace())


@dataclass
class TuneResult:
    name: str
    parent_run_id: str
    table: list[dict[str, Any]]
    best_trial: str | None
    model_uri: str
    version: str
    champion: bool
    # Wall seconds per phase: "prepare" (checks, data into the object store, parent run), "trials"
    # (Tuner.fit), "register" (results table, champion). The tune-overhead benchmark reads them.
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def run_tune(
    base: ExperimentConfig,
    tune_cfg: TuneConfig,
    job_name: str = "tune",
    storage: str | None = None,
    echo=print,
) -> TuneResult:
    """Run (or resume) the search, then register the best trial's model."""
    started = time.perf_counter()
    uri, storage = start_driver(base, storage, echo)
    resources = base.resources
    if resources.cpus_per_worker is None:
        # One CPU per worker by default, so that trials run side by side (ASHA compares them as they go).
        resources = dataclasses.replace(resources, cpus_per_worker=1.0)
    plan = plan_workers(resources)
    check_storage_shared(storage)
    name = search_name(job_name, base, tune_cfg)
    dataset = base.data.dataset
    parent_params = {**experiment_params(base), "tune.search_space": json.dumps(tune_cfg.search_space),
                     "tune.num_samples": tune_cfg.num_samples, "tune.metric": tune_cfg.metric}  # fmt: skip
    parent_run_id = tracking.find_or_create_run(dataset, name, parent_params, kind="tune")
    concurrency = concurrent_trials(plan, tune_cfg)
    data = put_data(base, plan, concurrency)
    echo(f"search {name}: {tune_cfg.num_samples} trial(s), {concurrency} at a time, each {plan.workers} worker(s) "
         f"x {plan.cpus_per_worker:g} CPU; MLflow parent run {parent_run_id} in {tracking.shown_uri(uri)}")  # fmt: skip

    trainable = ray.tune.with_parameters(
        run_trial, base_flat=base.flatten(), name=name, parent_run_id=parent_run_id,
        storage=storage, plan=plan, data=data, tracking_uri=uri,
    )  # fmt: skip
    tuner = _tuner(trainable, base, tune_cfg, name, storage, concurrency, plan, echo)
    seconds = {"prepare": time.perf_counter() - started}
    mode = console.progress_mode(console.stderr_isatty(), console.is_verbose())
    with _showing(console.TrialDisplay(base.train.epochs, tune_cfg.metric, echo, mode)):
        grid = tuner.fit()
    seconds["trials"] = time.perf_counter() - started - seconds["prepare"]

    table = results_table(grid, tune_cfg, base)
    _close_child_runs(dataset, name, table)
    text = format_table(table, tune_cfg.metric)
    echo(text)
    logger = tracking.RunLogger(parent_run_id, uri)
    logger.log_text(text, "tune_results.txt")
    logger.log_text(table_csv(table), "tune_results.csv")

    best_row, metric, model_uri, version, moved = _register_best(
        table, tune_cfg, name, f"{storage.rstrip('/')}/{name}", parent_run_id, dataset, logger
    )
    echo(f"best trial {best_row['trial']}: {tune_cfg.metric} {metric:.2f} -> {model_uri}"
         f"{' (now champion)' if moved else ' (champion unchanged: it is at least as good)'}")  # fmt: skip
    seconds["register"] = time.perf_counter() - started - seconds["prepare"] - seconds["trials"]
    return TuneResult(name, parent_run_id, table, best_row["trial"], model_uri, version, moved, seconds)


def trial_resources(plan: WorkerPlan) -> dict[str, float]:
    """What a trial's own process reserves. One worker: the worker's CPUs / GPUs, since the loop runs in
    the trial. Several: the trial only waits on its TorchTrainer, whose workers hold the CPUs / GPUs; a
    CPU-less bundle (Tune refuses an empty one) keeps it from taking a core a worker needs."""
    if plan.workers == 1:
        return {"cpu": plan.cpus_per_worker, "gpu": plan.gpus_per_worker}
    return {"cpu": 0, "memory": 64 * 2**20}


def _tuner(trainable, base: ExperimentConfig, tune_cfg: TuneConfig, name: str, storage: str, concurrency: int,
           plan: WorkerPlan, echo) -> ray.tune.Tuner:  # fmt: skip
    """A new search, or the one of the same name resumed (its finished trials are not repeated)."""
    trainable = ray.tune.with_resources(trainable, trial_resources(plan))
    experiment_path = f"{storage.rstrip('/')}/{name}"
    if ray.tune.Tuner.can_restore(experiment_path):
        echo(f"resuming search {name} from {experiment_path} (finished trials are not repeated)")
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=False)
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs(base, tune_cfg),
        grace_period=tune_cfg.grace_period,
        reduction_factor=tune_cfg.reduction_factor,
    )
    # Seeded sampling; the generator itself caps concurrency (Tune ignores max_concurrent_trials when
    # given a search generator).
    search = ray.tune.search.BasicVariantGenerator(random_state=tune_cfg.seed, max_concurrent=concurrency)
    return ray.tune.Tuner(
        trainable,
        param_space=to_tune_space(tune_cfg.search_space),
        tune_config=ray.tune.TuneConfig(
            metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples,
            scheduler=scheduler, search_alg=search,
            # One-worker trials train in the trial actor: the next trial reuses its process (no process start,
            # torch and vaedist already imported). A multi-worker trial's actor only waits on its trainer.
            reuse_actors=plan.workers == 1,
        ),  # fmt: skip
        run_config=ray.tune.RunConfig(
            name=name, storage_path=storage, verbose=console.tune_verbosity(console.is_verbose()),
            callbacks=[TrialProgress()],
            # For one-worker trials, whose checkpoints Tune keeps and whose crashes Tune retries from the
            # last one; a multi-worker trial's TorchTrainer does both itself (build_trainer).
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=base.train.checkpoints_to_keep, checkpoint_score_attribute=VAL_METRIC,
                checkpoint_score_order="min",
            ),
            failure_config=ray.tune.FailureConfig(max_failures=base.train.max_failures if plan.workers == 1 else 0),
        ),  # fmt: skip
    )


class TrialProgress(ray.tune.Callback):
    """Tune calls these in this driver process for every trial; they draw on the display of the search
    running now. The display is looked up, not held: Tune pickles its callbacks into the search's
    tuner.pkl, and a resumed search runs the unpickled ones."""

    display: console.TrialDisplay | None = None

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.display is not None:
            self.display.start(trial.trial_id, trial.config.get("train.epochs"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.display is not None:
            self.display.result(trial.trial_id, int(result.get("epoch", 0)), result.get(self.display.metric))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.display is not None:
            self.display.end(trial.trial_id, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.display is not None:
            self.display.end(trial.trial_id, failed=True)


@contextlib.contextmanager
def _showing(display: console.TrialDisplay):
    TrialProgress.display = display
    try:
        yield
    finally:
        TrialProgress.display = None
        display.close()


def best_trial(table: list[dict[str, Any]], tune_cfg: TuneConfig) -> dict[str, Any] | None:
    """The row of the best trial that finished with a metric; None when every trial failed."""
    ok = [row for row in table if row["status"] != "ERROR" and row.get(tune_cfg.metric) is not None]
    if not ok:
        return None
    return (min if tune_cfg.mode == "min" else max)(ok, key=lambda r: r[tune_cfg.metric])


def _register_best(table, tune_cfg: TuneConfig, name: str, experiment_path: str, parent_run_id: str, dataset: str,
                   logger):  # fmt: skip
    """Register the best trial's model (champion if better) -> (row, metric, model URI, version, champion?)."""
    best_row = best_trial(table, tune_cfg)
    if best_row is None:
        tracking.end_run(parent_run_id, "FAILED")
        raise VaedistError(f"search {name}: every trial failed (see the child runs in MLflow and {experiment_path})")
    checkpoint = ray.train.Checkpoint(best_row["checkpoint"])  # a folder or s3://...: Ray materializes it
    model_uri, version, moved, metric = register_checkpoint(checkpoint, best_row["run_id"], dataset)
    logger.log_metrics({f"best_{tune_cfg.metric}": metric}, step=0)
    tracking.set_run_tags(parent_run_id, {BEST_TRIAL_TAG: best_row["trial"], BEST_MODEL_TAG: model_uri})
    tracking.end_run(parent_run_id, "FINISHED")
    return best_row, metric, model_uri, version, moved


def results_table(grid, tune_cfg: TuneConfig, base: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per trial: its params, best metric, epochs run, stopped early?, best checkpoint."""
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        config = result.config or _params_json(result.path)  # a trial that crashed early reported nothing
        params = {k: config.get(k) for k in tune_cfg.search_space}
        row: dict[str, Any] = {"trial": trial_id, **params, "status": "ERROR" if result.error else "OK"}
        df = result.metrics_dataframe
        if df is not None and len(df) and tune_cfg.metric in df:
            best_idx = (
                df[tune_cfg.metric].idxmin() if tune_cfg.mode == "min" else df[tune_cfg.metric].idxmax()
            )
            row[tune_cfg.metric] = float(df.loc[best_idx, tune_cfg.metric])
            row["checkpoint"] = _best_checkpoint(result, df, best_idx, tune_cfg)
            epochs_run = int(df["epoch"].max())
            wanted = int(result.config.get("train.epochs", base.train.epochs))
            row["epochs_run"] = epochs_run
            row["stopped_early"] = not result.error and epochs_run < wanted
        else:
            row.update({tune_cfg.metric: None, "checkpoint": None, "epochs_run": 0, "stopped_early": False})
        rows.append(row)
    return sorted(rows, key=lambda r: (r[tune_cfg.metric] is None, r[tune_cfg.metric] or 0))


def _best_checkpoint(result, df, best_idx, tune_cfg: TuneConfig) -> str | None:
    """A multi-worker trial's checkpoints are its TorchTrainer's (their paths reported as metrics by
    TuneReportCallback); a one-worker trial's are Tune's own (kept by the Tuner's CheckpointConfig)."""
    if "checkpoint_path" in df and isinstance(df.loc[best_idx, "checkpoint_path"], str):
        return df.loc[best_idx, "checkpoint_path"]
    if not result.best_checkpoints:
        return None
    best = result.get_best_checkpoint(tune_cfg.metric, tune_cfg.mode)
    return best.path if best is not None else None


def _trial_id_from_path(path: str) -> str:
    """Tune names trial folders ``<trainable>_<trial id>_<index>_<params>...``; the id is ``xxxxx_NNNNN``."""
    match = re.match(r"^[a-z_]+?_([0-9a-f]{5}_\d{5})", Path(path).name)
    return match.group(1) if match else Path(path).name


def _params_json(path: str) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def _close_child_runs(dataset: str, name: str, table: list[dict[str, Any]]) -> None:
    """A trial that ASHA stopped or that crashed never closes its own MLflow run: close it here."""
    for row in table:
        run_id = tracking.find_run(dataset, f"{name}-{row['trial']}")
        row["run_id"] = run_id
        if run_id:
            status = "FAILED" if row["status"] == "ERROR" else "FINISHED"
            tracking.set_run_tags(run_id, {STOPPED_EARLY_TAG: row["stopped_early"]})
            tracking.end_run(run_id, status)


def format_table(table: list[dict[str, Any]], metric: str) -> str:
    if not table:
        return "(no trials)"
    cols = [c for c in table[0] if c not in ("checkpoint", "run_id")]
    cells = [[_fmt(row.get(c)) for c in cols] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, "-" * len(line), *body])


def table_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
