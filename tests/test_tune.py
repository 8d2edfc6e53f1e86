"""Ray Tune over Ray Train, for real: local Ray, a sqlite MLflow store, real MNIST, the smoke preset."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from vaedist.config import ConfigError, TuneConfig, tune_config_from_section


def test_search_space_validation_names_the_problem():
    with pytest.raises(ConfigError, match="tune.search_space: is empty"):
        TuneConfig(search_space={})
    with pytest.raises(ConfigError, match=r"tune.search_space.model.latnt_dim: is not a searchable key"):
        TuneConfig(search_space={"model.latnt_dim": {"choice": [8]}})
    with pytest.raises(ConfigError, match=r"tune.search_space.train.lr: must be one of \{choice, grid"):
        TuneConfig(search_space={"train.lr": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="loguniform needs \\[low, high\\] with low < high"):
        TuneConfig(search_space={"train.lr": {"loguniform": [0.1, 0.01]}})
    with pytest.raises(ConfigError, match="tune: unknown key 'samples'"):
        tune_config_from_section({"samples": 3, "search_space": {"train.lr": {"choice": [0.1]}}})


def test_asha_max_t_is_the_most_epochs_a_trial_can_draw():
    from vaedist.config import experiment_from_dict
    from vaedist.tune import max_epochs

    base = experiment_from_dict({"train": {"epochs": 7}})
    space = {"train.lr": {"choice": [0.001]}}
    assert max_epochs(base, TuneConfig(search_space=space)) == 7  # not searched: the base config's
    assert max_epochs(base, TuneConfig(search_space={**space, "train.epochs": {"choice": [2, 12, 4]}})) == 12
    assert max_epochs(base, TuneConfig(search_space={**space, "train.epochs": {"randint": [2, 9]}})) == 8


def test_best_trial_skips_failed_trials_and_follows_the_mode():
    from vaedist.tune import best_trial

    table = [
        {"trial": "a", "status": "OK", "val_neg_elbo": 101.0},
        {"trial": "b", "status": "ERROR", "val_neg_elbo": 90.0},  # crashed after reporting: never the best
        {"trial": "c", "status": "OK", "val_neg_elbo": None},  # stopped before its first report
        {"trial": "d", "status": "OK", "val_neg_elbo": 99.5},
    ]
    space = {"train.lr": {"choice": [0.001]}}
    assert best_trial(table, TuneConfig(search_space=space))["trial"] == "d"
    assert best_trial(table, TuneConfig(search_space=space, mode="max"))["trial"] == "a"
    assert best_trial(table[1:3], TuneConfig(search_space=space)) is None


@pytest.mark.slow
def test_tune_smoke_parent_children_champion_and_resume(tuned_store, monkeypatch):
    from vaedist.jobs import run_spec

    uri, result, spec, folder, lines = tuned_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VAEDIST_STORAGE_PATH", str(folder / "runs"))
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert len(children) == 2
    by_depth = {c.data.params["model.depth"]: c for c in children}
    assert by_depth["1"].info.status == "FINISHED"
    assert by_depth["3"].info.status == "FAILED"  # the crashed trial is marked, not lost
    assert len(client.get_metric_history(by_depth["1"].info.run_id, "val_neg_elbo")) == 1
    assert [r["status"] for r in result.table] == ["OK", "ERROR"]
    assert result.table[0]["model.depth"] == 1 and result.table[0]["epochs_run"] == 1
    # A one-worker trial trains in the trial's own process (Tune's function API): its checkpoint is
    # Tune's, in the trial's folder, and no TorchTrainer run folder was made for it.
    best = Path(result.table[0]["checkpoint"])
    assert best.name.startswith("checkpoint_") and (best / "model.pt").is_file()
    assert best.parent.parent == folder / "runs" / result.name
    assert not list((folder / "runs").glob(f"{result.name}-*"))
    assert any("model.depth" in line and "val_neg_elbo" in line for line in lines)  # the printed table
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"tune_results.txt", "tune_results.csv"} <= artifacts
    champion = client.get_model_version_by_alias("vaedist-mnist", "champion")
    assert champion.run_id == by_depth["1"].info.run_id and result.champion
    versions = len(client.search_model_versions("name = 'vaedist-mnist'"))

    # The same search again resumes from its experiment folder: no trial runs twice, no new child run,
    # and the champion (same metric) does not move.
    said: list[str] = []
    try:
        again = run_spec(spec, echo=said.append)
    finally:
        import ray

        ray.shutdown()
    assert any(line.startswith("resuming search") for line in said)
    assert again.parent_run_id == result.parent_run_id
    children_after = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert len(children_after) == 2
    assert len(client.get_metric_history(by_depth["1"].info.run_id, "val_neg_elbo")) == 1
    assert not again.champion
    assert client.get_model_version_by_alias("vaedist-mnist", "champion").version == champion.version
    # The best trial registered its model once: the rerun hands back that version, not a duplicate
    # (a pipeline's generate step is keyed on it).
    assert (again.model_uri, again.version) == (result.model_uri, result.version)
    assert len(client.search_model_versions("name = 'vaedist-mnist'")) == versions


@pytest.mark.slow
def test_a_trial_of_two_workers_fits_a_torch_trainer(mlflow_store, tmp_path):
    """Several workers per trial keep a TorchTrainer inside the trial (DDP), its checkpoints its own.

    On a Ray of its own, with the dashboard: when the trial's actor ends, Ray Train's PlacementGroupCleaner
    removes the trainer's placement group once the State API (served by the dashboard) says the controller
    is gone; without it the group's 2 CPUs stay reserved and the next search in that Ray never starts."""
    import ray

    from vaedist.jobs import load_spec, run_spec

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2)

    spec = load_spec("tune-mnist", preset="smoke", overrides={
        "data": {"val_size": 500}, "resources": {"workers": 2, "cpus_per_worker": 1},
        "tune": {"num_samples": 1, "search_space": {"model.arch": {"choice": ["dense"]},
                 "model.width": {"choice": [32]}, "train.epochs": {"choice": [1]}}}})  # fmt: skip
    os.environ["VAEDIST_STORAGE_PATH"] = str(tmp_path / "runs")
    try:
        result = run_spec(spec, echo=lambda *_: None)
    finally:
        del os.environ["VAEDIST_STORAGE_PATH"]
        ray.shutdown()
    [row] = result.table
    assert row["status"] == "OK" and row["epochs_run"] == 1
    best = Path(row["checkpoint"])  # the TorchTrainer's run folder <search>-<trial id>, not Tune's trial folder
    assert best.parent.name == f"{result.name}-{row['trial']}" and best.name == "epoch-0001"
    assert result.model_uri.startswith("models:/vaedist-mnist/")


