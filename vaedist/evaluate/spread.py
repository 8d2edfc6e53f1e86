"""How evaluation spreads its work over Ray: three mechanisms, each where its pattern needs it.

- Ray tasks (likelihood): scoring test images is embarrassingly parallel. Each worker scores its own
  contiguous rows and nothing passes between workers until the per-image scores are concatenated, so a
  task per shard is the lightest unit that does it: no process group, no placement group, nothing to
  checkpoint, and the task's return value is the shard's scores (:func:`as_done`).
- Ray Train (a classifier on several workers: CAS, the audit's feature extractor): training one
  classifier on several workers averages gradients every step (DDP), so the workers must form a torch
  process group; Ray Train builds it, places the worker group, and keeps rank 0's reported result as a
  checkpoint, so a rerun of the same name hands the result back instead of training again.
- One Ray task (the same classifier on one worker, the default): with nothing to all-reduce, Ray
  Train's start-up buys nothing. Its ``fit()`` starts a controller, a placement group and its cleaner,
  a worker group, a preemption watcher and a dataset manager, each a fresh process: about 10 s before
  the loop runs on 2 CPUs (``benchmarks/train_throughput.py`` measures that floor), against ~3 s for a
  first task on a pooled worker (torch's import) and next to nothing for the next (docs/benchmarks.md).
  :func:`on_one_worker` runs the fit as a task holding the same bundle; :func:`keep` puts its result file
  where Ray Train's checkpoint of the same run name holds it, and :func:`kept` reads that file before
  either path fits, so neither trains again what the other finished.

All start the same way (:func:`start`: join Ray, plan one bundle per worker against what the nodes hold)
and hand the workers their arrays through the object store once (:func:`share`); inside a worker, torch
threads and device come from :func:`vaedist.checkpoint.load_worker_model` or Ray Train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vaedist.config import ResourcesConfig
from vaedist.errors import VaedistError

# The folder (under <storage>/<run name>) that holds a classifier's result: Ray Train's
# ``checkpoint_dir_name`` for rank 0's report, and the file a one-worker task's result is kept in.
RESULT_DIR = "classifier"


def start(resources: ResourcesConfig):
    """Join Ray (``resources.address``, $RAY_ADDRESS or a new local instance) and plan the workers:
    a :class:`vaedist.cluster.WorkerPlan`, checked now, since Ray would wait forever for what no node holds."""
    from vaedist.cluster import connect_ray, plan_workers

    connect_ray(resources.address)
    return plan_workers(resources)


def share(*objects: Any) -> list:
    """Object refs of ``objects`` (arrays contiguous), put once: every worker reads the same copy."""
    import ray

    return [ray.put(np.ascontiguousarray(o) if isinstance(o, np.ndarray) else o) for o in objects]


def as_done(pending: list, failed: str) -> Iterator[Any]:
    """The results of Ray tasks in the order they finish; a task's error becomes one line, ``failed``
    followed by the last line of Ray's report (where the worker's exception is)."""
    import ray

    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    except ray.exceptions.RayError as exc:
        text = str(exc).strip()
        raise VaedistError(f"{failed}: {text.splitlines()[-1] if text else type(exc).__name__}") from None


def on_one_worker(fn: Callable[[dict[str, Any]], Any], config: dict[str, Any], plan, failed: str) -> Any:
    """``fn(config)`` run as one Ray task holding the plan's single bundle (its CPUs, its GPU where it has
    one); its return value, or ``failed`` and Ray's last line as a :class:`VaedistError`."""
    import ray

    task = ray.remote(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)(fn)
    return next(as_done([task.remote(config)], failed))


def _result_folder(storage: str, name: str):
    from vaedist.files import join, resolve_folder

    fs, root, _ = resolve_folder(storage)
    return fs, join(join(root, name), RESULT_DIR)


def kept(storage: str, name: str, file: str) -> bytes | None:
    """The bytes of ``<storage>/<name>/classifier/<file>``: a finished fit's result, or None."""
    import pyarrow.fs as pafs

    from vaedist.files import join

    fs, folder = _result_folder(storage, name)
    path = join(folder, file)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def keep(storage: str, name: str, file: str, data: bytes) -> None:
    """Write a one-worker fit's result file where Ray Train's checkpoint of that run name keeps it
    (whole or absent: written under a temporary name, then renamed)."""
    from vaedist.files import write_atomic

    fs, folder = _result_folder(storage, name)
    fs.create_dir(folder, recursive=True)
    write_atomic(fs, folder, file, data)
