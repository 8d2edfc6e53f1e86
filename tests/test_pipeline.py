"""The pipeline job kind: its steps checked and fed one from the other (fast), and end to end
(train -> generate -> evaluate) at toy size with a rerun that skips (slow)."""

from __future__ import annotations

import pytest

from vaedist import jobs
from vaedist.config import ConfigError
from vaedist.jobs import PipelineResult, load_spec, run_spec, spec_from_dict

TOY = {
    "data": {"val_size": 1000},
    "model": {"base_channels": 8, "latent_dim": 4},
    "train": {"epochs": 1, "batch_size": 256},
    "generate": {"per_label": 40, "shard_rows": 200},
    "evaluate": {"k": 4, "classifier_epochs": 1, "audit": False},  # the audit has tests of its own
}


def test_pipeline_steps_are_validated():
    with pytest.raises(ConfigError, match=r"steps: must be a list drawn from train, tune, generate, evaluate"):
        spec_from_dict({"kind": "pipeline", "steps": ["train", "deploy"]}, default_name="p")
    with pytest.raises(ConfigError, match="give train or tune, not both"):
        spec_from_dict({"kind": "pipeline", "steps": ["train", "tune"]}, default_name="p")
    with pytest.raises(ConfigError, match="must run in the order train, generate"):
        spec_from_dict({"kind": "pipeline", "steps": ["generate", "train"]}, default_name="p")
    with pytest.raises(ConfigError, match=r"^p: steps: \['train', 'train'\] must run in the order train, each once$"):
        spec_from_dict({"kind": "pipeline", "steps": ["train", "train"]}, default_name="p")
    with pytest.raises(ConfigError, match=r"^p: steps: must be a list drawn from .*, got None$"):
        spec_from_dict({"kind": "pipeline"}, default_name="p")
    with pytest.raises(ConfigError, match="tune: the spec has no 'tune' section"):
        spec_from_dict({"kind": "pipeline", "steps": ["tune", "generate"]}, default_name="p")
    with pytest.raises(ConfigError, match="model.variant: 'gan' is not one of"):
        spec_from_dict({"kind": "pipeline", "steps": ["train"], "model": {"variant": "gan"}}, default_name="p")
    steps = load_spec("demo").sections["steps"]
    assert steps == ["train", "generate", "evaluate"] and jobs.PIPELINE_STEPS == ("train", "tune", "generate", "evaluate")


def test_each_step_is_fed_what_the_one_before_produced():
    spec = spec_from_dict({"kind": "pipeline", "steps": ["train", "generate", "evaluate"],
                           "data": {"dataset": "fashion-mnist"},
                           "generate": {"model": "models:/ignored@champion", "out": "out/x", "per_label": 3},
                           "evaluate": {"k": 4}}, default_name="p")  # fmt: skip
    nothing_yet = PipelineResult()
    assert jobs.generate_section(spec, nothing_yet)["model"] == "models:/ignored@champion"
    assert jobs.evaluate_section(spec, nothing_yet) == {"k": 4, "dataset": "fashion-mnist"}
    done = PipelineResult(model_uri="models:/vaedist-fashion-mnist/3", generated="out/x", rows=30)
    assert jobs.generate_section(spec, done) == {"model": "models:/vaedist-fashion-mnist/3", "out": "out/x",
                                                 "per_label": 3}  # fmt: skip
    assert jobs.evaluate_section(spec, done) == {"k": 4, "model": "models:/vaedist-fashion-mnist/3",
                                                 "generated": "out/x", "dataset": "fashion-mnist"}  # fmt: skip
    assert spec.sections["generate"]["model"] == "models:/ignored@champion"  # the spec is left as written
    spec = spec_from_dict({"kind": "pipeline", "steps": ["generate", "evaluate"],
                           "evaluate": {"dataset": "mnist"}}, default_name="p")  # fmt: skip
    assert jobs.evaluate_section(spec, PipelineResult(generated="g"))["dataset"] == "mnist"  # given wins


def test_steps_run_in_order_each_with_the_result_so_far(monkeypatch):
    seen = []

    def fake(spec, step, out, echo):
        seen.append((step, out.model_uri))
        out.model_uri = out.model_uri or f"models:/from-{step}"

    for step in jobs.PIPELINE_STEPS:
        monkeypatch.setitem(jobs._STEPS, step, fake)
    lines: list[str] = []
    result = run_spec(load_spec("demo"), echo=lines.append)
    assert seen == [("train", ""), ("generate", "models:/from-train"), ("evaluate", "models:/from-train")]
    assert lines == ["== step 1/3: train", "== step 2/3: generate", "== step 3/3: evaluate"]
    assert result.steps == ["train", "generate", "evaluate"] and result.model_uri == "models:/from-train"


@pytest.mark.slow
def test_demo_pipeline_at_toy_size_then_rerun_skips(tmp_path, monkeypatch, capsys):
    import mlflow
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    if ray.is_initialized():
        ray.shutdown()
    spec = load_spec("demo", overrides=TOY)
    lines: list[str] = []
    try:
        result = run_spec(spec, echo=lines.append)
        assert result.steps == ["train", "generate", "evaluate"]
        assert result.model_uri == "models:/vaedist-mnist/1" and result.champion
        assert result.rows == 400 and (tmp_path / "out/demo/mnist/_manifest.json").exists()
        # the trained model carries its data's facts: what generate and serve read instead of the data
        from vaedist import tracking
        from vaedist.checkpoint import header, load_checkpoint

        head = header(load_checkpoint(tracking.resolve_checkpoint(result.model_uri)))
        assert head.class_names == tuple(map(str, range(10))) and len(head.fingerprint) == 16
        assert sum(head.class_counts) == 60_000 and head.validation == {"val_size": 1000}  # train + val rows
        cas = result.evaluation["cas"]
        assert cas["model_uri"] == result.model_uri and 0.0 < cas["cas"] <= 1.0
        assert cas["ratio"] == pytest.approx(cas["cas"] / cas["real_accuracy"])
        nll = result.evaluation["likelihood"]["metrics"]
        assert nll["test_iw_nll_k4"] <= nll["test_neg_elbo"] + 1e-6

        # The same pipeline again: training is reused, the complete Parquet folder left alone, and the
        # evaluations MLflow holds are read back, not recomputed.
        parts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out/demo/mnist").glob("data/train-*.parquet")}
        assert parts  # the shards are in data/, as on the Hub
        lines.clear()
        again = run_spec(spec, echo=lines.append)
        assert any("already trained" in line for line in lines)
        assert again.model_uri == result.model_uri
        assert sum("is already on MLflow run" in line for line in lines) == 2, lines  # likelihood, CAS
        assert again.evaluation["cas"]["cas"] == cas["cas"]
        assert again.evaluation["likelihood"]["metrics"] == nll
        assert again.evaluation["cas"]["run_id"] == cas["run_id"]
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out/demo/mnist").glob("data/train-*.parquet")} == parts
        client = mlflow.MlflowClient(uri)
        assert len(client.search_model_versions("name='vaedist-mnist'")) == 1

        # What `make demo` ends with: the champion, the Parquet folder and its rows, CAS, how to open the UI.
        capsys.readouterr()
        jobs.JOB_KINDS["pipeline"].summary(again, print)
        summary = capsys.readouterr().out
        assert "model        models:/vaedist-mnist/1  (champion)" in summary
        assert "out/demo/mnist  (400 rows)" in summary
        assert f"CAS          {cas['cas']:.4f}" in summary and "test NLL" in summary
        assert summary.rstrip().endswith("open it with: vaedist ui")
    finally:
        ray.shutdown()
