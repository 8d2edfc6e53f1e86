"""Named jobs: ``jobs/NAME.yaml`` specs, run here (``vaedist run``).

A job spec is YAML with a ``kind`` (train | tune | generate | evaluate | pipeline), the config sections
of that kind, optional ``presets`` (deep-merged overrides chosen with ``--preset``), and ``resources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import os
import re
import shlex
import sys
import time
import urllib.parse
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
    experiment_from_dict,
    section_from_dict,
    tune_config_from_section,
)
from vaedist.errors import UsageError, VaedistError, redact_url

KINDS = ("train", "tune", "generate", "evaluate", "pipeline")
JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
# Keys a spec may have besides the config sections.
META_KEYS = ("kind", "name", "description", "presets")
# The sections each kind reads (a section another kind reads would be silently ignored: refused instead);
# the validation of tune/generate/evaluate/steps belongs to the module that runs them.
_TRAINING = ("data", "model", "train", "resources")
KIND_SECTIONS = {
    "train": _TRAINING,
    "tune": (*_TRAINING, "tune"),
    "generate": ("generate", "resources"),
    "evaluate": ("evaluate", "resources"),
    "pipeline": (*_TRAINING, "steps", "tune", "generate", "evaluate"),
}


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    description: str = ""
    sections: dict[str, Any] = field(default_factory=dict)  # raw, after preset merge

    @property
    def experiment(self) -> ExperimentConfig:
        return experiment_from_dict({k: v for k, v in self.sections.items() if k in SECTIONS})


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
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: kind {kind!r} is not one of {', '.join(KINDS)}")
    allowed = (*META_KEYS, *KIND_SECTIONS[kind])
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} for kind {kind} (allowed: {', '.join(allowed)})")
    sections = {k: v for k, v in raw.items() if k not in META_KEYS}
    presets = raw.get("presets") or {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{source}: no preset {preset!r} (presets: {', '.join(presets) or 'none'})")
        sections = deep_merge(sections, presets[preset])
    if overrides:
        sections = deep_merge(sections, overrides)
    unknown = sorted(set(sections) - set(KIND_SECTIONS[kind]))
    if unknown:
        raise ConfigError(
            f"{source}: section {unknown[0]!r} (from a preset or override) is not read by kind {kind} "
            f"(sections: {', '.join(KIND_SECTIONS[kind])})"
        )
    spec = JobSpec(kind=kind, name=str(raw.get("name") or default_name), description=raw.get("description", ""),
                   sections=sections)  # fmt: skip
    if kind in ("train", "tune"):
        spec.experiment  # noqa: B018 - validate now, so a bad spec fails before Ray starts
    if kind == "tune":
        tune_config_from_section(sections.get("tune"))
    if kind == "evaluate":
        section_from_dict(EvaluateConfig, sections.get("evaluate"), "evaluate")
        section_from_dict(ResourcesConfig, sections.get("resources"), "resources")
    if kind == "pipeline":
        _pipeline_steps(spec)
    return spec


def evaluate_what(cfg: EvaluateConfig) -> str:
    """Which evaluations an evaluate section asks for: a model is scored, generated data gets a CAS."""
    return "all" if cfg.model and cfg.generated else "likelihood" if cfg.model else "cas"


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
    if spec.kind == "generate":
        from vaedist.generate import configs_from_spec, run_generate

        cfg, resources = configs_from_spec(spec.sections)
        return run_generate(cfg, resources, echo=echo)
    if spec.kind == "pipeline":
        return run_pipeline(spec, echo=echo)
    if spec.kind == "evaluate":
        from vaedist.evaluate import run_evaluate

        cfg = section_from_dict(EvaluateConfig, spec.sections.get("evaluate"), "evaluate")
        resources = section_from_dict(ResourcesConfig, spec.sections.get("resources"), "resources")
        return run_evaluate(cfg, resources, evaluate_what(cfg), echo=echo)
    raise ConfigError(f"kind {spec.kind!r} is not available yet in this version of vaedist")


# ----------------------------------------------------------------------------------------------------
# Pipelines: tune (or train) -> champion -> generate -> evaluate, each step fed by the one before

PIPELINE_STEPS = ("train", "tune", "generate", "evaluate")


@dataclass
class PipelineResult:
    model_uri: str = ""
    champion: bool = False
    generated: str = ""
    rows: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)


def _pipeline_steps(spec: JobSpec) -> list[str]:
    steps = spec.sections.get("steps")
    where = f"{spec.name}: steps"
    if not isinstance(steps, list) or not steps or any(s not in PIPELINE_STEPS for s in steps):
        raise ConfigError(f"{where}: must be a list drawn from {', '.join(PIPELINE_STEPS)}, got {steps!r}")
    if "train" in steps and "tune" in steps:
        raise ConfigError(f"{where}: give train or tune, not both (each produces the model)")
    order = [s for s in PIPELINE_STEPS if s in steps]
    if steps != order or len(set(steps)) != len(steps):
        raise ConfigError(f"{where}: {steps} must run in the order {', '.join(order)}, each once")
    spec.experiment  # noqa: B018 - the shared data/model/train/resources sections
    if "tune" in steps:
        tune_config_from_section(spec.sections.get("tune"))
    return steps


def run_pipeline(spec: JobSpec, echo=print) -> PipelineResult:
    """Run the steps in order; each takes the previous step's output (model URI, Parquet folder).

    A rerun skips what is done: a finished train run or search is reused, a complete generated folder
    with the same plan is left alone, and only missing work runs.
    """
    steps = _pipeline_steps(spec)
    out = PipelineResult(steps=steps)
    resources = spec.sections.get("resources") or {}
    for i, step in enumerate(steps, 1):
        echo(f"== step {i}/{len(steps)}: {step}")
        if step in ("train", "tune"):
            from vaedist import tracking

            if step == "train":
                from vaedist.train import run_training

                result = run_training(spec.experiment, name=f"{spec.name}-train", echo=echo)
            else:
                from vaedist.tune import run_tune

                result = run_tune(spec.experiment, tune_config_from_section(spec.sections.get("tune")),
                                  job_name=spec.name, echo=echo)  # fmt: skip
            out.model_uri = result.model_uri
            # Whether it is the champion now (a reused run did not just become it, but may well be it).
            out.champion = out.model_uri == tracking.champion_uri(spec.experiment.data.dataset)
        elif step == "generate":
            from vaedist.generate import configs_from_spec, run_generate

            section = dict(spec.sections.get("generate") or {})
            if out.model_uri:
                section["model"] = out.model_uri  # the exact version the previous step produced
            cfg, res = configs_from_spec({"generate": section, "resources": resources})
            result = run_generate(cfg, res, echo=echo)
            out.generated, out.rows = result.out, result.rows
        elif step == "evaluate":
            from vaedist.evaluate import run_evaluate

            section = dict(spec.sections.get("evaluate") or {})
            if out.model_uri:
                section["model"] = out.model_uri
            if out.generated:
                section["generated"] = out.generated
            section.setdefault("dataset", spec.experiment.data.dataset)
            cfg = section_from_dict(EvaluateConfig, section, "evaluate")
            res = section_from_dict(ResourcesConfig, resources, "resources")
            out.evaluation = run_evaluate(cfg, res, evaluate_what(cfg), echo=echo, reuse=True)
    return out


# ----------------------------------------------------------------------------------------------------
# (section: submission through the Ray Jobs API)
#
# `vaedist submit NAME --address URL` sends `python -m vaedist run jobs/NAME.yaml [--preset P]` through Ray's
# Jobs API with the project folder as `working_dir`; `vaedist jobs ...` wraps the rest of that API. Ray's SDK
# is imported inside the functions so that `vaedist run` never pays for it.
#
# Facts of Ray 2.60 this code works around (see DESIGN.md, "Facts of the stack"):
# - JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its `address` argument: an
#   explicit --address is made to win by hiding those two while the client is built.
# - The SDK adds the token header only when *this* process has RAY_AUTH_MODE=token. vaedist reads the token
#   itself, the way Ray does ($RAY_AUTH_TOKEN, then the file $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token),
#   and sends it as a header, so a client without RAY_AUTH_MODE still talks to a token-auth head; but only
#   over https:// or to a loopback address (a tunnel), unless RAY_AUTH_MODE=token says to (may_send_token).
# - The SDK's requests carry no timeout: a probe with one comes first, and names the failure.
# - Ray documents re-submitting a deleted job's submission_id as unsupported: --resubmit adds "-rN".


DASHBOARD_PORT = 8265
# Never uploaded: environments, stores, outputs (.gitignore is honoured too, by Ray).
SUBMIT_EXCLUDES = (
    "/.venv", "/.git", "/mlflow.db", "/mlruns", "/mlartifacts", "/vaedist-runs", "/out",
    "__pycache__", "/test-artifacts", "*.egg-info", "/.pytest_cache", "/.ruff_cache",
)  # fmt: skip
PASS_THROUGH_ENV = ("VAEDIST_DATA_DIR", "VAEDIST_STORAGE_PATH")  # sent to the job only where set here
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it) to the cluster's token: "
    "`ray get-auth-token` on the head prints it"
)


def project_root() -> Path:
    """The folder sent as ``working_dir``: the checkout vaedist is imported from."""
    import vaedist

    return Path(vaedist.__file__).resolve().parents[1]


def jobs_address(address: str | None = None) -> str | None:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, as an http(s) URL; None: no cluster given."""
    address = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    ).strip()
    if not address:
        return None
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def is_local_address(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def auth_token() -> tuple[str | None, str]:
    """The Ray auth token and where it came from, in Ray's own order of precedence. Never print the token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise UsageError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({exc.strerror}); {TOKEN_HELP}"
            ) from None
        if not token:
            raise UsageError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {TOKEN_HELP}")
        return token, f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, "nowhere"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _connection_reason(exc: BaseException) -> str:
    """The root cause of a requests ConnectionError, in a few words."""
    import http.client
    import socket

    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "unknown host"
        if isinstance(e, http.client.RemoteDisconnected | http.client.BadStatusLine):
            return "the server there does not speak HTTP/1.1"
        linked = (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ()))
        stack.extend(x for x in linked if isinstance(x, BaseException))
    return _first_line(exc)


def _unreachable(url: str, reason: str) -> VaedistError:
    return VaedistError(
        f"cannot reach the Ray Jobs API at {redact_url(url)} ({reason}); is the head running? "
        f"is this the dashboard port ({DASHBOARD_PORT})?"
    )


def _token_missing(url: str) -> UsageError:
    return UsageError(
        f"the Ray cluster at {redact_url(url)} needs an auth token and none was found; {TOKEN_HELP}"
    )


def _token_withheld(url: str, source: str) -> UsageError:
    return UsageError(
        f"the Ray cluster at {redact_url(url)} needs an auth token; vaedist did not send the one from {source} "
        "in clear text to a non-local http:// address: reach the dashboard through an SSH tunnel or kubectl "
        "port-forward (http://127.0.0.1:8265) or https://, or set RAY_AUTH_MODE=token to send it anyway"
    )


def may_send_token(url: str) -> bool:
    """The cluster token is a key to run any command there: send it only where it cannot be sniffed.

    That is https://, or a loopback address (an SSH tunnel or ``kubectl port-forward``); elsewhere only
    when the user opted in with ``RAY_AUTH_MODE=token``, as Ray's own CLI asks.
    """
    if urllib.parse.urlsplit(url).scheme == "https" or is_local_address(url):
        return True
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


def _token_rejected(url: str, source: str) -> UsageError:
    return UsageError(
        f"the Ray cluster at {redact_url(url)} rejected the auth token from {source}; {TOKEN_HELP}"
    )


@contextlib.contextmanager
def _explicit_address():
    """Hide the variables with which Ray's SDK would override the address it is given."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class JobsAPI:
    """A JobSubmissionClient for ``url`` whose failures are one clear line each."""

    PROBE_TIMEOUT_S = 10

    def __init__(self, url: str):
        import logging

        import requests

        self.url = url
        token, self.token_source = auth_token()
        self.withheld = bool(token) and not may_send_token(url)
        self._headers = {"Authorization": f"Bearer {token}"} if token and not self.withheld else {}
        try:
            r = requests.get(f"{url}/api/version", headers=self._headers, timeout=self.PROBE_TIMEOUT_S)
        except requests.exceptions.Timeout:
            raise _unreachable(url, f"no answer in {self.PROBE_TIMEOUT_S} s") from None
        except requests.exceptions.SSLError as exc:
            raise _unreachable(url, f"TLS: {_first_line(exc)}") from None
        except requests.exceptions.ConnectionError as exc:
            raise _unreachable(url, _connection_reason(exc)) from None
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise UsageError(
                f"--address {redact_url(url)!r} is not a usable URL ({_first_line(exc)}); "
                f"expected http://HEAD:{DASHBOARD_PORT}"
            ) from None
        self._check_auth(r.status_code)
        try:
            r.raise_for_status()
            r.json()["ray_version"]
        except (requests.exceptions.HTTPError, ValueError, KeyError, TypeError):
            raise _unreachable(url, f"HTTP {r.status_code} on /api/version: not a Ray dashboard") from None

        from ray.job_submission import JobSubmissionClient

        # Ray logs each packaged file, upload and websocket close (its modules set INFO when imported, so
        # this comes after the import); vaedist says what matters itself.
        for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                            ("ray.dashboard.modules.job.sdk", logging.WARNING),
                            ("ray._private.runtime_env.packaging", logging.WARNING),
                            ("ray._private.runtime_env.working_dir", logging.ERROR)):  # fmt: skip
            logging.getLogger(name).setLevel(level)

        with _explicit_address():
            self.client = self.call(lambda: JobSubmissionClient(url, headers=dict(self._headers)))

    def _check_auth(self, status: int) -> None:
        if status == 401:
            raise _token_withheld(self.url, self.token_source) if self.withheld else _token_missing(self.url)
        if status == 403:
            raise _token_rejected(self.url, self.token_source)

    def call(self, fn: Callable[[], Any], job_id: str | None = None) -> Any:
        """Run one SDK call, turning its exceptions into vaedist's one-line errors."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as exc:
            text = str(exc)
            if "Forbidden" in text or "invalid" in text.lower():
                raise _token_rejected(self.url, self.token_source) from None
            self._check_auth(401)
        except requests.exceptions.Timeout:
            raise _unreachable(self.url, "timed out") from None
        except (requests.exceptions.ConnectionError, ConnectionError) as exc:
            raise _unreachable(self.url, _connection_reason(exc)) from None
        except RuntimeError as exc:
            text = str(exc)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise UsageError(
                    f"no job {job_id!r} on {redact_url(self.url)} (see: vaedist jobs list --address URL)"
                ) from None
            raise VaedistError(
                f"the Ray Jobs API at {redact_url(self.url)} failed: {_first_line(exc)}"
            ) from None

    def info(self, job_id: str):
        return self.call(lambda: self.client.get_job_info(job_id), job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def submissions(self) -> list:
        """Jobs that came through the Jobs API (drivers that called ray.init themselves are left out)."""
        jobs = self.call(self.client.list_jobs)
        return sorted(
            (j for j in jobs if j.submission_id), key=lambda j: (j.start_time or 0, j.submission_id)
        )


# -------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Submission:
    """What ``vaedist submit`` sends; deterministic from the spec file, the preset and this environment."""

    name: str
    preset: str | None
    spec_path: str  # relative to the project root, as the entrypoint sees it
    base_id: str  # the deterministic submission id; --resubmit adds -r2, -r3, ...
    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_cpus: float | None
    entrypoint_num_gpus: float | None
    metadata: dict[str, str]


def submission_id(name: str, preset: str | None, spec_text: bytes) -> str:
    """``vaedist-<name>[-<preset>]-<10 hex of the spec's sha256>``: an edited spec is a new job, a repeat is not."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "job"
    tag = f"-{re.sub(r'[^A-Za-z0-9_-]+', '-', preset)}" if preset else ""
    return f"vaedist-{slug}{tag}-{hashlib.sha256(spec_text).hexdigest()[:10]}"


