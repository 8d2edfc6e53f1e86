"""Job specs and the table of job kinds: what each kind reads, checks, runs and prints; and the CLI built on
them. No Ray, no data, no MLflow server: every runner that would start Ray is replaced by a fake."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vaedist import config, jobs
from vaedist.cli import main
from vaedist.config import ConfigError, EvaluateConfig
from vaedist.dataset_flags import DATASET_OPTIONS


def test_the_kind_table_is_the_one_list_of_kinds():
    assert jobs.KINDS == ("train", "tune", "generate", "evaluate", "pipeline") == tuple(jobs.JOB_KINDS)
    for name, kind in jobs.JOB_KINDS.items():
        assert "resources" in kind.sections, name
        assert not set(kind.sections) & set(jobs.META_KEYS), name
    assert jobs.JOB_KINDS["train"].sections == ("data", "model", "train", "resources")
    assert jobs.JOB_KINDS["tune"].sections == ("data", "model", "train", "resources", "tune")
    # Only the kinds whose result is a summary of their own print one after `vaedist run`.
    assert {k for k, v in jobs.JOB_KINDS.items() if v.summary} == {"train", "pipeline"}
    with pytest.raises(
        ConfigError, match=r"^spec: kind 'deploy' is not one of train, tune, generate, evaluate, pipeline$"
    ):
        jobs.spec_from_dict({"kind": "deploy"}, default_name="x")


def test_each_kind_checks_its_spec_when_it_is_loaded():
    with pytest.raises(ConfigError, match="model.arch: 'mlp' is not one of dense, conv"):
        jobs.spec_from_dict({"kind": "train", "model": {"arch": "mlp"}}, default_name="x")
    with pytest.raises(ConfigError, match="tune: the spec has no 'tune' section"):
        jobs.spec_from_dict({"kind": "tune"}, default_name="x")
    with pytest.raises(ConfigError, match="evaluate: unknown key 'kk'"):
        jobs.spec_from_dict({"kind": "evaluate", "evaluate": {"kk": 1}}, default_name="x")
    with pytest.raises(ConfigError, match="resources: unknown key 'gpus'"):
        jobs.spec_from_dict({"kind": "evaluate", "resources": {"gpus": 1}}, default_name="x")
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate' for kind generate \(allowed: kind, name, "
                                          r"description, presets, generate, resources\)"):  # fmt: skip
        jobs.spec_from_dict({"kind": "generate", "evaluate": {}}, default_name="x")
    # generate's sections are checked when it runs (by vaedist.generate), not here.
    spec = jobs.spec_from_dict({"kind": "generate", "generate": {"bogus": 1}}, default_name="x")
    assert spec.name == "x" and spec.sections == {"generate": {"bogus": 1}}


def test_presets_and_overrides_merge_and_are_held_to_the_kind():
    raw = {"kind": "train", "name": "t", "model": {"latent_dim": 8, "width": 64},
           "presets": {"small": {"model": {"latent_dim": 2}, "train": {"epochs": 1}}}}  # fmt: skip
    spec = jobs.spec_from_dict(raw, default_name="x", preset="small", overrides={"train": {"lr": 0.01}})
    assert spec.name == "t"
    assert spec.sections == {"model": {"latent_dim": 2, "width": 64}, "train": {"epochs": 1, "lr": 0.01}}
    assert raw["model"] == {"latent_dim": 8, "width": 64}  # the raw spec is not changed
    with pytest.raises(ConfigError, match=r"no preset 'big' \(presets: small\)"):
        jobs.spec_from_dict(raw, default_name="x", preset="big")
    with pytest.raises(ConfigError, match="section 'evaluate' .* is not read by kind train"):
        jobs.spec_from_dict(raw, default_name="x", overrides={"evaluate": {"k": 1}})
    # A search distribution replaces whole: a preset's {choice: [...]} is not merged into the spec's.
    merged = jobs.deep_merge({"a": {"choice": [1, 2]}, "b": {"x": 1}}, {"a": {"grid": [3]}, "b": {"y": 2}})
    assert merged == {"a": {"grid": [3]}, "b": {"x": 1, "y": 2}}


def test_unknown_job_names_the_valid_ones(tmp_path):
    assert "demo" in jobs.available_jobs() and "train-mnist" in jobs.available_jobs()
    assert jobs.resolve_job_path("train-mnist") == jobs.JOBS_DIR / "train-mnist.yaml"
    assert jobs.project_root() / "jobs" == jobs.JOBS_DIR
    with pytest.raises(ConfigError, match=r"no job 'nope' \(valid: .*train-mnist"):
        jobs.resolve_job_path("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\nmodel: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d"):
        jobs.load_spec(str(bad))
    bad.write_text("- kind\n")
    with pytest.raises(ConfigError, match="a job spec must be a mapping"):
        jobs.load_spec(str(bad))


def test_an_evaluate_section_says_what_to_evaluate():
    assert jobs.evaluate_what(EvaluateConfig(model="m")) == "likelihood"
    assert jobs.evaluate_what(EvaluateConfig(generated="g")) == "cas"
    assert jobs.evaluate_what(EvaluateConfig(model="m", generated="g")) == "all"


def test_run_spec_runs_the_kind_of_the_spec(monkeypatch):
    ran = []
    for name in jobs.KINDS:
        fake = lambda spec, echo, run_name, name=name: ran.append((name, spec.name, run_name)) or name  # noqa: E731
        monkeypatch.setitem(jobs.JOB_KINDS, name, dataclasses.replace(jobs.JOB_KINDS[name], run=fake))
    assert jobs.run_spec(jobs.load_spec("train-mnist")) == "train"
    assert jobs.run_spec(jobs.load_spec("demo"), name="other") == "pipeline"
    assert jobs.run_spec(jobs.load_spec("generate-mnist", preset="smoke")) == "generate"
    assert ran == [("train", "train-mnist", "train-mnist"), ("pipeline", "demo", "other"),
                   ("generate", "generate-mnist", "generate-mnist")]  # fmt: skip


def test_vaedist_run_prints_the_summary_of_the_kind(monkeypatch):
    shown = []
    monkeypatch.setattr(jobs, "run_spec", lambda spec, echo=print, name=None: f"result of {spec.kind}")
    monkeypatch.setitem(jobs.JOB_KINDS, "train", dataclasses.replace(
        jobs.JOB_KINDS["train"], summary=lambda result, echo: (shown.append(result), echo("summary"))))  # fmt: skip
    result = CliRunner().invoke(main, ["run", "train-mnist", "--preset", "smoke"])
    assert result.exit_code == 0 and result.output == "summary\n" and shown == ["result of train"]
    result = CliRunner().invoke(main, ["run", "generate-mnist", "--preset", "smoke"])
    assert result.exit_code == 0 and result.output == ""  # generate prints as it goes, no summary after


def test_summaries(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@mlflow.example:5000")
    trained = SimpleNamespace(metrics={"val_neg_elbo": 91.234, "val_bits_per_dim": 0.16789}, run_id="abc",
                              model_uri="models:/vaedist-mnist/2", champion=True, checkpoint="/runs/x")  # fmt: skip
    jobs.train_summary(trained)
    assert capsys.readouterr().out.splitlines() == [
        "done: val -ELBO 91.23 nats, 0.1679 bits/dim",
        "  MLflow run   abc in http://alice:***@mlflow.example:5000",
        "  model        models:/vaedist-mnist/2  (now champion)",
        "  checkpoint   /runs/x",
        "  look at it   vaedist ui",
    ]
    jobs.pipeline_summary(
        jobs.PipelineResult(model_uri="models:/vaedist-mnist/2", generated="out/d", rows=1234)
    )
    assert capsys.readouterr().out.splitlines() == [
        "done:",
        "  model        models:/vaedist-mnist/2",
        "  Parquet      out/d  (1,234 rows)",
        "  MLflow       http://alice:***@mlflow.example:5000  ->  open it with: a browser",
    ]
    assert jobs.ui_command("https://mlflow.example") == "a browser"
    assert jobs.ui_command("sqlite:////home/me/proj/mlflow.db") == "vaedist ui"
    assert (
        jobs.ui_command("sqlite:////tmp/other.db") == "vaedist ui --backend-store-uri sqlite:////tmp/other.db"
    )


# ------------------------------------------------------------------------------------------- the CLI


def _choices(command: str, option: str, group: str | None = None) -> tuple:
    cmd = main.commands[group].commands[command] if group else main.commands[command]
    (param,) = [p for p in cmd.params if f"--{option}" in p.opts]
    return tuple(param.type.choices)


def test_cli_choices_are_the_config_vocabularies():
    assert _choices("train", "variant") == config.VARIANTS
    assert _choices("train", "arch") == config.ARCHS
    assert _choices("train", "likelihood") == config.LIKELIHOODS
    # --dataset takes a built-in name or a path: its help names the built-in ones
    for command in (main.commands["train"], main.commands["evaluate"].commands["cas"]):
        (param,) = [p for p in command.params if p.name == "dataset"]
        assert all(name in (param.help or "") for name in config.DATASET_NAMES) or param.metavar == "NAME|PATH"


def test_train_flags_land_in_the_section_that_has_the_field():
    from vaedist.cli import _sections

    names = [f.name for cls in config.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))  # what lets a flag name its section without saying it
    flags = {p.name for p in main.commands["train"].params} - {
        "config_path",
        "name",
        "storage_path",
        "dry_run",
        *DATASET_OPTIONS,  # written into the dataset string, not config fields
    }
    assert flags <= set(names)
    assert _sections({"latent_dim": 8, "workers": 2, "dataset": "cifar10", "lr": None}) == {
        "model": {"latent_dim": 8}, "resources": {"workers": 2}, "data": {"dataset": "cifar10"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--variant", "gan", "--dry-run"], "Invalid value for '--variant': 'gan' is not one of"),
        (["train", "--latent-dim", "0", "--dry-run"], "model.latent_dim: must be an integer >= 1, got 0"),
        (
            ["train", "--dataset", "cifar10", "--likelihood", "bernoulli", "--dry-run"],
            "'bernoulli' needs black",
        ),
        (["run", "nope"], "no job 'nope'"),
        (
            ["evaluate", "likelihood", "--model", "m", "--k", "0"],
            "evaluate.k: must be an integer >= 1, got 0",
        ),
        (["evaluate", "cas", "--generated", "g", "--dataset", "svhn"], "evaluate.dataset: 'svhn' is neither a built-in dataset (mnist"),
        (["generate", "--model", "m", "--out", "o"], "give exactly one of --per-label N"),
        (
            ["generate", "--model", "m", "--out", "o", "--total", "0"],
            "generate.total: must be an integer >= 1",
        ),
    ],
)
def test_bad_usage_is_one_error_line_and_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_train_dry_run_prints_the_config_of_flags_on_a_spec():
    result = CliRunner().invoke(main, ["train", "--config", str(jobs.JOBS_DIR / "train-mnist.yaml"),
                                       "--workers", "2", "--latent-dim", "4", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("name: mnist-")  # the model changed: a run of its own
    assert "  model.latent_dim = 4" in result.output and "  resources.workers = 2" in result.output
