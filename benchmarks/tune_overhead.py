"""Ray Tune overhead, side by side in one run: a search of 4 trials, 2 at a time, against the sum of the
same 4 trials' pure training time (plain PyTorch loop, one thread each, run one after another).

    python benchmarks/tune_overhead.py [--epochs 2]

overhead = search wall time / (sum of pure training times / 2 concurrent) - 1. Pure training time
is every epoch's training steps and validation pass; the search adds Ray start-up, Tune's trial actors,
TorchTrainer start-up per trial, checkpoints and MLflow logging (metrics, pictures, child runs). The
default size makes each trial about 30 s of training on this 2-core machine.
Ends with one line per figure: ``<figure>: <value> (goal <op> <target>)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

SPACE = {"model.latent_dim": {"grid": [4, 8]}, "model.width": {"grid": [256, 512]}}


def pure_training_seconds(cfg) -> float:
    """The trial's work with no Ray and no MLflow: train epochs + validation, one thread."""
    from vaedist import loop
    from vaedist.data import get_spec, load_split
    from vaedist.models import build_model

    torch.set_num_threads(1)
    spec = get_spec(cfg.data.dataset)
    tx, ty = (torch.from_numpy(np.array(a)) for a in load_split(cfg.data.dataset, "train", val_size=cfg.data.val_size))
    vx, vy = (torch.from_numpy(np.array(a)) for a in load_split(cfg.data.dataset, "val", val_size=cfg.data.val_size))
    loop.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, spec.image_shape, spec.num_classes, cfg.likelihood)
    objective, optimizer = loop.ElboObjective(model), torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        indices = loop.epoch_indices(len(tx), epoch, cfg.train.seed)
        gen = torch.Generator().manual_seed(epoch)
        loop.train_epoch(objective, model, optimizer, tx, ty, indices, cfg.train.batch_size,
                         lambda _: 1.0, 0.0, gen, torch.device("cpu"))  # fmt: skip
        loop.evaluate(model, vx, vy, np.arange(len(vx)), 512, 0, torch.device("cpu"))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="vaedist-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    import ray

    from vaedist.config import TuneConfig, experiment_from_dict
    from vaedist.tune import run_tune

    base = experiment_from_dict({
        "data": {"dataset": "mnist"},
        "model": {"variant": "cvae", "arch": "dense", "depth": 2},
        "train": {"epochs": args.epochs, "batch_size": 128},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    })  # fmt: skip
    tune_cfg = TuneConfig(search_space=SPACE, num_samples=1, max_concurrent_trials=2, grace_period=args.epochs)
    pure = [pure_training_seconds(base.replace(**{"model.latent_dim": z, "model.width": w}))
            for z in (4, 8) for w in (256, 512)]  # fmt: skip

    t0 = time.perf_counter()
    ray.init(num_cpus=2)
    result = run_tune(base, tune_cfg, job_name="bench-tune", storage=f"{work}/runs", echo=lambda *_: None)
    wall = time.perf_counter() - t0
    ray.shutdown()

    ideal = sum(pure) / 2
    print(f"machine: {os.cpu_count()} CPUs; 4 trials x {args.epochs} epochs of MNIST, 2 at a time, 1 thread each")
    print(f"  pure training per trial: {', '.join(f'{p:.1f}' for p in pure)} s (ideal search {ideal:.1f} s)")
    print(f"  search wall time (Ray start to champion registered): {wall:.1f} s; trials: {len(result.table)}")
    print(f"trial_seconds_mean: {sum(pure) / len(pure):.1f} (goal >= 30)")
    print(f"tune_overhead: {wall / ideal - 1:.2f} (goal <= 0.10)")


if __name__ == "__main__":
    main()
