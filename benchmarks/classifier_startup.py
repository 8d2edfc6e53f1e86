"""One-worker classifier fits, side by side in one Ray: a Ray task (what vaedist runs) vs a one-worker
TorchTrainer (what it ran before issue 15).

The CAS classifier (``vaedist.evaluate.cas``: CASClassifier, the CAS recipe) is fitted on N real MNIST
training images and tested on the 10,000 real test images, alternately by ``cas.fit_one_worker`` (one Ray
task holding the worker's bundle) and ``cas.fit_ray_train`` (a TorchTrainer of one worker), R rounds
each, every fit under a fresh run name so nothing is reused. Figures: the median wall seconds of each
(driver side, from the call to the result), and their ratio. Both fit the same classifier with the same
data and threads: the difference is what each pays to start.

    python benchmarks/classifier_startup.py              # N = 2,000 images, 1 epoch, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from vaedist.hardware import machine_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="real training images per fit (default 2,000)")
    ap.add_argument("--rounds", type=int, default=3, help="fits of each kind, alternating (default 3)")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    work = tempfile.mkdtemp(prefix="vaedist-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if "VAEDIST_DATA_DIR" not in os.environ and (shared / "mnist").is_dir():
        os.environ["VAEDIST_DATA_DIR"] = str(shared)

    from vaedist.cluster import connect_ray, plan_workers
    from vaedist.config import EvaluateConfig, ResourcesConfig
    from vaedist.data import get_spec, load_split
    from vaedist.evaluate import cas

    connect_ray()
    plan = plan_workers(ResourcesConfig(workers=1))
    spec = get_spec("mnist")
    x, y = load_split("mnist", "train_full")
    test = load_split("mnist", "test")
    cfg = EvaluateConfig(dataset="mnist", classifier_epochs=1, seed=0)
    config = cas.classifier_config((x[: args.images], y[: args.images]), test, spec.image_shape,
                                   spec.num_classes, cfg, plan)  # fmt: skip
    seconds: dict[str, list[float]] = {"task": [], "ray_train": []}
    accuracy: dict[str, list[float]] = {"task": [], "ray_train": []}
    for r in range(args.rounds):
        for kind, fit in (("ray_train", cas.fit_ray_train), ("task", cas.fit_one_worker)):
            t0 = time.perf_counter()
            metrics = fit(f"bench-{kind}-{r}", config, plan, f"{work}/runs")
            seconds[kind].append(time.perf_counter() - t0)
            accuracy[kind].append(float(metrics["accuracy"]))
            print(f"  round {r + 1} {kind:9s}: {seconds[kind][-1]:5.1f} s, test accuracy {accuracy[kind][-1]:.4f}")

    task, train = statistics.median(seconds["task"]), statistics.median(seconds["ray_train"])
    print(f"run: {args.images} images, 1 epoch, {plan.torch_threads} torch thread(s)")
    print(f"one_worker_task_s: {task:.1f} (goal > 0)")
    print(f"one_worker_ray_train_s: {train:.1f} (goal > 0)")
    print(f"one_worker_task_vs_ray_train: {task / train:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