def _entrypoint_resource(resources: dict, key: str) -> float | None:
    value = resources.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"resources.{key}: must be a number >= 0, got {value!r}")
    return float(value)


def plan_submission(
    job: str, preset: str | None = None, root: Path | None = None
) -> tuple[JobSpec, Submission]:
    """Validate the spec here (a bad spec never reaches the cluster) and build what is sent."""
    from vaedist.tracking import tracking_uri

    spec = load_spec(job, preset=preset)  # unknown job -> the list of valid ones; unknown key -> its name
    root = root or project_root()
    if not (root / "pyproject.toml").is_file() or not (root / "jobs").is_dir():
        raise UsageError(
            f"vaedist submit sends the project folder, but vaedist is imported from {root}, which is not a "
            "vaedist checkout; run it from a source install (pip install -e .)"
        )
    path = resolve_job_path(job).resolve()
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        raise UsageError(
            f"{path} is outside the project folder {root}, which is all the cluster receives; "
            f"put the spec under {root / 'jobs'}"
        ) from None
    env = {"MLFLOW_TRACKING_URI": tracking_uri()}
    env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if os.environ.get(k)})
    resources = spec.sections.get("resources") or {}
    preset_arg = f" --preset {shlex.quote(preset)}" if preset else ""
    base_id = submission_id(spec.name, preset, path.read_bytes())
    return spec, Submission(
        name=spec.name,
        preset=preset,
        spec_path=rel,
        base_id=base_id,
        entrypoint=f"python -m vaedist run {shlex.quote(rel)}{preset_arg}",
        runtime_env={"working_dir": str(root), "excludes": list(SUBMIT_EXCLUDES), "env_vars": env},
        entrypoint_num_cpus=_entrypoint_resource(resources, "entrypoint_num_cpus"),
        entrypoint_num_gpus=_entrypoint_resource(resources, "entrypoint_num_gpus"),
        metadata={"vaedist.job": spec.name, "vaedist.preset": preset or "", "vaedist.spec": rel,
                  "vaedist.base_id": base_id},
    )  # fmt: skip


