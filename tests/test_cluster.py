"""Planning where work runs, against plain resource dicts: no Ray needed (the fast tier)."""

from __future__ import annotations

import pytest

from vaedist.cluster import gpus_where_present, plan_actors, plan_workers
from vaedist.config import ResourcesConfig, TuneConfig
from vaedist.errors import UsageError
from vaedist.tune import concurrent_trials


def test_plan_workers_fails_fast_instead_of_hanging():

    cpu_only = {"CPU": 2.0}
    with pytest.raises(UsageError, match=r"1 worker\(s\) x 1 GPU but the Ray cluster has 0 GPU"):
        plan_workers(ResourcesConfig(workers=1, gpus_per_worker=1), cpu_only)
    with pytest.raises(UsageError, match=r"3 worker\(s\) x 1 CPU but the Ray cluster has 2 CPU.*--workers 2"):
        plan_workers(ResourcesConfig(workers=3), cpu_only)
    plan = plan_workers(ResourcesConfig(workers=2), cpu_only)
    assert (plan.workers, plan.cpus_per_worker, plan.use_gpu, plan.torch_threads) == (2, 1.0, False, 1)
    plan = plan_workers(ResourcesConfig(workers=1), cpu_only)
    assert plan.torch_threads == 2
    gpu = plan_workers(ResourcesConfig(workers=2, gpus_per_worker=1, cpus_per_worker=4), {"CPU": 16.0, "GPU": 2.0})
    assert gpu.use_gpu and gpu.scaling_config().resources_per_worker == {"CPU": 4.0, "GPU": 1.0}


def test_plan_workers_places_every_worker_on_one_node():
    """A worker is one bundle on one node: cluster totals alone would plan groups Ray can never place."""

    two_nodes = [{"CPU": 8.0}, {"CPU": 8.0}]
    total = {"CPU": 16.0}
    assert plan_workers(ResourcesConfig(workers=1), total, two_nodes).cpus_per_worker == 8.0  # not 16
    assert plan_workers(ResourcesConfig(workers=2), total, two_nodes).cpus_per_worker == 8.0
    assert plan_workers(ResourcesConfig(workers=3), total, two_nodes).cpus_per_worker == 4.0  # 5+5+5 fits no node
    with pytest.raises(UsageError, match=r"2 worker\(s\) x 12 CPU .* 16 CPU\(s\) \(8 \+ 8 on 2 nodes\)"):
        plan_workers(ResourcesConfig(workers=2, cpus_per_worker=12), total, two_nodes)
    with pytest.raises(UsageError, match=r"1 worker\(s\) x 2 GPU .* 2 GPU\(s\) \(1 \+ 1 on 2 nodes\)"):
        plan_workers(ResourcesConfig(workers=1, gpus_per_worker=2), {"CPU": 16.0, "GPU": 2.0},
                     [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])  # fmt: skip
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 3.0}]
    plan = plan_workers(ResourcesConfig(workers=4, gpus_per_worker=1), {"CPU": 16.0, "GPU": 4.0}, gpu_nodes)
    assert plan.use_gpu and plan.cpus_per_worker == 2.0  # 1 worker on the 1-GPU node, 3 on the other: 2 CPUs each
    # GPUs where present: by default one per worker when every worker can have one, else the CPUs.
    auto = plan_workers(ResourcesConfig(workers=2), {"CPU": 16.0, "GPU": 4.0}, gpu_nodes)
    assert auto.use_gpu and auto.gpus_per_worker == 1.0 and auto.scaling_config().use_gpu
    assert not plan_workers(ResourcesConfig(workers=2), {"CPU": 2.0, "GPU": 1.0}, [{"CPU": 2.0, "GPU": 1.0}]).use_gpu
    assert not plan_workers(ResourcesConfig(workers=2, gpus_per_worker=0), {"CPU": 16.0, "GPU": 4.0}, gpu_nodes).use_gpu
    gpu_actor = plan_actors(ResourcesConfig(workers=2), [{"CPU": 8.0, "GPU": 1.0}] * 2)
    assert gpu_actor.use_gpu and (gpu_actor.calls, gpu_actor.threads) == (1, 8)  # one shard at a time
    assert not plan_actors(ResourcesConfig(workers=1), [{"CPU": 2.0}]).use_gpu
    # Tune: trials side by side = worker groups that fit; generate: one actor never asks for 15 CPUs.
    assert concurrent_trials(plan_workers(ResourcesConfig(workers=2, cpus_per_worker=3), total, two_nodes),
                             TuneConfig(search_space={"train.lr": {"choice": [0.001]}}), two_nodes) == 2  # fmt: skip
    actor = plan_actors(ResourcesConfig(workers=1), two_nodes)
    assert actor.num_cpus <= 8.0 and (actor.calls, actor.threads) == (8, 1)  # a shard per core, one thread each
    # Fewer shards than calls: the idle calls' threads go to the shards there are.
    assert [(a.calls, a.threads) for a in map(actor.for_shards, (20, 8, 3, 1))] == [(8, 1), (8, 1), (3, 2), (1, 8)]
    assert gpu_actor.for_shards(1) == gpu_actor
    with pytest.raises(UsageError, match="largest Ray node has 8"):
        plan_actors(ResourcesConfig(workers=1, cpus_per_worker=12), two_nodes)


def test_gpus_where_present_is_one_rule_for_workers_and_actors():
    """Without --gpus-per-worker, each worker or actor gets a GPU only if every one of them can have its own."""
    three_gpus = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert gpus_where_present(3, three_gpus) == 1.0
    assert gpus_where_present(4, three_gpus) == 0.0
    assert gpus_where_present(1, [{"CPU": 64.0}]) == 0.0
    for workers in (3, 4):
        res = ResourcesConfig(workers=workers)
        assert plan_workers(res, {"CPU": 16.0, "GPU": 3.0}, three_gpus).use_gpu == (workers == 3)
        assert plan_actors(res, three_gpus).use_gpu == (workers == 3)
    # Half a GPU per node does not hold a whole one, however many nodes there are.
    assert gpus_where_present(2, [{"CPU": 4.0, "GPU": 0.5}] * 4) == 0.0
    with pytest.raises(UsageError, match=r"2 worker\(s\) x 1 GPU .* \(0\.5 \+ 0\.5 \+ 0\.5 \+ 0\.5 on 4 nodes\)"):
        plan_actors(ResourcesConfig(workers=2, gpus_per_worker=1), [{"CPU": 4.0, "GPU": 0.5}] * 4)


def test_local_means_no_address_given_nor_in_the_environment(monkeypatch):
    from vaedist.cluster import is_local

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert is_local(None) and not is_local("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # inside a Ray job, or the user's cluster
    assert not is_local(None)
