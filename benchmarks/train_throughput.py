"""Training throughput, side by side in one run: plain PyTorch vs Ray Train (1 worker x 2 threads,
2 workers x 1 thread), same model, same data, same total CPU threads.

    python benchmarks/train_throughput.py [--epochs 3] [--dataset mnist]

Images/s are steady-state: the mean over epochs after the first (the first pays for start-up and
warm-up), measured around the training steps only, for all three set-ups alike. "fit to first batch"
is the wall time from ``TorchTrainer.fit()`` (in ``run_training``) to the first optimizer step on a worker,
split where the seconds go: Ray Train's part (``fit()`` until vaedist's loop is entered on the worker:
controller, placement group, worker processes, gloo group) and vaedist's (loop entered -> first step:
data from the object store, model, DDP wrap). Beside it, in the same Ray instance, Ray Train's floor: a
TorchTrainer of the same shape whose loop does nothing, ``fit()`` to that loop entered. The start-up goal
is vaedist's part alone (at most 2 s), printed beside that floor: Ray Train's own start-up is not
vaedist's to shorten (on 2 cores it alone exceeds what the whole once aimed at).
Ends with one line per figure: ``<figure>: <value> (goal <op> <target>)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from vaedist.hardware import machine_line


def plain_loop(cfg, epochs: int, threads: int) -> list[float]:
    from vaedist import loop
    from vaedist.data import get_spec, load_split
    from vaedist.models import build_model

    torch.set_num_threads(threads)
    spec = get_spec(cfg.data.dataset)
    images, labels = load_split(cfg.data.dataset, "train", val_size=cfg.data.val_size)
    images_t, labels_t = torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels))
    loop.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective = loop.ElboObjective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    rates = []
    for epoch in range(epochs):
        indices = loop.epoch_indices(len(images_t), epoch, cfg.train.seed)
        generator = torch.Generator().manual_seed(loop.derive_seed(cfg.train.seed, epoch, 0))
        t0 = time.perf_counter()
        batches = loop.index_batches(images_t, labels_t, indices, cfg.train.batch_size)
        sums = loop.train_epoch(objective, model, optimizer, batches, len(indices) // cfg.train.batch_size,
                                lambda _: cfg.train.beta, 0.0, generator, torch.device("cpu"))  # fmt: skip
        rates.append(sums.count / (time.perf_counter() - t0))
    return rates


def ray_train(cfg, name: str, storage: str) -> tuple[list[float], float, float]:
    """(images/s per epoch, fit() -> loop entered on rank 0, loop entered -> first step) of one run."""
    import mlflow

    from vaedist import tracking
    from vaedist.train import run_training

    result = run_training(cfg, name=name, storage=storage, register=False, echo=lambda *_: None)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    history = sorted(client.get_metric_history(result.run_id, "train_images_per_s"), key=lambda m: m.step)
    m = result.metrics  # rank 0's clock and the driver's: the same machine
    return ([h.value for h in history], m["loop_entered_unix_s"] - result.fit_started_unix_s,
            m["first_step_unix_s"] - m["loop_entered_unix_s"])  # fmt: skip


def entered_at(path: str) -> None:
    """A loop that only notes when it was entered (in ``path``, one line per worker)."""
    import ray.train

    with open(path, "a") as f:
        f.write(f"{ray.train.get_context().get_world_rank()} {time.time()}\n")


def ray_train_floor(workers: int, cpus: float, storage: str) -> float:
    """Seconds from ``fit()`` to a do-nothing loop entered (the last rank): Ray Train's own start-up."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from vaedist import console

    path = os.path.join(storage, f"entered-{workers}x{cpus:g}.txt")
    trainer = TorchTrainer(
        lambda: entered_at(path),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        # Ray Train's loggers at vaedist's level, as its trainers have them (no INFO lines on the terminal).
        run_config=ray.train.RunConfig(
            name=f"floor-{workers}x{cpus:g}", storage_path=storage, logging_config=console.train_logging_config()
        ),
    )
    t0 = time.time()
    trainer.fit()
    with open(path) as f:
        return max(float(line.split()[1]) for line in f) - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first epoch (warm-up) is not counted")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (steady-state rates skip the first epoch)")
    print(machine_line(), flush=True)

    work = tempfile.mkdtemp(prefix="vaedist-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    import ray

    from vaedist.config import experiment_from_dict

    base = {
        "data": {"dataset": args.dataset},
        "model": {"variant": "cvae", "arch": "conv", "latent_dim": 16, "base_channels": 32, "depth": 2},
        "train": {"epochs": args.epochs, "batch_size": 128, "image_every": 1000},
    }
    plain = plain_loop(experiment_from_dict(base), args.epochs, threads=2)
    from vaedist.cluster import connect_ray

    connect_ray()  # the local Ray a `vaedist train` starts (its environment for the workers too)
    one = experiment_from_dict({**base, "resources": {"workers": 1, "cpus_per_worker": 2}})
    two = experiment_from_dict({**base, "resources": {"workers": 2, "cpus_per_worker": 1}})
    r1, ray1, ours1 = ray_train(one, "bench-1x2", f"{work}/runs")
    r2, ray2, ours2 = ray_train(two, "bench-2x1", f"{work}/runs")
    floor2 = ray_train_floor(2, 1, f"{work}/runs")
    floor1 = ray_train_floor(1, 2, f"{work}/runs")
    ray.shutdown()
    first1, first2 = ray1 + ours1, ray2 + ours2

    steady = {k: statistics.mean(v[1:]) for k, v in {"plain": plain, "1x2": r1, "2x1": r2}.items()}
    print(f"run: {args.epochs} epochs of {args.dataset}")
    for key, rates in {"plain 2 threads": plain, "Ray 1 worker x 2 threads": r1, "Ray 2 workers x 1 thread": r2}.items():
        print(f"  {key:26s} per epoch: {', '.join(f'{r:,.0f}' for r in rates)} img/s")
    print(f"  fit() to first step: 1x2 {first1:.1f} s (the session's first fit), 2x1 {first2:.1f} s")
    print(f"    Ray Train's part (fit() -> loop entered): 1x2 {ray1:.1f} s, 2x1 {ray2:.1f} s")
    print(f"    vaedist's part (loop entered -> first step: data, model, DDP): 1x2 {ours1:.1f} s, 2x1 {ours2:.1f} s")
    print(f"    Ray Train's floor, a do-nothing loop in the same Ray: 1x2 {floor1:.1f} s, 2x1 {floor2:.1f} s")
    print(f"ray_2x1_vs_plain: {steady['2x1'] / steady['plain']:.2f} (goal >= 1.05)")
    print(f"ray_1x2_vs_plain: {steady['1x2'] / steady['plain']:.2f} (goal >= 0.95)")
    print(f"plain_images_per_s: {steady['plain']:.0f} (goal > 0)")
    print(f"fit_to_first_batch_s: {max(first1, first2):.1f} (Ray Train's part {max(ray1, ray2):.1f} s "
          f"+ vaedist's part {max(ours1, ours2):.1f} s)")  # fmt: skip
    # vaedist's share of the start-up, beside Ray Train's own floor measured in this same Ray.
    print(f"ray_train_floor_s: {max(floor1, floor2):.1f} (goal > 0; a do-nothing loop, fit() -> loop entered)")
    print(f"vaedist_part_of_first_batch_s: {max(ours1, ours2):.1f} (goal <= 2; loop entered -> first step)")


if __name__ == "__main__":
    from vaedist.console import configured

    with configured(False):  # the terminal policy a vaedist command runs under (set before Ray is imported)
        main()