def _family(api: JobsAPI, base_id: str) -> list:
    """The submissions of one plan, oldest first: base_id, base_id-r2, base_id-r3, ..."""
    pattern = re.compile(rf"^{re.escape(base_id)}(?:-r(\d+))?$")
    found = []
    for job in api.submissions():
        m = pattern.match(job.submission_id)
        if m:
            found.append((int(m.group(1) or 1), job))
    return [job for _, job in sorted(found, key=lambda t: t[0])]


def _duration(job) -> str:
    if not job.start_time:
        return "-"
    end = job.end_time or time.time() * 1000
    return _clock((end - job.start_time) / 1000)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def outcome(status: str) -> int:
    """The exit code a job's final status maps to: 0 SUCCEEDED, 1 FAILED or STOPPED."""
    return 0 if status == "SUCCEEDED" else 1


# -------------------------------------------------------------------------------------- submit


def submit_spec(
    job: str,
    address: str,
    preset: str | None = None,
    wait: bool = True,
    resubmit: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    out: Callable[[str], None] | None = None,
) -> int:
    """Submit jobs/JOB.yaml to the cluster at ``address`` (once: a repeat attaches); return the exit code."""
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    _, plan = plan_submission(job, preset)
    url = jobs_address(address)
    assert url is not None
    api = JobsAPI(url)
    shown = redact_url(url)
    hint = f"--address {shlex.quote(shown)}"
    tracking = plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    if not tracking.startswith(("http://", "https://", "databricks")) and not is_local_address(url):
        warn(
            f"warning: MLFLOW_TRACKING_URI is {tracking}, a store on this machine that the cluster's workers "
            "cannot see; run an MLflow server (cluster/mlflow) and export MLFLOW_TRACKING_URI=http://..."
        )

    family = _family(api, plan.base_id)
    if family and not resubmit:
        last = family[-1]
        status = str(last.status)
        if status in TERMINAL:
            echo(f"{last.submission_id} already ran: {status} after {_duration(last)}"
                 f"{f' ({last.message})' if last.message and status != 'SUCCEEDED' else ''}")  # fmt: skip
            echo(f"  logs      vaedist jobs logs {last.submission_id} {hint}")
            echo(f"  run again vaedist submit {shlex.join([job, *(['--preset', preset] if preset else [])])} "
                 f"{hint} --resubmit")  # fmt: skip
            return outcome(status)
        if not wait:
            echo(f"{last.submission_id} is already {status}; follow it: vaedist jobs logs {last.submission_id} "
                 f"--follow {hint}")  # fmt: skip
            return 0
        echo(f"{last.submission_id} is already {status}: attaching to its logs (Ctrl-C detaches)")
        return follow(api, last.submission_id, echo=echo, warn=warn, out=out, hint=hint)

    sid = plan.base_id if not family else f"{plan.base_id}-r{len(family) + 1}"
    echo(f"submitting {plan.spec_path}{f' (preset {preset})' if preset else ''} to {shown} as {sid}")
    echo(f"  entrypoint   {plan.entrypoint}")
    echo(
        f"  working_dir  {plan.runtime_env['working_dir']} (without {', '.join(s.strip('/') for s in SUBMIT_EXCLUDES)})"
    )
    echo(f"  MLflow       {redact_url(tracking)}")
    try:
        api.call(
            lambda: api.client.submit_job(
                entrypoint=plan.entrypoint,
                submission_id=sid,
                runtime_env=plan.runtime_env,
                metadata=plan.metadata,
                entrypoint_num_cpus=plan.entrypoint_num_cpus,
                entrypoint_num_gpus=plan.entrypoint_num_gpus,
            )
        )
    except VaedistError as exc:
        if "already exists" not in str(exc):
            raise
        echo(f"{sid} was submitted meanwhile by someone else: attaching to it")
    if not wait:
        echo(f"submitted {sid}; follow it: vaedist jobs logs {sid} --follow {hint}")
        echo(f"  status: vaedist jobs status {sid} {hint}   stop: vaedist jobs stop {sid} {hint}")
        return 0
    echo(f"following {sid} (Ctrl-C detaches; the job keeps running)")
    return follow(api, sid, echo=echo, warn=warn, out=out, hint=hint)


