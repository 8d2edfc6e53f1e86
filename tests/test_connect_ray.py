"""``connect_ray`` on a new local instance: what the workers get, and that they start ahead of the work.

The tests that start a local Ray (or a ``vaedist train`` that imports Ray and dials an address) are in the
slow tier, where Ray runs; each starts its own, since that start is what it tests."""

from __future__ import annotations

import os
import time

import pytest

KEYS = ("MLFLOW_TRACKING_URI", "VAEDIST_DATA_DIR", "VAEDIST_VERBOSE", "MLFLOW_CONFIGURE_LOGGING",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")  # fmt: skip


def _started_unix_s(pid: int) -> float:
    """When process ``pid`` started, from /proc (field 22 of stat: clock ticks since boot)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def fresh_local_ray(tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in ("MLFLOW_CONFIGURE_LOGGING", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "VAEDIST_VERBOSE"):
        monkeypatch.delenv(key, raising=False)  # the test's expectations are the defaults'
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VAEDIST_DATA_DIR", str(tmp_path / "data"))
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_local_workers_inherit_the_worker_env_and_the_driver_keeps_its_own(fresh_local_ray, tmp_path):
    ray = fresh_local_ray
    from vaedist.cluster import connect_ray

    line = connect_ray()
    assert line.startswith("Ray: a new local instance")

    @ray.remote(num_cpus=0)
    def seen() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in KEYS}

    assert ray.get(seen.remote()) == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "VAEDIST_DATA_DIR": str(tmp_path / "data"),
        "VAEDIST_VERBOSE": "0",
        "MLFLOW_CONFIGURE_LOGGING": "false",  # the workers' console policy ...
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    # ... not the driver's: its MLflow logging and its Ray Train settings are as they were.
    assert "MLFLOW_CONFIGURE_LOGGING" not in os.environ
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert ray.get_runtime_context().runtime_env == {}


@pytest.mark.slow
def test_the_first_actor_runs_in_a_worker_ray_prestarted(fresh_local_ray):
    """No runtime env: the first actor takes one of the workers Ray starts at ray.init (one per CPU),
    instead of waiting for a fresh process (a job with a runtime env cannot use those)."""
    ray = fresh_local_ray
    from vaedist.cluster import connect_ray

    connect_ray()
    time.sleep(3)  # the prestarted workers are up (they start with the instance)

    @ray.remote(num_cpus=1)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    created = time.time()
    pid = ray.get(Probe.remote().pid.remote())
    assert _started_unix_s(pid) < created - 2.0  # started with the instance, before the sleep


def test_the_head_endpoint_of_an_address():
    from vaedist.cluster import head_endpoint

    assert head_endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert head_endpoint("ray://head.example:10001") == ("head.example", 10001)
    assert head_endpoint("ray://[::1]:10001") == ("::1", 10001)
    for resolved_by_ray in ("auto", "local", "head", "http://head:8265/"):
        assert head_endpoint(resolved_by_ray) is None


@pytest.mark.slow
def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path):
    """ray.init would retry for minutes, printing C++ warnings, and nothing is written."""
    import subprocess
    import sys

    from raycluster import free_port

    port = free_port()  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vaedist", "train", "--dataset", "mnist", "--epochs", "1",
         "--address", f"127.0.0.1:{port}"],  # fmt: skip
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [
        f"error: cannot connect to Ray at 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} "
        "([Errno 111] Connection refused) (check --address / RAY_ADDRESS and that the head is running)"
    ]
    assert not (tmp_path / "mlflow.db").exists()
