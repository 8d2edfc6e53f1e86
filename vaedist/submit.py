"""``vaedist submit`` and ``vaedist jobs list|status|logs|stop``: job specs sent to a Ray cluster, and watched.

``vaedist submit NAME --address URL`` sends ``python -m vaedist run jobs/NAME.yaml [--preset P]`` through
Ray's Jobs API (:mod:`vaedist.jobs_api`) with the project folder as ``working_dir``. The spec is loaded and
checked here first (:mod:`vaedist.jobs`), so a bad spec never reaches the cluster. The submission id is
deterministic, so a repeated submit finds the job it sent before: what to do then (attach, report, send
again) is a pure decision, :func:`decide_submission`, apart from the calls. ``vaedist run`` never imports
this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaedist.config import ResourcesConfig, section_from_dict
from vaedist.errors import UsageError, VaedistError, first_line, redact_url
from vaedist.jobs import JobSpec, load_spec, project_root, resolve_job_path
from vaedist.jobs_api import TERMINAL, JobsAPI, is_local_address, jobs_address, require_address

Echo = Callable[[str], None]

# Never uploaded: environments, stores, outputs (.gitignore is honoured too, by Ray).
SUBMIT_EXCLUDES = (
    "/.venv", "/.git", "/mlflow.db", "/mlruns", "/mlartifacts", "/vaedist-runs", "/out",
    "__pycache__", "/test-artifacts", "*.egg-info", "/.pytest_cache", "/.ruff_cache",
)  # fmt: skip
# Sent to the job only where set here. VAEDIST_VERBOSE: `vaedist -v submit` shows Ray's and MLflow's INFO
# lines in the job's logs too (the job's own `vaedist run` reads it as if given -v).
PASS_THROUGH_ENV = ("VAEDIST_DATA_DIR", "VAEDIST_STORAGE_PATH", "VAEDIST_VERBOSE")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _address_hint(url: str) -> str:
    """The --address part of the commands vaedist suggests (a password in the URL is masked)."""
    return f"--address {shlex.quote(redact_url(url))}"


# -------------------------------------------------------------------------------- the plan


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


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _spec_in_project(job: str, root: Path) -> Path:
    """The spec's path relative to ``root``: the cluster receives the project folder and nothing else."""
    if not (root / "pyproject.toml").is_file() or not (root / "jobs").is_dir():
        raise UsageError(
            f"vaedist submit sends the project folder, but vaedist is imported from {root}, which is not a "
            "vaedist checkout; run it from a source install (pip install -e .)"
        )
    path = resolve_job_path(job).resolve()
    try:
        return path.relative_to(root)
    except ValueError:
        raise UsageError(
            f"{path} is outside the project folder {root}, which is all the cluster receives; "
            f"put the spec under {root / 'jobs'}"
        ) from None


def plan_submission(
    job: str, preset: str | None = None, root: Path | None = None, dataset: str | None = None
) -> tuple[JobSpec, Submission]:
    """Validate the spec here (a bad spec never reaches the cluster) and build what is sent. ``dataset``
    replaces the spec's (the entrypoint gets ``--dataset``; the submission id covers it)."""
    from vaedist.tracking import tracking_uri

    overrides = {"data": {"dataset": dataset}} if dataset else None
    spec = load_spec(job, preset=preset, overrides=overrides)  # unknown job -> the valid ones; unknown key -> its name
    root = root or project_root()
    rel = _spec_in_project(job, root).as_posix()
    env = {"MLFLOW_TRACKING_URI": tracking_uri()}
    env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if os.environ.get(k)})
    resources = section_from_dict(ResourcesConfig, spec.sections.get("resources"), "resources")
    preset_arg = f" --preset {shlex.quote(preset)}" if preset else ""
    preset_arg += f" --dataset {shlex.quote(dataset)}" if dataset else ""
    base_id = submission_id(spec.name, preset, (root / rel).read_bytes() + (dataset or "").encode())
    return spec, Submission(
        name=spec.name,
        preset=preset,
        spec_path=rel,
        base_id=base_id,
        entrypoint=f"python -m vaedist run {shlex.quote(rel)}{preset_arg}",
        runtime_env={"working_dir": str(root), "excludes": list(SUBMIT_EXCLUDES), "env_vars": env},
        entrypoint_num_cpus=_float_or_none(resources.entrypoint_num_cpus),
        entrypoint_num_gpus=_float_or_none(resources.entrypoint_num_gpus),
        metadata={"vaedist.job": spec.name, "vaedist.preset": preset or "", "vaedist.spec": rel,
                  "vaedist.base_id": base_id, **({"vaedist.dataset": dataset} if dataset else {})},
    )  # fmt: skip