def follow(
    api: JobsAPI,
    job_id: str,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    out: Callable[[str], None] | None = None,
    hint: str = "",
    poll_s: float = 2.0,
    quiet_s: float = 30.0,
) -> int:
    """Stream a job's logs until it ends, with status changes (and a heartbeat when it is quiet) on stderr."""
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    out = out or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    api.info(job_id)  # an unknown id fails here, in one line
    t0 = time.monotonic()
    last_output = [time.monotonic()]

    async def watch(done: asyncio.Event) -> None:
        last = None
        while not done.is_set():
            status = await asyncio.to_thread(api.status, job_id)
            quiet = time.monotonic() - last_output[0] >= quiet_s
            if status != last or quiet:
                warn(f"[vaedist] {job_id}: {status} ({_clock(time.monotonic() - t0)})")
                last = status
                last_output[0] = time.monotonic()
            if status in TERMINAL:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), poll_s)

    async def tail() -> None:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        try:
            async for chunk in api.client.tail_job_logs(job_id):
                out(chunk)
                last_output[0] = time.monotonic()
        except Exception as exc:  # the stream is a convenience: the status poll decides the outcome
            warn(f"[vaedist] log stream of {job_id} closed ({_first_line(exc)}); waiting for the job to end")
        finally:
            done.set()
            with contextlib.suppress(Exception):
                await watcher

    try:
        asyncio.run(tail())
        status = _wait_terminal(api, job_id, poll_s)
    except KeyboardInterrupt:
        echo(f"\ndetached from {job_id}; it keeps running. follow: vaedist jobs logs {job_id} --follow {hint}  "
             f"stop: vaedist jobs stop {job_id} {hint}")  # fmt: skip
        return 130
    info = api.info(job_id)
    tail_msg = f": {info.message}" if info.message and status != "SUCCEEDED" else ""
    echo(f"{job_id} {status} after {_duration(info)}{tail_msg}")
    return outcome(status)


