"""Ray Train + MLflow, for real: local Ray in-process, MLflow on a throwaway sqlite store, real MNIST."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from vaedist import tracking
from vaedist.config import experiment_from_dict
from vaedist.errors import UsageError

SMALL = {
    "data": {"dataset": "mnist", "val_size": 2000},
    "model": {"variant": "cvae", "arch": "conv", "base_channels": 8, "latent_dim": 4},
    "train": {"epochs": 2, "batch_size": 256, "max_failures": 1},
    "resources": {"workers": 2},
}


@pytest.mark.slow
def test_train_two_workers_records_everything_in_mlflow(local_ray, mlflow_store, tmp_path):
    from vaedist.checkpoint import load_model
    from vaedist.train import run_training

    cfg = experiment_from_dict(SMALL)
    result = run_training(cfg, name="e2e", storage=str(tmp_path / "runs"), echo=lambda *_: None)

    run = mlflow_store.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.variant"] == "cvae" and run.data.params["resources.workers"] == "2"
    assert run.data.params["resolved.likelihood"] == "bernoulli"
    history = mlflow_store.get_metric_history(result.run_id, "val_neg_elbo")
    assert [m.step for m in history] == [1, 2]
    assert history[1].value < history[0].value < 544  # 544 nats = log(2) * 784: a coin flip per pixel
    for key in ("val_recon", "val_kl", "val_bits_per_dim", "train_loss"):
        assert len(mlflow_store.get_metric_history(result.run_id, key)) == 2, key
    kl = mlflow_store.get_metric_history(result.run_id, "val_kl")[-1].value
    recon = mlflow_store.get_metric_history(result.run_id, "val_recon")[-1].value
    assert abs(recon + kl - history[-1].value) < 1e-3 * history[-1].value

    # Pictures at every epoch, by key and step.
    images = {a.path for a in mlflow_store.list_artifacts(result.run_id, "images")}
    for key in ("samples", "reconstructions", "latent_scatter", "interpolation", "class_by_z"):
        for step in (1, 2):
            assert any(p.startswith(f"images/{key}+step+{step}+") for p in images), (key, step, images)

    # Registered, champion, and the model loads back with weights_only=True to identical outputs.
    assert result.model_uri == "models:/vaedist-mnist/1" and result.champion
    mv = mlflow_store.get_model_version_by_alias("vaedist-mnist", "champion")
    assert str(mv.version) == "1" and mv.run_id == result.run_id
    path = tracking.resolve_checkpoint("models:/vaedist-mnist@champion")
    loaded, state = load_model(path)
    original, _ = load_model(Path(result.checkpoint) / tracking.CHECKPOINT_FILE)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(6)
    with torch.no_grad():
        assert torch.equal(loaded.generate(z, y), original.generate(z, y))
        # The torch.export graph logged beside the registered (pyfunc) model is the same decoder.
        graph = mlflow.pytorch.load_model(f"runs:/{result.run_id}/generator_graph")
        assert torch.allclose(graph(z, y), loaded.generate(z, y), atol=1e-6)
    served = mlflow.pyfunc.load_model("models:/vaedist-mnist@champion")
    assert "python_function" in served.metadata.flavors
    assert served.predict(pd.DataFrame({"label": [4], "seed": [0]}))["image"][0].shape == (28, 28, 1)
    assert state["epoch"] in (1, 2)


@pytest.mark.slow
def test_fault_mid_epoch_resumes_from_checkpoint(local_ray, mlflow_store, tmp_path):
    import ray

    from vaedist.train import run_training
    from vaedist.worker import FAULT_ENV

    cfg = experiment_from_dict(SMALL)
    clean = run_training(cfg, name="clean", storage=str(tmp_path / "runs"), echo=lambda *_: None)

    # Rank 1 of run "faulty" dies hard in the middle of the second epoch; Ray restarts the group from epoch 1's
    # checkpoint. The hook reaches the workers through Ray's runtime env, set here by the test.
    marker = tmp_path / "fault-injected"
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        FAULT_ENV: f"run=faulty,epoch=1,step=20,rank=1,marker={marker}"}})  # fmt: skip
    faulty = run_training(cfg, name="faulty", storage=str(tmp_path / "runs"), echo=lambda *_: None)
    assert marker.exists()
    history = mlflow_store.get_metric_history(faulty.run_id, "val_neg_elbo")
    assert sorted(m.step for m in history) == [1, 2]  # exactly the requested epochs, none repeated
    assert faulty.metrics["epoch"] == 2
    # Per-(epoch, rank) seeding of data order and noise makes the resumed run retrace the uninterrupted one.
    assert faulty.metrics["val_neg_elbo"] == pytest.approx(clean.metrics["val_neg_elbo"], rel=1e-4)


@pytest.mark.slow
def test_champion_moves_only_on_numbers_measured_on_the_same_validation_set(mlflow_store, tmp_path):
    """A smoke run's -ELBO on 1,000 images, or a Bernoulli model's on binarized pixels, is no yardstick for
    another model: the champion is re-scored on the newcomer's set, or kept when pixels are coded apart."""
    from vaedist.champion import register_checkpoint
    from vaedist.checkpoint import save_checkpoint
    from vaedist.data import get_spec
    from vaedist.data.spec import split_digest
    from vaedist.models import build_model

    def register(claimed: float, val_size: int, likelihood: str = "bernoulli", seed: int = 0) -> tuple[str, bool]:
        cfg = experiment_from_dict({**SMALL, "data": {"dataset": "mnist", "val_size": val_size},
                                    "model": {**SMALL["model"], "likelihood": likelihood}})  # fmt: skip
        torch.manual_seed(seed)
        model = build_model(cfg.model, (28, 28, 1), 10, cfg.likelihood)
        folder = tmp_path / f"ckpt-{len(list(tmp_path.glob('ckpt-*')))}"
        folder.mkdir()
        save_checkpoint(folder / tracking.CHECKPOINT_FILE, model, None, 1, cfg.flatten(), {"val_neg_elbo": claimed})
        run_id = tracking.find_or_create_run("mnist", folder.name, {}, kind="train")
        _, version, moved, _ = register_checkpoint(str(folder), run_id, "mnist")
        return version, moved

    assert register(500.0, val_size=1000) == ("1", True)
    # The same weights claim 1 nat on another validation set: re-scored side by side, they tie, so no move.
    assert register(1.0, val_size=2000) == ("2", False)
    # A logistic (8-bit) model's nats are not comparable with a Bernoulli one's: the champion stays.
    assert register(1.0, val_size=1000, likelihood="logistic") == ("3", False)
    # On the champion's own validation set the plain comparison decides.
    assert register(400.0, val_size=1000, seed=1) == ("4", True)
    versions = {str(mv.version): mv.tags["val_set"] for mv in mlflow_store.search_model_versions("name = 'vaedist-mnist'")}
    val = {n: split_digest(get_spec("mnist").fingerprint, "validation", n) for n in (1000, 2000)}  # the runs' digests
    assert versions == {"1": f"{val[1000]}/binarized", "2": f"{val[2000]}/binarized",
                        "3": f"{val[1000]}/8-bit", "4": f"{val[1000]}/binarized"}  # fmt: skip


