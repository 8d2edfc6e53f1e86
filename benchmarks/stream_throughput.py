"""Training fed from memory vs fed by the Ray Data stream, side by side in one run, on the same images.

    .venv/bin/python benchmarks/stream_throughput.py                   # 10 classes x 500 CIFAR-10 JPEGs
    .venv/bin/python benchmarks/stream_throughput.py --per-class 5000  # the whole train folder (45,000 + val)

Both paths feed the same conv CVAE through ``loop.train_epoch`` (a real optimizer step per batch, so the
figure is what training sees): the in-memory path indexes the decoded arrays (``load_split`` + ``index_batches``,
what ``train.py`` does today); the stream decodes JPEGs every epoch in Ray Data tasks
(``streaming.train_dataset`` -> ``streaming_split(1, equal=True)``, what Ray Train hands a worker ->
``shard_batches``). The model gets ``--threads`` torch threads in both (default 1: a streaming run leaves
the other cores to the decoding tasks). Images/s are steady state: the mean over epochs after the first.
Ends with one line per figure: ``<figure>: <value> (goal <op> <target>)``.

Goal (a ratio, so it holds on any machine): the stream at least half the in-memory rate on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vaedist.hardware import machine_line

GOAL = 0.5
MODEL = {"variant": "cvae", "arch": "conv", "latent_dim": 16, "base_channels": 32, "depth": 2}


def subset(src: Path, dst: Path, per_class: int) -> Path:
    """``per_class`` training JPEGs of each class, linked (not copied) into a folder of its own."""
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            (dst / folder.name / f.name).symlink_to(f)
    return dst


def fresh_model(dataset: str, seed: int):
    from vaedist import loop
    from vaedist.config import ModelConfig
    from vaedist.data import listed
    from vaedist.models import build_model

    spec = listed.listed_spec(dataset)
    loop.seed_everything(seed)
    model = build_model(ModelConfig(**MODEL), spec.image_shape, spec.num_classes, spec.default_likelihood)
    return loop.ElboObjective(model), model, torch.optim.Adam(model.parameters(), lr=1e-3)


def timed_epochs(dataset: str, epochs: int, batch: int, batches_of, steps: int) -> list[float]:
    """Images/s of each epoch: ``batches_of(epoch)`` through ``loop.train_epoch``."""
    from vaedist import loop

    objective, model, optimizer = fresh_model(dataset, seed=0)
    rates = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        t0 = time.perf_counter()
        sums = loop.train_epoch(objective, model, optimizer, batches_of(epoch), steps, lambda _: 1.0, 0.0,
                                generator, torch.device("cpu"))  # fmt: skip
        rates.append(sums.count / (time.perf_counter() - t0))
        assert sums.count == steps * batch, (sums.count, steps, batch)
    return rates


def in_memory(dataset: str, epochs: int, batch: int) -> tuple[list[float], float]:
    from vaedist import loop
    from vaedist.data import load_split

    t0 = time.perf_counter()
    images, labels = (torch.from_numpy(np.array(a)) for a in load_split(dataset, "train"))
    load_s = time.perf_counter() - t0

    def batches_of(epoch: int):
        return loop.index_batches(images, labels, loop.epoch_indices(len(labels), epoch, 0), batch)

    return timed_epochs(dataset, epochs, batch, batches_of, len(labels) // batch), load_s


def streamed(dataset: str, epochs: int, batch: int) -> list[float]:
    from vaedist import streaming

    rows = streaming.train_rows(dataset, 5000)
    shard = streaming.train_dataset(dataset, 5000, seed=0).streaming_split(1, equal=True)[0]
    steps = streaming.steps_per_epoch(rows, 1, batch)
    return timed_epochs(dataset, epochs, batch, lambda epoch: streaming.shard_batches(shard, batch, epoch, 0), steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train"
    ap.add_argument("--folder", type=Path, default=default, help=f"ROOT/<class>/<images> (default {default})")
    ap.add_argument("--per-class", type=int, default=500, help="images per class (default 500)")
    ap.add_argument("--epochs", type=int, default=3, help="at least 2: the first epoch (warm-up) is not counted")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model, both paths (default 1)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (steady-state rates skip the first epoch)")
    print(machine_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="vaedist-stream-"))
    os.environ["VAEDIST_CACHE_DIR"] = str(work / "decoded")  # the in-memory path decodes once, cold
    dataset = str(subset(args.folder, work / "images", args.per_class))
    torch.set_num_threads(args.threads)

    import ray
    import ray.data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    memory, load_s = in_memory(dataset, args.epochs, args.batch_size)
    stream = streamed(dataset, args.epochs, args.batch_size)
    ray.shutdown()

    steady = {"memory": statistics.mean(memory[1:]), "stream": statistics.mean(stream[1:])}
    ratio = steady["stream"] / steady["memory"]
    from vaedist import streaming

    print(f"run: torch x {args.threads} thread(s); "
          f"{streaming.train_rows(dataset, 5000)} training images of {args.folder}, batch {args.batch_size}")  # fmt: skip
    print(f"  in memory  per epoch: {', '.join(f'{r:,.0f}' for r in memory)} img/s (first load {load_s:.1f} s)")
    print(f"  streamed   per epoch: {', '.join(f'{r:,.0f}' for r in stream)} img/s (decoded every epoch)")
    print(f"in_memory_images_per_s: {steady['memory']:.0f} (goal > 0)")
    print(f"streaming_images_per_s: {steady['stream']:.0f} (goal > 0)")
    print(f"streaming_vs_in_memory: {ratio:.2f} (goal >= {GOAL})")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