def _wait_terminal(api: JobsAPI, job_id: str, poll_s: float) -> str:
    """The log stream can end a moment before the status turns final; wait for the status."""
    while True:
        status = api.status(job_id)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# -------------------------------------------------------------------------------------- jobs ...


def require_address(address: str | None) -> str:
    url = jobs_address(address)
    if url is None:
        raise UsageError(
            f"no Ray cluster given: pass --address http://HEAD:{DASHBOARD_PORT} or set RAY_ADDRESS "
            "(RAY_API_SERVER_ADDRESS) to the head's dashboard URL"
        )
    return url


def jobs_list(address: str | None, echo: Callable[[str], None] = print) -> int:
    api = JobsAPI(require_address(address))
    jobs = api.submissions()
    if not jobs:
        echo(f"no jobs on {redact_url(api.url)}")
        return 0
    width = max(len("SUBMISSION ID"), *(len(j.submission_id) for j in jobs))
    echo(f"{'SUBMISSION ID':{width}s}  {'STATUS':9s}  {'STARTED':19s}  {'TIME':>7s}  ENTRYPOINT")
    for j in jobs:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        )
        entry = " ".join(j.entrypoint.split())
        entry = entry if len(entry) <= 70 else entry[:67] + "..."
        echo(f"{j.submission_id:{width}s}  {str(j.status):9s}  {started:19s}  {_duration(j):>7s}  {entry}")
    return 0