@pytest.mark.slow
def test_same_name_resumes_and_a_changed_config_is_refused(local_ray, mlflow_store, tmp_path, monkeypatch):
    from vaedist.train import run_training

    cfg = experiment_from_dict({**SMALL, "train": {**SMALL["train"], "epochs": 1}})
    first = run_training(cfg, name="again", storage=str(tmp_path / "runs"), echo=lambda *_: None)
    before = mlflow_store.get_run(first.run_id).data.params
    changed = cfg.replace(**{"model.latent_dim": 6})
    with pytest.raises(UsageError, match=r"a run named 'again' already exists with model.latent_dim=4 \(now 6\)"):
        run_training(changed, name="again", storage=str(tmp_path / "runs"), echo=lambda *_: None)
    assert mlflow_store.get_run(first.run_id).data.params == before
    # The same name and config again: a finished run is reused, nothing is trained or registered twice.
    said: list[str] = []
    again = run_training(cfg, name="again", storage=str(tmp_path / "runs"), echo=said.append)
    assert again.run_id == first.run_id and again.model_uri == first.model_uri
    assert "already trained" in said[0]
    # Where it runs is not what it is: one worker instead of two finds the same finished run.
    said.clear()
    one_worker = cfg.replace(**{"resources.workers": 1})
    assert run_training(one_worker, name="again", storage=str(tmp_path / "runs"), echo=said.append).run_id == first.run_id
    assert "already trained" in said[0]
    assert len(mlflow_store.get_metric_history(first.run_id, "val_neg_elbo")) == 1
    assert len(mlflow_store.search_model_versions("name='vaedist-mnist'")) == 1

    # Another MLflow store, the same name and storage: Ray must not resume the first run's checkpoints.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(UsageError, match=r"runs/again holds checkpoints of another run \(MLflow run " + first.run_id):
        run_training(cfg, name="again", storage=str(tmp_path / "runs"), echo=lambda *_: None)


