"""Job specs, the table of job kinds, and the pipeline: ``jobs/NAME.yaml`` run on this machine (``vaedist run``).

A job spec is YAML with a ``kind``, the config sections that kind reads, optional ``presets``
(deep-merged overrides chosen with ``--preset``) and ``resources``. :data:`JOB_KINDS` is the one table of
kinds: the sections each reads, how its spec is checked when it is loaded (so a bad spec fails before Ray
starts), how it runs, and the summary ``vaedist run`` prints after. The ``pipeline`` kind chains the others
(train or tune -> generate -> evaluate), each step fed by the output of the one before.

Sending a spec to a Ray cluster is :mod:`vaedist.submit`'s job. The modules that run a kind (train, tune,
generate, evaluate) are imported only when a spec of that kind runs: loading a spec stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaedist.config import (
    DISTRIBUTIONS,
    SECTIONS,
    ConfigError,
    EvaluateConfig,
    ExperimentConfig,
    ResourcesConfig,
    TuneConfig,
    experiment_from_dict,
    section_from_dict,
    tune_config_from_section,
)

Echo = Callable[[str], None]


def project_root() -> Path:
    """The vaedist checkout this package is imported from: it holds ``jobs/``, and is what ``vaedist submit``
    sends to a cluster as the job's working directory."""
    import vaedist

    return Path(vaedist.__file__).resolve().parents[1]


JOBS_DIR = project_root() / "jobs"
# Keys a spec may have besides the config sections.
META_KEYS = ("kind", "name", "description", "presets")


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    description: str = ""
    sections: dict[str, Any] = field(default_factory=dict)  # raw, after preset merge

    @property
    def experiment(self) -> ExperimentConfig:
        return experiment_from_dict({k: v for k, v in self.sections.items() if k in SECTIONS})