# -------------------------------------------------------------------------------- decisions


class SubmitAction(enum.Enum):
    """What ``vaedist submit`` does, given the submissions of the same plan already on the cluster."""

    SUBMIT = "submit"  # none yet, or --resubmit: send it under the next id of the family
    REPORT = "report"  # the latest one ended: say how, exit with its outcome, send nothing
    ATTACH = "attach"  # the latest one is pending or running: follow it as if it had just been sent
    POINT = "point"  # the latest one is running and --no-wait: say how to follow it, and return


def _family_index(base_id: str, sid: str) -> int | None:
    """1 for ``base_id``, N for ``base_id-rN``, None for a submission of another plan."""
    m = re.fullmatch(rf"{re.escape(base_id)}(?:-r(\d+))?", sid)
    return int(m.group(1) or 1) if m else None


def family_of(base_id: str, jobs: Iterable) -> list:
    """The submissions of one plan, oldest first: base_id, base_id-r2, base_id-r3, ..."""
    found = [(i, j) for j in jobs if (i := _family_index(base_id, j.submission_id)) is not None]
    return [j for _, j in sorted(found, key=lambda t: t[0])]


def next_submission_id(base_id: str, family_ids: Sequence[str]) -> str:
    """``base_id`` for the first submission; then ``-rN`` after the highest N there is (base_id is r1).

    A new id each time, because Ray does not support re-submitting the id of a deleted job; and after the
    highest, not after the count, so that a family with a deleted member (base, -r3) does not reuse -r3.
    """
    taken = [i for i in (_family_index(base_id, sid) for sid in family_ids) if i is not None]
    return f"{base_id}-r{max(taken) + 1}" if taken else base_id


def decide_submission(statuses: Sequence[str], *, resubmit: bool, wait: bool) -> SubmitAction:
    """``statuses``: those of the plan's earlier submissions, oldest first (empty: none)."""
    if not statuses or resubmit:
        return SubmitAction.SUBMIT
    if statuses[-1] in TERMINAL:
        return SubmitAction.REPORT
    return SubmitAction.ATTACH if wait else SubmitAction.POINT


def tracking_is_private(tracking_uri: str, url: str) -> bool:
    """True when the MLflow store is a file on this machine and the cluster is elsewhere: its jobs would
    write their runs to a store of their own that nobody looks at."""
    return not tracking_uri.startswith(("http://", "https://", "databricks")) and not is_local_address(url)


def outcome(status: str) -> int:
    """The exit code a job's final status maps to: 0 SUCCEEDED, 1 FAILED or STOPPED."""
    return 0 if status == "SUCCEEDED" else 1


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


# -------------------------------------------------------------------------------- submit


def submit_spec(
    job: str,
    address: str,
    preset: str | None = None,
    wait: bool = True,
    resubmit: bool = False,
    echo: Echo = print,
    warn: Echo | None = None,
    out: Echo | None = None,
    dataset: str | None = None,
) -> int:
    """Submit jobs/JOB.yaml to the cluster at ``address`` (once: a repeat attaches); return the exit code."""
    warn = warn or _stderr
    _, plan = plan_submission(job, preset, dataset=dataset)
    url = jobs_address(address)
    assert url is not None
    api = JobsAPI(url)
    hint = _address_hint(url)
    tracking = plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    if tracking_is_private(tracking, url):
        warn(
            f"warning: MLFLOW_TRACKING_URI is {tracking}, a store on this machine that the cluster's workers "
            "cannot see; run an MLflow server (cluster/mlflow) and export MLFLOW_TRACKING_URI=http://..."
        )

    family = family_of(plan.base_id, api.submissions())
    action = decide_submission([str(j.status) for j in family], resubmit=resubmit, wait=wait)
    if action is SubmitAction.SUBMIT:
        sid = next_submission_id(plan.base_id, [j.submission_id for j in family])
        if not _send(api, plan, sid, echo, wait):
            return 0
        echo(f"following {sid} (Ctrl-C detaches; the job keeps running)")
        return follow(api, sid, echo=echo, warn=warn, out=out, hint=hint)
    last = family[-1]
    status = str(last.status)
    if action is SubmitAction.REPORT:
        rerun = shlex.join([job, *(["--preset", preset] if preset else []), *(["--dataset", dataset] if dataset else [])])
        echo(f"{last.submission_id} already ran: {status} after {_duration(last)}"
             f"{f' ({last.message})' if last.message and status != 'SUCCEEDED' else ''}")  # fmt: skip
        echo(f"  logs      vaedist jobs logs {last.submission_id} {hint}")
        echo(f"  run again vaedist submit {rerun} {hint} --resubmit")
        return outcome(status)
    if action is SubmitAction.POINT:
        echo(f"{last.submission_id} is already {status}; follow it: vaedist jobs logs {last.submission_id} "
             f"--follow {hint}")  # fmt: skip
        return 0
    echo(f"{last.submission_id} is already {status}: attaching to its logs (Ctrl-C detaches)")
    return follow(api, last.submission_id, echo=echo, warn=warn, out=out, hint=hint)