def _cli(args, env_extra=None, cwd=None, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "vaedist", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--dataset", "imagenet"], 2, "data.dataset: 'imagenet' is neither a built-in dataset (mnist, fashion-mnist, cifar10) nor an image folder or Parquet table here"),
        (["--variant", "gan"], 2, "Invalid value for '--variant'"),
        (["--gpus-per-worker", "1"], 2, "error: asked for 1 worker(s) x 1 GPU but the Ray cluster has 0 GPU(s)"),
        (["--workers", "64"], 2, "error: asked for 64 worker(s) x 1 CPU but the Ray cluster has"),
        (["--latent-dim", "0"], 2, "error: model.latent_dim: must be an integer >= 1, got 0"),
        (["--arch", "conv", "--depth", "3"], 2, "error: model.depth: 3 stride-2 blocks"),
    ],
)
def test_cli_bad_input_is_one_line(args, code, message, tmp_path):
    proc = _cli(["train", "--epochs", "1", *args, "--storage-path", str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr  # one line (Ray's own start-up log aside)
    assert "Usage:" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was recorded


@pytest.mark.slow
def test_cli_unwritable_storage_and_unreachable_mlflow_fail_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _cli(["train", "--epochs", "1", "--storage-path", str(blocker / "runs")], cwd=tmp_path)
    assert proc.returncode == 2 and "error: storage path" in proc.stderr and "not writable" in proc.stderr
    assert blocker.read_text() == "not a folder"

    # A password in the tracking URI is never printed.
    proc = _cli(["train", "--epochs", "1"], env_extra={"MLFLOW_TRACKING_URI": "http://alice:pw-s3cret@127.0.0.1:9"}, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking server http://alice:***@127.0.0.1:9 is not reachable")
    assert "Traceback" not in proc.stderr and "pw-s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "vaedist-runs").exists()


def _dry_run(args: list[str], cwd: Path, monkeypatch) -> str:
    """``vaedist train ... --dry-run`` in this process (a dry run starts nothing: no Ray, no store, so a
    subprocess would only add Python's and the imports' start-up); its stdout, after exit code 0."""
    from click.testing import CliRunner

    from vaedist.cli import main

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(main, ["train", *args, "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_dry_run_prints_the_resolved_config(tmp_path, monkeypatch):
    stdout = _dry_run(["--dataset", "fashion-mnist", "--latent-dim", "8"], tmp_path, monkeypatch)
    assert "model.latent_dim = 8" in stdout and "data.dataset = fashion-mnist" in stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_spec_with_flags_on_top_is_a_run_of_its_own(tmp_path, monkeypatch):
    """--config keeps the spec's run name; flags that change the model make another run, not a refusal."""
    from vaedist.jobs import project_root

    spec = str(project_root() / "jobs" / "train-fashion-mnist.yaml")

    def name(*flags: str) -> str:
        return _dry_run(["--config", spec, *flags], tmp_path, monkeypatch).splitlines()[0]

    assert name() == name("--workers", "1") == "name: train-fashion-mnist"  # where it runs is no new config
    assert name("--epochs", "5").startswith("name: fashion-mnist-") and name("--epochs", "5") != name("--epochs", "6")


def test_a_relative_sqlite_tracking_uri_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray workers run in another working directory: a relative store would split the run in two."""
    monkeypatch.chdir(tmp_path)
    for given, expected in [
        ("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        ("sqlite:///stores/a.db?timeout=30", f"sqlite:///{tmp_path / 'stores' / 'a.db'}?timeout=30"),
        (f"sqlite:///{tmp_path / 'abs.db'}", f"sqlite:///{tmp_path / 'abs.db'}"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
        assert tracking.tracking_uri() == expected
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_kl_warmup_ramps_beta_linearly_then_holds():
    """KL annealing (Bowman et al. 2016): 0 at the first step, beta after ``warmup_epochs``."""
    from vaedist.loop import kl_weight

    assert kl_weight(0, 0, 100, beta=1.0, warmup_epochs=0) == 1.0  # off
    assert kl_weight(0, 0, 100, beta=0.8, warmup_epochs=2) == 0.0
    assert kl_weight(0, 50, 100, beta=0.8, warmup_epochs=2) == pytest.approx(0.2)
    assert kl_weight(1, 50, 100, beta=0.8, warmup_epochs=2) == pytest.approx(0.6)
    assert kl_weight(2, 0, 100, beta=0.8, warmup_epochs=2) == kl_weight(9, 99, 100, beta=0.8, warmup_epochs=2) == 0.8


def test_data_of_every_rank_is_disjoint():
    from vaedist.loop import epoch_indices

    parts = [epoch_indices(1001, epoch=3, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 500
    assert not set(parts[0]) & set(parts[1])
    assert np.array_equal(parts[0], epoch_indices(1001, epoch=3, seed=7, rank=0, world_size=2))
    assert not np.array_equal(parts[0], epoch_indices(1001, epoch=4, seed=7, rank=0, world_size=2))


# A process exits (as Ray shuts down the worker of a trial ASHA stopped) while a daemon thread trains.
_EXIT_MID_STEP = """
import threading, time, torch
from vaedist.worker import StopAtExit, WorkerExiting

torch.set_num_threads(1)
started = threading.Event()

def train():
    try:
        with StopAtExit() as guard:
            x, conv = torch.randn(64, 16, 14, 14), torch.nn.ConvTranspose2d(16, 8, 4, 2, 1)
            started.set()
            while True:  # nearly all of the time inside torch's C++ code
                guard.check()
                conv(x).sum().backward()
    except WorkerExiting:
        print("stopped at a step boundary", flush=True)

threading.Thread(target=train, daemon=True).start()
started.wait()
time.sleep(0.5)
"""


def test_a_worker_exiting_mid_epoch_stops_its_training_thread_cleanly():
    """Without the guard CPython kills the thread inside torch at exit and the process aborts (rc 134)."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_MID_STEP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped at a step boundary" in proc.stdout
    assert "Fatal Python error" not in proc.stderr and "terminate called" not in proc.stderr