# ----------------------------------------------------------------------------------------------------
# Loading a spec


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` into ``base``, recursively; a search distribution ({choice: [...]}) replaces whole."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _is_distribution(value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def available_jobs(jobs_dir: Path = JOBS_DIR) -> list[str]:
    return sorted(p.stem for p in jobs_dir.glob("*.yaml"))


def resolve_job_path(name_or_path: str, jobs_dir: Path = JOBS_DIR) -> Path:
    """``tune-mnist``, ``jobs/tune-mnist.yaml`` or any path to a spec."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = jobs_dir / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"no job {name_or_path!r} (valid: {', '.join(available_jobs(jobs_dir)) or 'none'})")


def load_spec(name_or_path: str, preset: str | None = None, overrides: dict | None = None) -> JobSpec:
    path = resolve_job_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job spec must be a mapping with at least 'kind'")
    return spec_from_dict(raw, default_name=path.stem, preset=preset, overrides=overrides, source=str(path))


def spec_from_dict(
    raw: dict[str, Any],
    default_name: str,
    preset: str | None = None,
    overrides: dict | None = None,
    source: str = "spec",
) -> JobSpec:
    """A checked spec: its kind known, only sections that kind reads, the preset and overrides merged in."""
    kind = raw.get("kind")
    if kind not in JOB_KINDS:
        raise ConfigError(f"{source}: kind {kind!r} is not one of {', '.join(KINDS)}")
    reads = JOB_KINDS[kind].sections
    allowed = (*META_KEYS, *reads)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r} for kind {kind} (allowed: {', '.join(allowed)})"
        )
    sections = {k: v for k, v in raw.items() if k not in META_KEYS}
    presets = raw.get("presets") or {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{source}: no preset {preset!r} (presets: {', '.join(presets) or 'none'})")
        sections = deep_merge(sections, presets[preset])
    if overrides:
        sections = deep_merge(sections, overrides)
    # A section the kind does not read would be ignored in silence: refused, also when a preset brings it.
    unknown = sorted(set(sections) - set(reads))
    if unknown:
        raise ConfigError(
            f"{source}: section {unknown[0]!r} (from a preset or override) is not read by kind {kind} "
            f"(sections: {', '.join(reads)})"
        )
    spec = JobSpec(kind=kind, name=str(raw.get("name") or default_name), description=raw.get("description", ""),
                   sections=sections)  # fmt: skip
    JOB_KINDS[kind].check(spec)
    return spec


def evaluate_what(cfg: EvaluateConfig) -> str:
    """Which evaluations an evaluate section asks for: a model is scored, generated data gets a CAS."""
    return "all" if cfg.model and cfg.generated else "likelihood" if cfg.model else "cas"


def run_spec(spec: JobSpec, echo: Echo = print, name: str | None = None) -> Any:
    """Run a job spec on this machine (local Ray, or the cluster given by resources.address/RAY_ADDRESS)."""
    return JOB_KINDS[spec.kind].run(spec, echo, name or spec.name)


# ----------------------------------------------------------------------------------------------------
# The kinds: what each reads, checks, runs and prints


def _tune_config(spec: JobSpec) -> TuneConfig:
    return tune_config_from_section(spec.sections.get("tune"))


def _evaluate_configs(sections: dict[str, Any]) -> tuple[EvaluateConfig, ResourcesConfig]:
    return (
        section_from_dict(EvaluateConfig, sections.get("evaluate"), "evaluate"),
        section_from_dict(ResourcesConfig, sections.get("resources"), "resources"),
    )


def _check_experiment(spec: JobSpec) -> None:
    spec.experiment  # noqa: B018 - builds (and so checks) the data/model/train/resources sections


def _check_tune(spec: JobSpec) -> None:
    _check_experiment(spec)
    _tune_config(spec)


def _check_evaluate(spec: JobSpec) -> None:
    _evaluate_configs(spec.sections)


def _check_pipeline(spec: JobSpec) -> None:
    _pipeline_steps(spec)


def _check_generate(spec: JobSpec) -> None:
    """Nothing here: vaedist.generate reads (and checks) its sections when the job runs, and importing it
    here would load pyarrow for every spec loaded."""


def _run_train(spec: JobSpec, echo: Echo, name: str) -> Any:
    from vaedist.train import run_training

    result = run_training(spec.experiment, name=name, echo=echo)
    echo(f"model: {result.model_uri}  (val -ELBO {result.metrics.get('val_neg_elbo', float('nan')):.2f} nats"
         f"{', now champion' if result.champion else ''})")  # fmt: skip
    return result


def _run_tune(spec: JobSpec, echo: Echo, name: str) -> Any:
    from vaedist.tune import run_tune

    return run_tune(spec.experiment, _tune_config(spec), job_name=name, echo=echo)


def _run_generate(spec: JobSpec, echo: Echo, name: str) -> Any:
    from vaedist.generate import configs_from_spec, run_generate

    cfg, resources = configs_from_spec(spec.sections)
    return run_generate(cfg, resources, echo=echo)


def _run_evaluate(spec: JobSpec, echo: Echo, name: str) -> Any:
    from vaedist.evaluate import run_evaluate

    cfg, resources = _evaluate_configs(spec.sections)
    return run_evaluate(cfg, resources, evaluate_what(cfg), echo=echo)


def _run_pipeline(spec: JobSpec, echo: Echo, name: str) -> Any:
    return run_pipeline(spec, echo=echo)  # its steps take their names from the spec's


def train_summary(result: Any, echo: Echo = print) -> None:
    """What ``vaedist train`` and ``vaedist run`` of a train spec end with: the model and where to see it."""
    from vaedist.tracking import shown_uri

    m = result.metrics
    echo(f"done: val -ELBO {m.get('val_neg_elbo', float('nan')):.2f} nats, "
         f"{m.get('val_bits_per_dim', float('nan')):.4f} bits/dim")  # fmt: skip
    echo(f"  MLflow run   {result.run_id} in {shown_uri()}")
    echo(f"  model        {result.model_uri}{'  (now champion)' if result.champion else ''}")
    echo(f"  checkpoint   {result.checkpoint}")
    echo("  look at it   vaedist ui")


def pipeline_summary(result: PipelineResult, echo: Echo = print) -> None:
    """What a pipeline (``make demo``) ends with: the model, the Parquet folder, NLL, CAS, the audit's verdict
    (when the evaluate section has ``audit: true``), how to open MLflow."""
    from vaedist.tracking import shown_uri, tracking_uri

    echo("done:")
    if result.model_uri:
        echo(f"  model        {result.model_uri}{'  (champion)' if result.champion else ''}")
    if result.generated:
        echo(f"  Parquet      {result.generated}  ({result.rows:,} rows)")
    likelihood = (result.evaluation.get("likelihood") or {}).get("metrics", {})
    nll = next(
        (v for k, v in likelihood.items() if k.startswith("test_iw_nll_k") and not k.endswith("stderr")), None
    )
    if nll is not None:
        bits = likelihood.get("test_bits_per_dim", float("nan"))
        echo(f"  test NLL     {nll:.2f} nats ({bits:.4f} bits/dim)")
    cas = result.evaluation.get("cas")
    if cas:
        echo(f"  CAS          {cas['cas']:.4f} (classifier trained on real data: {cas['real_accuracy']:.4f}, "
             f"ratio {cas['ratio']:.3f})")  # fmt: skip
    audit = result.evaluation.get("audit")
    if audit:
        from vaedist.evaluate.audit import verdict_line

        echo(f"  audit        {verdict_line(audit)}")
    store = tracking_uri()
    echo(f"  MLflow       {shown_uri(store)}  ->  open it with: {ui_command(store)}")


def ui_command(store: str) -> str:
    """How a user opens the MLflow store ``store``: a server is opened in a browser, a file with vaedist ui."""
    if store.startswith(("http://", "https://")):
        return "a browser"
    if store.startswith("sqlite:///") and store.endswith("/mlflow.db"):
        return "vaedist ui"
    return f"vaedist ui --backend-store-uri {store}"


@dataclass(frozen=True)
class Kind:
    """One kind of job: what its spec may hold, how it is checked, how it runs, what is printed after."""

    sections: tuple[str, ...]  # the config sections it reads; any other section is refused
    check: Callable[[JobSpec], None]  # raises ConfigError; runs when the spec is loaded
    run: Callable[[JobSpec, Echo, str], Any]  # (spec, echo, run name) -> the kind's result
    summary: Callable[[Any, Echo], None] | None = None  # printed by `vaedist run` after the job, if any


_TRAINING = ("data", "model", "train", "resources")
# The one table of job kinds; its order is the order error messages list them in.
JOB_KINDS: dict[str, Kind] = {
    "train": Kind(_TRAINING, _check_experiment, _run_train, train_summary),
    "tune": Kind((*_TRAINING, "tune"), _check_tune, _run_tune),
    "generate": Kind(("generate", "resources"), _check_generate, _run_generate),
    "evaluate": Kind(("evaluate", "resources"), _check_evaluate, _run_evaluate),
    "pipeline": Kind(
        (*_TRAINING, "steps", "tune", "generate", "evaluate"),
        _check_pipeline,
        _run_pipeline,
        pipeline_summary,
    ),
}
KINDS = tuple(JOB_KINDS)


# ----------------------------------------------------------------------------------------------------
# Pipelines: tune (or train) -> champion -> generate -> evaluate, each step fed by the one before


@dataclass
class PipelineResult:
    model_uri: str = ""
    champion: bool = False
    generated: str = ""
    rows: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)


def _pipeline_steps(spec: JobSpec) -> list[str]:
    """The spec's steps, checked: drawn from PIPELINE_STEPS, in that order, each once, train or tune."""
    steps = spec.sections.get("steps")
    where = f"{spec.name}: steps"
    if not isinstance(steps, list) or not steps or any(s not in PIPELINE_STEPS for s in steps):
        raise ConfigError(f"{where}: must be a list drawn from {', '.join(PIPELINE_STEPS)}, got {steps!r}")
    if "train" in steps and "tune" in steps:
        raise ConfigError(f"{where}: give train or tune, not both (each produces the model)")
    order = [s for s in PIPELINE_STEPS if s in steps]
    if steps != order or len(set(steps)) != len(steps):
        raise ConfigError(f"{where}: {steps} must run in the order {', '.join(order)}, each once")
    _check_experiment(spec)  # the shared data/model/train/resources sections
    if "tune" in steps:
        _tune_config(spec)
    return steps


def generate_section(spec: JobSpec, done: PipelineResult) -> dict[str, Any]:
    """The pipeline's generate section, fed the exact model version the step before produced."""
    section = dict(spec.sections.get("generate") or {})
    if done.model_uri:
        section["model"] = done.model_uri
    return section


def evaluate_section(spec: JobSpec, done: PipelineResult) -> dict[str, Any]:
    """The pipeline's evaluate section, fed the model and the Parquet folder the steps before produced."""
    section = dict(spec.sections.get("evaluate") or {})
    if done.model_uri:
        section["model"] = done.model_uri
    if done.generated:
        section["generated"] = done.generated
    section.setdefault("dataset", spec.experiment.data.dataset)
    return section


def _step_model(spec: JobSpec, step: str, out: PipelineResult, echo: Echo) -> None:
    """train or tune: the model the later steps use, and whether it is the champion now."""
    from vaedist import model_registry

    if step == "train":
        from vaedist.train import run_training

        result = run_training(spec.experiment, name=f"{spec.name}-train", echo=echo)
    else:
        from vaedist.tune import run_tune

        result = run_tune(spec.experiment, _tune_config(spec), job_name=spec.name, echo=echo)
    out.model_uri = result.model_uri
    # Asked of the registry, not of the step: a reused run did not just become the champion, but may be it.
    out.champion = out.model_uri == model_registry.champion_uri(spec.experiment.data.dataset)


def _step_generate(spec: JobSpec, step: str, out: PipelineResult, echo: Echo) -> None:
    from vaedist.generate import configs_from_spec, run_generate

    resources = spec.sections.get("resources") or {}
    cfg, res = configs_from_spec({"generate": generate_section(spec, out), "resources": resources})
    result = run_generate(cfg, res, echo=echo)
    out.generated, out.rows = result.out, result.rows


def _step_evaluate(spec: JobSpec, step: str, out: PipelineResult, echo: Echo) -> None:
    from vaedist.evaluate import run_evaluate

    sections = {"evaluate": evaluate_section(spec, out), "resources": spec.sections.get("resources")}
    cfg, res = _evaluate_configs(sections)
    out.evaluation = run_evaluate(cfg, res, evaluate_what(cfg), echo=echo, reuse=True)


# Step -> what runs it; the order of this table is the order steps must be given in.
_STEPS: dict[str, Callable[[JobSpec, str, PipelineResult, Echo], None]] = {
    "train": _step_model,
    "tune": _step_model,
    "generate": _step_generate,
    "evaluate": _step_evaluate,
}
PIPELINE_STEPS = tuple(_STEPS)


def run_pipeline(spec: JobSpec, echo: Echo = print) -> PipelineResult:
    """Run the steps in order; each takes the previous step's output (model URI, Parquet folder).

    A rerun skips what is done: a finished train run or search is reused, a complete generated folder
    with the same plan is left alone, and only missing work runs.
    """
    steps = _pipeline_steps(spec)
    out = PipelineResult(steps=steps)
    for i, step in enumerate(steps, 1):
        echo(f"== step {i}/{len(steps)}: {step}")
        _STEPS[step](spec, step, out, echo)
    return out