def _send(api: JobsAPI, plan: Submission, sid: str, echo: Echo, wait: bool) -> bool:
    """Submit ``plan`` as ``sid``; False where the caller should not follow it (--no-wait)."""
    shown, hint = redact_url(api.url), _address_hint(api.url)
    preset = f" (preset {plan.preset})" if plan.preset else ""
    echo(f"submitting {plan.spec_path}{preset} to {shown} as {sid}")
    echo(f"  entrypoint   {plan.entrypoint}")
    echo(f"  working_dir  {plan.runtime_env['working_dir']} "
         f"(without {', '.join(s.strip('/') for s in SUBMIT_EXCLUDES)})")  # fmt: skip
    echo(f"  MLflow       {redact_url(plan.runtime_env['env_vars']['MLFLOW_TRACKING_URI'])}")
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
    return wait


# -------------------------------------------------------------------------------- follow


def follow(
    api: JobsAPI,
    job_id: str,
    echo: Echo = print,
    warn: Echo | None = None,
    out: Echo | None = None,
    hint: str = "",
    poll_s: float = 2.0,
    quiet_s: float = 30.0,
) -> int:
    """Stream a job's logs until it ends, with status changes (and a heartbeat when it is quiet) on stderr."""
    warn = warn or _stderr
    api.info(job_id)  # an unknown id fails here, in one line
    try:
        asyncio.run(_stream(api, job_id, warn, out or _stdout, poll_s, quiet_s))
        status = _wait_terminal(api, job_id, poll_s)
    except KeyboardInterrupt:
        echo(f"\ndetached from {job_id}; it keeps running. follow: vaedist jobs logs {job_id} --follow {hint}  "
             f"stop: vaedist jobs stop {job_id} {hint}")  # fmt: skip
        return 130
    info = api.info(job_id)
    tail_msg = f": {info.message}" if info.message and status != "SUCCEEDED" else ""
    echo(f"{job_id} {status} after {_duration(info)}{tail_msg}")
    return outcome(status)


async def _stream(api: JobsAPI, job_id: str, warn: Echo, out: Echo, poll_s: float, quiet_s: float) -> None:
    """The job's log to ``out`` while a watcher polls its status to ``warn``; returns when the stream ends."""
    t0 = time.monotonic()
    last_output = [t0]  # when anything was last shown: the heartbeat comes after quiet_s of silence

    async def watch(done: asyncio.Event) -> None:
        last = None
        while not done.is_set():
            status = await asyncio.to_thread(api.status, job_id)
            if status != last or time.monotonic() - last_output[0] >= quiet_s:
                warn(f"[vaedist] {job_id}: {status} ({_clock(time.monotonic() - t0)})")
                last = status
                last_output[0] = time.monotonic()
            if status in TERMINAL:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), poll_s)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    try:
        async for chunk in api.client.tail_job_logs(job_id):
            out(chunk)
            last_output[0] = time.monotonic()
    except Exception as exc:  # the stream is a convenience: the status poll decides the outcome
        warn(f"[vaedist] log stream of {job_id} closed ({first_line(exc)}); waiting for the job to end")
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await watcher


def _wait_terminal(api: JobsAPI, job_id: str, poll_s: float) -> str:
    """The log stream can end a moment before the status turns final; wait for the status."""
    while True:
        status = api.status(job_id)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# -------------------------------------------------------------------------------- jobs ...


def jobs_list(address: str | None, echo: Echo = print) -> int:
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


def jobs_status(address: str | None, job_id: str, echo: Echo = print) -> int:
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
    address: str | None, job_id: str, follow_logs: bool = False, echo: Echo = print, out: Echo | None = None
) -> int:
    url = require_address(address)
    api = JobsAPI(url)
    if follow_logs:
        return follow(api, job_id, echo=echo, out=out, hint=_address_hint(url))
    (out or _stdout)(api.call(lambda: api.client.get_job_logs(job_id), job_id))
    return 0


def jobs_stop(address: str | None, job_id: str, echo: Echo = print, wait_s: float = 30) -> int:
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
