"""How evaluation spreads its work over Ray: two mechanisms, each where its pattern needs it.

- Ray tasks (likelihood): scoring test images is embarrassingly parallel. Each worker scores its own
  contiguous rows and nothing passes between workers until the per-image scores are concatenated, so a
  task per shard is the lightest unit that does it: no process group, no placement group, nothing to
  checkpoint, and the task's return value is the shard's scores (:func:`as_done`).
- Ray Train (the CAS classifier, :mod:`vaedist.evaluate.cas`): training one classifier on several workers
  averages gradients every step (DDP), so the workers must form a torch process group; Ray Train builds
  it, places the worker group, and keeps rank 0's reported result as a checkpoint, so a rerun of the same
  name hands the result back instead of training again.

Both start the same way (:func:`start`: join Ray, plan one bundle per worker against what the nodes hold)
and hand the workers their arrays through the object store once (:func:`share`); inside a worker, torch
threads and device come from :func:`vaedist.checkpoint.load_worker_model` or Ray Train.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from vaedist.config import ResourcesConfig
from vaedist.errors import VaedistError


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
