"""Where a training loop runs: a rank of a Ray Train worker group, or a Tune trial's own process.

The loop in ``worker.py`` asks its place four things: who am I (rank, world, device), wrap my model,
where do I resume from, and take this epoch's report (metrics + checkpoint). A multi-worker run gets
``TrainPlace`` (DDP through ``ray.train.torch``; ``ray.train.report`` is a barrier every rank calls). A
single-worker Tune trial gets ``TunePlace``: Tune's function API (``ray.tune.report`` /
``ray.tune.get_checkpoint``) in the trial's own process, so a trial pays for no Train controller,
placement group, worker process or gloo group (those were ~13 s of each ~34 s trial here: docs/benchmarks.md).

The Ray imports are inside the methods: a Tune trial never imports ``ray.train.torch`` (~1 s), and this
module loads without Ray for the plain-PyTorch tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch


class Place(Protocol):
    rank: int
    world: int
    device: torch.device
    run_name: str  # the Ray Train run or Tune trial name (the fault-injection hook matches on it)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def resume_from(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None: ...

    def wait_for_checkpoints(self) -> None: ...

    def train_stream(self, dataset: str, val_size: int, seed: int, decode_cpus: float) -> Any: ...


@contextlib.contextmanager
def _folder_of(checkpoint) -> Iterator[Path | None]:
    """A Ray checkpoint as a local folder for the ``with`` block (None: nothing to resume from)."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


class TrainPlace:
    """A rank of a Ray Train worker group (DDP over gloo / NCCL)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name = ctx.get_experiment_name()
        self.device = ray.train.torch.get_device()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # to the device, DDP when world > 1

    def resume_from(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return _folder_of(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")

    def wait_for_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=60)

    def train_stream(self, dataset: str, val_size: int, seed: int, decode_cpus: float) -> Any:
        """This rank's share of the streamed train split (the trainer's ``datasets["train"]``, split
        equally among the ranks by ``streaming.dataset_config``)."""
        import ray.train

        return ray.train.get_dataset_shard("train")


class TunePlace:
    """A single-worker Tune trial, run in the trial's process (Tune's function API; no DDP)."""

    def __init__(self) -> None:
        import ray
        import ray.tune

        from vaedist import console

        console.quiet_trial_console()
        self.rank, self.world = 0, 1
        self.run_name = ray.tune.get_context().get_trial_name()
        gpus = ray.get_gpu_ids()  # what Tune gave this trial; CUDA_VISIBLE_DEVICES is set to them
        self.device = torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def resume_from(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.tune

        return _folder_of(ray.tune.get_checkpoint())  # set when Tune restores the trial (resumed search, retry)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    def wait_for_checkpoints(self) -> None:
        pass  # ray.tune.report persists the checkpoint before it returns

    def train_stream(self, dataset: str, val_size: int, seed: int, decode_cpus: float) -> Any:
        """The whole streamed train split (one worker: no split), read by this trial."""
        import ray.data

        from vaedist import streaming

        ray.data.DataContext.get_current().enable_progress_bars = False
        return streaming.train_dataset(dataset, val_size, seed, num_cpus=decode_cpus).iterator()