@pytest.mark.slow
def test_asha_stops_weak_trials_whose_actor_the_next_trial_reuses(local_ray, mlflow_store, tmp_path):
    """One trial at a time, so each reuses the last one's actor (reuse_actors): a learning trial sets the bar
    at epoch 1, the two that barely learn (lr 1e-7) fall below it and ASHA stops them; the search goes on."""
    from vaedist.jobs import load_spec, run_spec

    spec = load_spec("tune-mnist", preset="smoke", overrides={
        "data": {"val_size": 500},
        "tune": {"num_samples": 1, "max_concurrent_trials": 1, "grace_period": 1, "reduction_factor": 2,
                 "search_space": {"model.arch": {"choice": ["dense"]}, "model.width": {"choice": [32]},
                                  "train.epochs": {"choice": [3]}, "train.lr": {"grid": [0.003, 1e-7, 2e-7]}}}})  # fmt: skip
    os.environ["VAEDIST_STORAGE_PATH"] = str(tmp_path / "runs")
    try:
        result = run_spec(spec, echo=lambda *_: None)
    finally:
        del os.environ["VAEDIST_STORAGE_PATH"]
    rows = {row["train.lr"]: row for row in result.table}
    assert [r["status"] for r in result.table] == ["OK"] * 3
    assert rows[0.003]["epochs_run"] == 3 and not rows[0.003]["stopped_early"]
    assert rows[1e-7]["stopped_early"] and rows[2e-7]["stopped_early"]  # stopped after epoch 1 (or 2)
    assert result.best_trial == rows[0.003]["trial"]
    # Every epoch Tune saw is whole in MLflow, in the trials ASHA stopped too: its metrics and pictures are
    # logged beside the next epoch's training and finished as the stopped loop leaves (worker.EpochLog).
    client = mlflow.MlflowClient()
    for row in result.table:
        steps = [m.step for m in client.get_metric_history(row["run_id"], "val_neg_elbo")]
        assert steps == list(range(1, row["epochs_run"] + 1)), (row, steps)
        images = {a.path for a in client.list_artifacts(row["run_id"], "images")}
        for step in steps:
            assert any(p.startswith(f"images/latent_scatter+step+{step}+") for p in images), (row, step, images)
