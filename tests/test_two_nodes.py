"""Two real Ray nodes on this machine (`ray start --head` + `ray start --address`, token auth, loopback):
`vaedist submit` of a smoke job runs its DDP workers on both nodes, checkpoints in storage both see."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from raycluster import MlflowServer, RayHead

pytestmark = pytest.mark.slow

_RAY_AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def test_submit_runs_workers_on_both_nodes(tmp_path):
    from mlflow import MlflowClient

    storage = tmp_path / "shared-runs"  # one folder both raylets see, as NFS would be on a real cluster
    mlflow = MlflowServer(tmp_path / "mlflow").launch()
    # One CPU per node: two 1-CPU DDP workers can only be placed one on each.
    # A loaded 2-core machine can take longer than Ray's default 60 s to register a raylet.
    head = RayHead(num_cpus=1, env={"MLFLOW_TRACKING_URI": mlflow.uri, "RAY_raylet_start_wait_time_s": "180"})
    try:
        head.start()
        head.add_node(num_cpus=1)
        mlflow.wait()
        env = {k: v for k, v in os.environ.items() if k not in _RAY_AUTH and not k.startswith("MLFLOW_")}
        env.update(RAY_AUTH_TOKEN=head.token, MLFLOW_TRACKING_URI=mlflow.uri, PATH=head.env["PATH"],
                   VAEDIST_STORAGE_PATH=str(storage))  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "vaedist", "submit", "train-mnist", "--preset", "smoke", "--address", head.address],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert head.token not in output

        client = MlflowClient(mlflow.uri)
        exp = client.get_experiment_by_name("vaedist/mnist")
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`vaedist.name` = 'train-mnist'")
        assert run.info.status == "FINISHED"
        assert run.data.tags["vaedist.num_nodes"] == "2", run.data.tags  # DDP ranks on different raylets
        assert run.data.params["resources.workers"] == "2"
        assert head.token not in str(run.data.params) and head.token not in str(run.data.tags)
        assert (storage / "train-mnist" / "epoch-0001").is_dir()  # the checkpoint, in the shared storage
    finally:
        try:
            head.stop()
        finally:
            mlflow.stop()
