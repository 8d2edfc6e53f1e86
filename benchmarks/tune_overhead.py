"""Ray Tune overhead, side by side in one run: a search of 4 trials, 2 at a time, against the same 4
trials' pure training time (plain PyTorch loop, one thread each, also run 2 at a time).

    python benchmarks/tune_overhead.py [--epochs 6]

overhead = search wall time / (sum of pure training times / 2 concurrent) - 1, the pure times being the mean
of a run before and one after the search (the machine's speed drifts). The search wall time is
``run_tune`` from start to the champion registered, Ray already running (a search joins a running
cluster) and the MLflow store already created; it adds Tune's trial actors, each trial's start-up,
checkpoints, MLflow (parent and child runs, metrics, pictures) and the final registration. A trial of
one worker trains in the trial's own process (Tune's function API): no TorchTrainer controller, placement
group or worker process of its own; each trial's start-up (trial function entered -> first optimizer
step) is printed. Pure training is every epoch's training steps and validation pass, timed inside two
processes that each run 2 of the trials one after the other, so both sides share the 2 cores alike. The
default size makes each trial about 30 s of training on a 2-core machine.
Ends with one line per figure: ``<figure>: <value> (goal <op> <target>)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from vaedist.hardware import machine_line

SPACE = {"model.latent_dim": {"grid": [4, 8]}, "model.width": {"grid": [256, 512]}}


def pure_training_seconds(cfg) -> float:
    """The trial's work with no Ray and no MLflow: train epochs + validation, one thread."""
    from vaedist import loop
    from vaedist.data import get_spec, load_split
    from vaedist.models import build_model

    torch.set_num_threads(1)
    spec = get_spec(cfg.data.dataset)
    tx, ty = (
        torch.from_numpy(np.array(a))
        for a in load_split(cfg.data.dataset, "train", val_size=cfg.data.val_size)
    )
    vx, vy = (
        torch.from_numpy(np.array(a)) for a in load_split(cfg.data.dataset, "val", val_size=cfg.data.val_size)
    )
    loop.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective, optimizer = loop.ElboObjective(model), torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        indices = loop.epoch_indices(len(tx), epoch, cfg.train.seed)
        gen = torch.Generator().manual_seed(epoch)
        batches = loop.index_batches(tx, ty, indices, cfg.train.batch_size)
        loop.train_epoch(objective, model, optimizer, batches, len(indices) // cfg.train.batch_size,
                         lambda _: 1.0, 0.0, gen, torch.device("cpu"))  # fmt: skip
        loop.evaluate(model, vx, vy, np.arange(len(vx)), 512, 0, torch.device("cpu"))
    return time.perf_counter() - t0


def base_config(epochs: int):
    from vaedist.config import experiment_from_dict

    return experiment_from_dict({
        "data": {"dataset": "mnist"},
        "model": {"variant": "cvae", "arch": "dense", "depth": 2},
        "train": {"epochs": epochs, "batch_size": 128},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    })  # fmt: skip


def pure_trials(epochs: int, trials: list[tuple[int, int]]) -> list[float]:
    """Runs in a child process: the given trials one after the other."""
    base = base_config(epochs)
    return [
        pure_training_seconds(base.replace(**{"model.latent_dim": z, "model.width": w})) for z, w in trials
    ]


def trial_startups(parent_run_id: str) -> list[float]:
    """Each trial's ``startup_s`` (the worker's own clock) from its MLflow child run."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return [c.data.metrics["startup_s"] for c in children if "startup_s" in c.data.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    print(machine_line(), flush=True)

    work = tempfile.mkdtemp(prefix="vaedist-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    import multiprocessing

    import ray

    from vaedist.cluster import connect_ray
    from vaedist.config import TuneConfig
    from vaedist.tune import run_tune

    # Pure side: two processes, each running two trials in turn, so two trainings share the machine the
    # whole time, as in the search; Tune's grid order also runs the two width-256 trials first, together.
    # Run before and after the search: this shared machine's speed drifts by tens of per cent within
    # minutes, and the mean of the two sides it is measured between is the fair ideal.
    halves = [[(4, 256), (4, 512)], [(8, 256), (8, 512)]]

    def pure_side() -> list[float]:
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            return [t for half in pool.starmap(pure_trials, [(args.epochs, h) for h in halves]) for t in half]

    pure_before = pure_side()

    tune_cfg = TuneConfig(
        search_space=SPACE, num_samples=1, max_concurrent_trials=2, grace_period=args.epochs
    )
    t0 = time.perf_counter()
    connect_ray()  # the local Ray a `vaedist tune` starts: its workers' environment (console policy) too
    ray_start = time.perf_counter() - t0
    # A search records into a store that exists (a server, a team's database): the sqlite file's one-time
    # creation (schema migrations, ~2 s here) is not the search's, so it is made and timed apart.
    import mlflow

    t0 = time.perf_counter()
    mlflow.MlflowClient().search_experiments(max_results=1)
    store_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_tune(base_config(args.epochs), tune_cfg, job_name="bench-tune", storage=f"{work}/runs",
                      echo=lambda *_: None)  # fmt: skip
    wall = time.perf_counter() - t0
    startups = trial_startups(result.parent_run_id)
    ray.shutdown()
    pure_after = pure_side()
    pure = [(a + b) / 2 for a, b in zip(pure_before, pure_after, strict=True)]

    ideal = sum(pure) / 2
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(
        f"run: 4 trials x {args.epochs} epochs of MNIST, 2 at a time, 1 thread each"
    )
    print(
        f"  pure training per trial (2 at a time), mean of before and after the search: "
        f"{', '.join(f'{p:.1f}' for p in pure)} s (ideal search {ideal:.1f} s: "
        f"{sum(pure_before) / 2:.1f} s before, {sum(pure_after) / 2:.1f} s after)"
    )
    print(
        f"  search wall time (run_tune to champion registered): {wall:.1f} s ({phases}); trials: {len(result.table)}"
    )
    print(f"  trials phase alone (Tuner.fit) / ideal - 1: {result.seconds['trials'] / ideal - 1:.2f}; "
          f"before the search (not counted): Ray start {ray_start:.1f} s, "
          f"MLflow store creation {store_start:.1f} s")  # fmt: skip
    print(f"  per-trial start-up (trial function entered -> first optimizer step; MLflow child run, data, model): "
          f"{', '.join(f'{s:.1f}' for s in startups)} s")  # fmt: skip
    print(f"trial_seconds_mean: {sum(pure) / len(pure):.1f} (goal >= 30)")
    print(f"trial_startup_s_mean: {sum(startups) / max(len(startups), 1):.1f} (goal <= 3)")
    print(f"tune_overhead: {wall / ideal - 1:.2f} (goal <= 0.25)")


if __name__ == "__main__":
    from vaedist.console import configured

    with configured(False):  # the terminal policy a vaedist command runs under (set before Ray is imported)
        main()