def jobs_status(address: str | None, job_id: str, echo: Callable[[str], None] = print) -> int:
    api = JobsAPI(require_address(address))
    info = api.info(job_id)
    echo(f"{job_id}: {info.status} ({_duration(info)})")
    if info.message:
        echo(f"  message     {info.message}")
    echo(f"  entrypoint  {info.entrypoint}")
    for key, value in sorted((info.metadata or {}).items()):
        if key.startswith("vaedist.") and value:
            echo(f"  {key[len('vaedist.') :]:11s} {value}")
    if info.driver_exit_code is not None:
        echo(f"  exit code   {info.driver_exit_code}")
    return 0


def jobs_logs(
    address: str | None,
    job_id: str,
    follow_logs: bool = False,
    echo: Callable[[str], None] = print,
    out: Callable[[str], None] | None = None,
) -> int:
    url = require_address(address)
    api = JobsAPI(url)
    if follow_logs:
        return follow(api, job_id, echo=echo, out=out, hint=f"--address {shlex.quote(redact_url(url))}")
    out = out or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    out(api.call(lambda: api.client.get_job_logs(job_id), job_id))
    return 0


def jobs_stop(
    address: str | None, job_id: str, echo: Callable[[str], None] = print, wait_s: float = 30
) -> int:
    api = JobsAPI(require_address(address))
    if not api.call(lambda: api.client.stop_job(job_id), job_id):
        echo(f"{job_id} is not running ({api.status(job_id)})")
        return 0
    deadline = time.monotonic() + wait_s
    status = api.status(job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = api.status(job_id)
    echo(f"{job_id}: {status}" if status in TERMINAL else f"{job_id}: stop requested (still {status})")
    return 0
