"""Named jobs: ``jobs/NAME.yaml`` specs, run here (``vaedist run``).

A job spec is YAML with a ``kind`` (train | tune | generate | evaluate | pipeline), the config sections
of that kind, optional ``presets`` (deep-merged overrides chosen with ``--preset``), and ``resources``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaedist.config import (
    SECTIONS,
    ConfigError,
    ExperimentConfig,
    experiment_from_dict,
    tune_config_from_section,
)

KINDS = ("train", "tune", "generate", "evaluate", "pipeline")
JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
# Keys a spec may have besides the config sections.
META_KEYS = ("kind", "name", "description", "presets")
# Sections other kinds add; their validation belongs to the module that runs them.
EXTRA_SECTIONS = ("tune", "generate", "evaluate", "steps")


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    description: str = ""
    sections: dict[str, Any] = field(default_factory=dict)  # raw, after preset merge

    @property
    def experiment(self) -> ExperimentConfig:
        return experiment_from_dict({k: v for k, v in self.sections.items() if k in SECTIONS})


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
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
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: kind {kind!r} is not one of {', '.join(KINDS)}")
    allowed = (*META_KEYS, *SECTIONS, *EXTRA_SECTIONS)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    sections = {k: v for k, v in raw.items() if k not in META_KEYS}
    presets = raw.get("presets") or {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{source}: no preset {preset!r} (presets: {', '.join(presets) or 'none'})")
        sections = deep_merge(sections, presets[preset])
    if overrides:
        sections = deep_merge(sections, overrides)
    spec = JobSpec(kind=kind, name=str(raw.get("name") or default_name), description=raw.get("description", ""),
                   sections=sections)  # fmt: skip
    if kind in ("train", "tune"):
        spec.experiment  # noqa: B018 - validate now, so a bad spec fails before Ray starts
    if kind == "tune":
        tune_config_from_section(sections.get("tune"))
    return spec


def run_spec(spec: JobSpec, echo=print, name: str | None = None) -> Any:
    """Run a job spec on this machine (local Ray, or the cluster given by resources.address/RAY_ADDRESS)."""
    if spec.kind == "train":
        from vaedist.train import run_training

        result = run_training(spec.experiment, name=name or spec.name, echo=echo)
        echo(f"model: {result.model_uri}  (val -ELBO {result.metrics.get('val_neg_elbo', float('nan')):.2f} nats"
             f"{', now champion' if result.champion else ''})")  # fmt: skip
        return result
    if spec.kind == "tune":
        from vaedist.tune import run_tune

        return run_tune(spec.experiment, tune_config_from_section(spec.sections.get("tune")), job_name=name or spec.name,
                        echo=echo)  # fmt: skip
    raise ConfigError(f"kind {spec.kind!r} is not available yet in this version of vaedist")


# ----------------------------------------------------------------------------------------------------
# (section: submission through the Ray Jobs API)
