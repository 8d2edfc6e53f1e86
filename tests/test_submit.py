"""``vaedist submit`` and ``vaedist jobs``: the plan, the decisions, bad input, and the real thing.

Without a cluster (the fast tier): the submission plan and its id, the address and token policy, what a
repeated submit does (decide_submission, and submit_spec on a fake Jobs API), and the one-line errors of
unreachable, wrong or token-hungry servers (small local HTTP servers).

The real thing: a Ray head started with ``ray start --head`` and token auth (tests/raycluster.py), an
``mlflow server`` in front of sqlite, and the real smoke presets on real MNIST. One job goes through
``vaedist submit`` (a subprocess, as a user types it), another through Ray's own ``ray job submit`` CLI,
both at once on the 2 CPUs of the head; then MLflow must hold their runs, pictures and the champion.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from raycluster import BIN, MlflowServer, RayHead, free_port

from vaedist import jobs, jobs_api, submit
from vaedist.cli import main
from vaedist.errors import UsageError, VaedistError, redact_url

REPO = Path(__file__).resolve().parents[1]
TUNE_JOB = "tune-mnist" if (REPO / "jobs" / "tune-mnist.yaml").is_file() else None
SUBMIT_JOB = TUNE_JOB or "train-mnist"
_RAY_AUTH = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
)


def _one_error_line(output: str) -> str:
    """The CLI's error is one line starting 'error: ', with no traceback around it."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


# ------------------------------------------------------------------------------------ no cluster


def test_plan_is_deterministic_and_carries_what_the_job_needs(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("VAEDIST_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token")
    spec, plan = submit.plan_submission("train-mnist", preset="smoke")
    _, again = submit.plan_submission("jobs/train-mnist.yaml", preset="smoke")
    _, other = submit.plan_submission("train-mnist")
    assert spec.name == "train-mnist"
    assert plan.base_id == again.base_id and plan.base_id.startswith("vaedist-train-mnist-smoke-")
    assert other.base_id != plan.base_id and other.base_id.startswith("vaedist-train-mnist-")
    assert plan.entrypoint == "python -m vaedist run jobs/train-mnist.yaml --preset smoke"
    assert other.entrypoint == "python -m vaedist run jobs/train-mnist.yaml"
    env = plan.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["VAEDIST_DATA_DIR"] == str(tmp_path)
    assert "s3cr3t-token" not in repr(plan)  # the token travels in a header, never in the job's env
    assert Path(plan.runtime_env["working_dir"]) == REPO
    assert {"/.venv", "/.git", "/mlflow.db", "/mlruns", "__pycache__", "*.egg-info"} <= set(
        plan.runtime_env["excludes"]
    )
    assert plan.entrypoint_num_cpus is None and plan.entrypoint_num_gpus is None

    monkeypatch.delenv("VAEDIST_DATA_DIR")
    monkeypatch.delenv("VAEDIST_VERBOSE", raising=False)
    _, bare = submit.plan_submission("train-mnist", preset="smoke")
    assert "VAEDIST_DATA_DIR" not in bare.runtime_env["env_vars"]
    assert "VAEDIST_VERBOSE" not in bare.runtime_env["env_vars"]
    monkeypatch.setenv("VAEDIST_VERBOSE", "1")  # `vaedist -v submit`: the job's logs read as verbose too
    _, verbose = submit.plan_submission("train-mnist", preset="smoke")
    assert verbose.runtime_env["env_vars"]["VAEDIST_VERBOSE"] == "1" and verbose.base_id == bare.base_id
    # The id follows the spec file's contents: an edited spec is another job.
    assert submit.submission_id("train-mnist", "smoke", b"a") != submit.submission_id(
        "train-mnist", "smoke", b"b"
    )


def test_token_is_found_where_ray_looks(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert jobs_api.auth_token() == (None, "nowhere")
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs_api.auth_token()[0] == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs_api.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs_api.auth_token() == ("from-env", "$RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(VaedistError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        jobs_api.auth_token()


def test_address_defaults_and_explicit_wins(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert jobs_api.jobs_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "head:8265")
    assert jobs_api.jobs_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api.example/")
    assert jobs_api.jobs_address(None) == "https://api.example"
    assert jobs_api.jobs_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert redact_url("http://u:pw@h:1/x") == "http://u:***@h:1/x"


def test_local_addresses_and_where_the_token_may_go(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    for url in ("http://127.0.0.1:8265", "http://127.8.9.1", "http://localhost:8265", "http://[::1]:8265"):
        assert jobs_api.is_local_address(url) and jobs_api.may_send_token(url), url
    assert not jobs_api.is_local_address("http://10.0.0.5:8265")
    assert jobs_api.may_send_token("https://ray.example")  # encrypted: fine anywhere
    assert not jobs_api.may_send_token("http://10.0.0.5:8265")  # clear text to another machine: no
    monkeypatch.setenv("RAY_AUTH_MODE", "Token ")  # ... unless the user opted in, as with Ray's CLI
    assert jobs_api.may_send_token("http://10.0.0.5:8265")


def test_auth_errors_say_what_the_status_means():
    url = "http://u:pw@10.0.0.5:8265"
    assert jobs_api.auth_error(url, 200, withheld=False, source="nowhere") is None
    assert jobs_api.auth_error(url, 404, withheld=True, source="nowhere") is None
    missing = jobs_api.auth_error(url, 401, withheld=False, source="nowhere")
    withheld = jobs_api.auth_error(url, 401, withheld=True, source="$RAY_AUTH_TOKEN")
    rejected = jobs_api.auth_error(url, 403, withheld=False, source="$RAY_AUTH_TOKEN")
    assert all(isinstance(e, UsageError) for e in (missing, withheld, rejected))
    assert str(missing).startswith("the Ray cluster at http://u:***@10.0.0.5:8265 needs an auth token and none")
    assert "did not send the one from $RAY_AUTH_TOKEN in clear text" in str(withheld)
    assert "http://127.0.0.1:8265" in str(withheld) and "RAY_AUTH_MODE=token" in str(withheld)
    assert "rejected the auth token from $RAY_AUTH_TOKEN" in str(rejected)
    assert all("ray get-auth-token" in str(e) for e in (missing, rejected))
    assert all("pw" not in str(e) for e in (missing, withheld, rejected))


def test_a_repeated_submit_attaches_reports_or_sends_again():
    decide, A = submit.decide_submission, submit.SubmitAction
    assert decide([], resubmit=False, wait=True) is A.SUBMIT
    assert decide([], resubmit=True, wait=False) is A.SUBMIT
    for ended in submit.TERMINAL:
        assert decide(["RUNNING", ended], resubmit=False, wait=True) is A.REPORT
        assert decide([ended], resubmit=False, wait=False) is A.REPORT
        assert decide([ended], resubmit=True, wait=True) is A.SUBMIT
    for live in ("PENDING", "RUNNING"):
        assert decide(["FAILED", live], resubmit=False, wait=True) is A.ATTACH
        assert decide([live], resubmit=False, wait=False) is A.POINT
        assert decide([live], resubmit=True, wait=True) is A.SUBMIT  # --resubmit sends another beside it
    assert [submit.outcome(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 1]


def test_a_plan_family_is_its_base_id_and_the_resubmits_in_order():
    from types import SimpleNamespace

    base = "vaedist-train-mnist-smoke-0123456789"
    on_cluster = [SimpleNamespace(submission_id=sid) for sid in (
        f"{base}-r10", f"{base}-r2", "vaedist-train-mnist-0123456789", base, f"{base}-r2x", f"{base}x", f"{base}-r3",
    )]  # fmt: skip
    family = [j.submission_id for j in submit.family_of(base, on_cluster)]
    assert family == [base, f"{base}-r2", f"{base}-r3", f"{base}-r10"]
    assert submit.next_submission_id(base, []) == base
    assert submit.next_submission_id(base, [base]) == f"{base}-r2"
    assert submit.next_submission_id(base, family) == f"{base}-r11"
    # After the highest, not the count: a deleted -r2 must not make the next one collide with -r3.
    assert submit.next_submission_id(base, [base, f"{base}-r3"]) == f"{base}-r4"
    assert submit.next_submission_id(base, [f"{base}-r2"]) == f"{base}-r3"  # the base itself deleted


def test_a_local_mlflow_store_is_private_only_to_a_remote_cluster():
    remote, tunnel = "http://10.0.0.5:8265", "http://127.0.0.1:8265"
    assert submit.tracking_is_private("sqlite:////home/me/mlflow.db", remote)
    assert submit.tracking_is_private("file:///home/me/mlruns", remote)
    assert not submit.tracking_is_private("sqlite:////home/me/mlflow.db", tunnel)
    for served in ("http://mlflow:5000", "https://mlflow.example", "databricks"):
        assert not submit.tracking_is_private(served, remote)


def test_durations_read_as_a_clock():
    assert [submit._clock(s) for s in (-3, 0, 59.9, 61, 3599, 3600, 3725)] == [
        "0:00", "0:00", "0:59", "1:01", "59:59", "1:00:00", "1:02:05",
    ]  # fmt: skip


class _FakeJobsAPI:
    """What submit_spec asks of the Jobs API, with the given jobs already on the cluster."""

    def __init__(self, jobs: list):
        from types import SimpleNamespace

        self.url, self.jobs, self.sent = "http://127.0.0.1:8265", jobs, []
        self.client = SimpleNamespace(submit_job=lambda **kw: self.sent.append(kw))

    def submissions(self) -> list:
        return self.jobs

    def call(self, fn, job_id=None):
        return fn()


def _submit_with(monkeypatch, jobs: list, **kwargs) -> tuple[int, list[str], _FakeJobsAPI]:
    api = _FakeJobsAPI(jobs)
    monkeypatch.setattr(submit, "JobsAPI", lambda url: api)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    said: list[str] = []
    rc = submit.submit_spec("train-mnist", "127.0.0.1:8265", preset="smoke", echo=said.append,
                            warn=said.append, **kwargs)  # fmt: skip
    return rc, said, api


def test_submit_acts_on_the_decision_without_a_cluster(monkeypatch):
    from types import SimpleNamespace

    base = submit.plan_submission("train-mnist", preset="smoke")[1].base_id
    rc, said, api = _submit_with(monkeypatch, [], wait=False)
    assert rc == 0 and [kw["submission_id"] for kw in api.sent] == [base]
    assert api.sent[0]["entrypoint"] == "python -m vaedist run jobs/train-mnist.yaml --preset smoke"
    assert said[0] == f"submitting jobs/train-mnist.yaml (preset smoke) to http://127.0.0.1:8265 as {base}"
    assert f"submitted {base}; follow it: vaedist jobs logs {base} --follow --address http://127.0.0.1:8265" in said

    failed = SimpleNamespace(submission_id=base, status="FAILED", message="boom", start_time=1000, end_time=66000)
    rc, said, api = _submit_with(monkeypatch, [failed])
    assert rc == 1 and not api.sent
    assert said == [
        f"{base} already ran: FAILED after 1:05 (boom)",
        f"  logs      vaedist jobs logs {base} --address http://127.0.0.1:8265",
        "  run again vaedist submit train-mnist --preset smoke --address http://127.0.0.1:8265 --resubmit",
    ]
    rc, said, api = _submit_with(monkeypatch, [failed], wait=False, resubmit=True)
    assert rc == 0 and [kw["submission_id"] for kw in api.sent] == [f"{base}-r2"]

    running = SimpleNamespace(submission_id=f"{base}-r2", status="RUNNING", message="", start_time=1, end_time=None)
    rc, said, api = _submit_with(monkeypatch, [failed, running], wait=False)
    assert rc == 0 and not api.sent
    assert said == [f"{base}-r2 is already RUNNING; follow it: vaedist jobs logs {base}-r2 --follow "
                    "--address http://127.0.0.1:8265"]  # fmt: skip


def test_entrypoint_resources_are_checked_with_the_resources_section(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "jobs").mkdir()
    spec = tmp_path / "jobs" / "gen.yaml"
    spec.write_text("kind: generate\ngenerate: {per_label: 1}\nresources: {entrypoint_num_cpus: 0.5}\n")
    _, plan = submit.plan_submission(str(spec), root=tmp_path)
    assert plan.entrypoint_num_cpus == 0.5 and plan.entrypoint_num_gpus is None
    assert plan.spec_path == "jobs/gen.yaml" and plan.entrypoint == "python -m vaedist run jobs/gen.yaml"
    spec.write_text("kind: generate\ngenerate: {per_label: 1}\nresources: {entrypoint_num_gpus: -1}\n")
    with pytest.raises(UsageError, match=r"^resources.entrypoint_num_gpus: must be a number >= 0.0, got -1$"):
        submit.plan_submission(str(spec), root=tmp_path)


def test_unknown_job_lists_the_valid_ones():
    result = CliRunner().invoke(main, ["submit", "no-such-job", "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "no job 'no-such-job'" in line and "train-mnist" in line and "demo" in line


def _shipped_specs() -> list[tuple[str, str | None]]:
    import yaml

    out = []
    for name in jobs.available_jobs():
        presets = yaml.safe_load((jobs.JOBS_DIR / f"{name}.yaml").read_text()).get("presets") or {}
        out += [(name, None), *((name, p) for p in presets)]
    return out


def _stand_in_folder(spec_name: str, tmp_path: Path, monkeypatch) -> None:
    """A spec that trains on an image folder (a path relative to where it runs) is validated against a
    stand-in of that folder (train/ and test/, 32x32 RGB JPEGs of ten classes, two images each) in a
    working directory of its own: the fast tier has no data, and the check is the spec's, not the data's."""
    import numpy as np
    import yaml
    from PIL import Image

    dataset = (yaml.safe_load((jobs.JOBS_DIR / f"{spec_name}.yaml").read_text()).get("data") or {}).get("dataset")
    if not isinstance(dataset, str) or "/" not in dataset:
        return  # a built-in dataset: no files are read to validate it
    cwd = tmp_path / "work"
    cwd.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(10):
            folder = cwd / dataset / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("VAEDIST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize(("name", "preset"), _shipped_specs())
def test_every_shipped_spec_and_preset_validates(name, preset, tmp_path, monkeypatch):
    _stand_in_folder(name, tmp_path, monkeypatch)
    spec = jobs.load_spec(name, preset=preset)
    if spec.kind == "tune":
        tune = spec.sections["tune"]
        # A preset narrows the search: its space replaces the spec's keys one by one, never mixes them.
        assert tune["search_space"] and all(len(d) == 1 for d in tune["search_space"].values())


def test_small_tune_preset_is_a_real_search_of_both_architectures():
    from vaedist.config import tune_config_from_section

    for name in ("tune-mnist", "tune-fashion-mnist"):
        spec = jobs.load_spec(name, preset="small")
        tune = tune_config_from_section(spec.sections["tune"])
        assert spec.experiment.data.val_size == 5000  # all the data, not the smoke subset
        assert tune.num_samples >= 8 and set(tune.search_space["model.arch"]["choice"]) == {"dense", "conv"}


def test_spec_with_an_unknown_key_is_refused_before_any_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\ndata: {dataset: mnist}\nbogus: 1\n")
    result = CliRunner().invoke(main, ["submit", str(bad), "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "unknown key 'bogus'" in _one_error_line(result.output)

    # A section the kind does not read would be ignored in silence: a train spec is not a search.
    bad.write_text("kind: train\ndata: {dataset: mnist}\ntune: {num_samples: 4}\n")
    result = CliRunner().invoke(main, ["run", str(bad), "--dry-run"])
    assert result.exit_code == 2
    assert "unknown key 'tune' for kind train (allowed: kind, name, description, presets, data, model, train, resources)" in (
        _one_error_line(result.output)
    )
    bad.write_text("kind: train\ndata: {dataset: mnist}\npresets: {big: {generate: {per_label: 9}}}\n")
    result = CliRunner().invoke(main, ["run", str(bad), "--preset", "big", "--dry-run"])
    assert result.exit_code == 2 and "section 'generate' (from a preset or override) is not read by kind train" in (
        _one_error_line(result.output)
    )
    # A valid spec outside the project folder cannot be sent (the cluster gets only the project).
    bad.write_text("kind: train\ndata: {dataset: mnist}\n")
    result = CliRunner().invoke(main, ["submit", str(bad), "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "outside the project folder" in _one_error_line(result.output)


def test_unreachable_address_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-shown")
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(main, ["submit", "train-mnist", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert line == (
        f"error: cannot reach the Ray Jobs API at http://127.0.0.1:{port} (connection refused); "
        "is the head running? is this the dashboard port (8265)?"
    )
    assert "not-shown" not in result.output
    for args in (["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        result = CliRunner().invoke(main, [*args, "--address", f"127.0.0.1:{port}"])
        assert result.exit_code == 1 and "cannot reach the Ray Jobs API" in _one_error_line(result.output)


def test_an_http_server_that_is_not_ray_is_named_so():
    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(main, ["jobs", "list", "--address", url])
    finally:
        server.shutdown()
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "HTTP 404 on /api/version: not a Ray dashboard" in line and "dashboard port (8265)" in line


def _own_lan_address() -> str:
    """This machine's non-loopback IPv4 address (a UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        address = s.getsockname()[0]
    assert not address.startswith("127."), "the test needs a non-loopback interface"
    return address


def test_the_token_never_goes_in_clear_text_to_a_remote_http_address(monkeypatch):
    """A mistyped --address must not hand the cluster's token (run-anything rights) to a sniffer."""
    seen: list[str | None] = []

    class NeedsToken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_error(401)

        def log_message(self, *args):
            pass

    for var in _RAY_AUTH:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token")
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), NeedsToken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        remote = f"http://{_own_lan_address()}:{port}"
        result = CliRunner().invoke(main, ["jobs", "list", "--address", remote])
        assert result.exit_code == 2 and seen == [None]
        line = _one_error_line(result.output)
        assert "did not send the one from $RAY_AUTH_TOKEN in clear text" in line and "SSH tunnel" in line
        assert "RAY_AUTH_MODE=token" in line and "s3cr3t-token" not in result.output
        # Loopback (a tunnel) gets it; so does a remote address once the user opts in as with Ray's CLI.
        CliRunner().invoke(main, ["jobs", "list", "--address", f"http://127.0.0.1:{port}"])
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        CliRunner().invoke(main, ["jobs", "list", "--address", remote])
    finally:
        server.shutdown()
    assert seen == [None, "Bearer s3cr3t-token", "Bearer s3cr3t-token"]


def test_no_address_runs_the_spec_here(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    ran = []

    def fake_run_spec(spec, echo=print, name=None):
        ran.append((spec.name, spec.sections["train"]["epochs"]))
        raise VaedistError("stopped by the test")

    monkeypatch.setattr(jobs, "run_spec", fake_run_spec)
    result = CliRunner().invoke(main, ["submit", "train-mnist", "--preset", "smoke"])
    assert ran == [("train-mnist", 1)]
    assert "running train-mnist here, on local Ray in this process" in result.output
    assert result.exit_code == 1 and "stopped by the test" in result.output
    result = CliRunner().invoke(main, ["submit", "train-mnist", "--no-wait"])
    assert result.exit_code == 2 and "--no-wait needs a Ray cluster" in _one_error_line(result.output)
    result = CliRunner().invoke(main, ["jobs", "list"])
    assert result.exit_code == 2 and "no Ray cluster given" in _one_error_line(result.output)


# ----------------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A token-auth Ray head (2 CPUs) and an MLflow server; the head's own environment names MLflow and
    the data, the way a cluster is configured for jobs sent with plain `ray job submit`."""
    root = tmp_path_factory.mktemp("submit")
    mlflow = MlflowServer(root / "mlflow").launch()  # comes up while the head starts
    # Checkpoints in this test's folder, as a cluster configures shared storage for its jobs.
    head = RayHead(
        num_cpus=2, env={"MLFLOW_TRACKING_URI": mlflow.uri, "VAEDIST_STORAGE_PATH": str(root / "runs")}
    )
    try:
        head.start()
        mlflow.wait()
        yield head, mlflow
    finally:
        try:
            head.stop()
        finally:
            mlflow.stop()


def _client_env(head: RayHead, mlflow: MlflowServer, **extra: str) -> dict[str, str]:
    """A user's shell: the token in RAY_AUTH_TOKEN only (no RAY_AUTH_MODE), MLflow's URL, the data."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_AUTH and not k.startswith("MLFLOW_")}
    env.update(RAY_AUTH_TOKEN=head.token, MLFLOW_TRACKING_URI=mlflow.uri, PATH=head.env["PATH"])
    env.update(extra)
    return env


def _vaedist(*args: str, env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaedist", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submissions(head: RayHead) -> list:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    return [j for j in client.list_jobs() if j.submission_id]


@pytest.mark.slow
def test_missing_or_wrong_token_is_refused_with_how_to_provide_it(cluster, tmp_path):
    head, mlflow = cluster
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    env = _client_env(head, mlflow, HOME=str(empty_home))
    del env["RAY_AUTH_TOKEN"]
    result = _vaedist(
        "submit", "train-mnist", "--preset", "smoke", "--address", head.address, env=env, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = _one_error_line(result.stderr)
    assert f"the Ray cluster at {head.address} needs an auth token and none was found" in line
    assert "RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line

    env["RAY_AUTH_TOKEN"] = "not-the-token"
    result = _vaedist("jobs", "list", "--address", head.address, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    line = _one_error_line(result.stderr)
    assert "rejected the auth token from $RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line
    assert "not-the-token" not in result.stdout + result.stderr


@pytest.mark.slow
def test_submit_and_ray_job_submit_record_runs_pictures_and_champion(cluster, tmp_path):
    from mlflow import MlflowClient

    head, mlflow = cluster
    env = _client_env(head, mlflow)
    t0 = time.monotonic()
    before = {j.submission_id for j in _submissions(head)}
    submit_log, ray_log = tmp_path / "submit.log", tmp_path / "ray-job-submit.log"
    submit_cmd = [
        sys.executable,
        "-m",
        "vaedist",
        "submit",
        SUBMIT_JOB,
        "--preset",
        "smoke",
        "--address",
        head.address,
    ]
    # Ray's CLI, unchanged: it needs RAY_AUTH_MODE=token to send the token (head.env has both).
    ray_cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(REPO), "--",
               "python", "-m", "vaedist", "run", "jobs/train-mnist.yaml", "--preset", "smoke"]  # fmt: skip
    with open(submit_log, "w") as out1, open(ray_log, "w") as out2:
        p_submit = subprocess.Popen(
            submit_cmd, env=env, cwd=tmp_path, stdout=out1, stderr=subprocess.STDOUT, text=True
        )
        p_ray = subprocess.Popen(
            ray_cmd, env=head.env, cwd=tmp_path, stdout=out2, stderr=subprocess.STDOUT, text=True
        )
        try:
            # While it runs, the same submit again starts nothing: it finds the job by its id.
            deadline = time.monotonic() + 90
            ours: list = []
            while not ours and time.monotonic() < deadline:
                ours = [
                    j
                    for j in _submissions(head)
                    if j.submission_id.startswith(f"vaedist-{SUBMIT_JOB}-smoke-")
                ]
                time.sleep(1)
            assert ours, f"vaedist submit did not submit in 90 s:\n{submit_log.read_text()}"
            sid = ours[0].submission_id
            again = _vaedist(*submit_cmd[3:], "--no-wait", env=env, cwd=tmp_path)
            assert again.returncode == 0, again.stdout + again.stderr
            assert f"{sid} is already" in again.stdout, again.stdout
            assert [j.submission_id for j in _submissions(head) if j.submission_id.startswith(sid)] == [sid]

            rc_submit = p_submit.wait(timeout=330)
            rc_ray = p_ray.wait(timeout=60 + max(0, 330 - (time.monotonic() - t0)))
        finally:
            for p in (p_submit, p_ray):
                if p.poll() is None:
                    p.kill()
    submit_out, ray_out = submit_log.read_text(), ray_log.read_text()
    assert rc_submit == 0, submit_out[-6000:]
    assert rc_ray == 0, ray_out[-6000:]
    assert f"{sid} SUCCEEDED after" in submit_out
    assert f"[vaedist] {sid}: RUNNING" in submit_out  # progress
    assert "Running entrypoint for job" in submit_out  # the streamed driver log
    for text in (submit_out, ray_out):
        assert head.token not in text

    # A repeat after the end reports the outcome and exits with it; still no new job.
    count = len(_submissions(head))
    again = _vaedist(*submit_cmd[3:], env=env, cwd=tmp_path)
    assert again.returncode == 0 and f"{sid} already ran: SUCCEEDED" in again.stdout, (
        again.stdout + again.stderr
    )
    assert len(_submissions(head)) == count == len(before) + 2

    # vaedist jobs ... on the same API.
    listed = _vaedist("jobs", "list", "--address", head.address, env=env, cwd=tmp_path)
    assert listed.returncode == 0 and sid in listed.stdout and "jobs/train-mnist.yaml" in listed.stdout
    status = _vaedist("jobs", "status", sid, "--address", head.address, env=env, cwd=tmp_path)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout
    logs = _vaedist("jobs", "logs", sid, "--address", head.address, env=env, cwd=tmp_path)
    assert logs.returncode == 0 and "Running entrypoint for job" in logs.stdout
    unknown = _vaedist("jobs", "status", "no-such-id", "--address", head.address, env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "no job 'no-such-id'" in _one_error_line(unknown.stderr)

    # What the jobs left in the MLflow server.
    client = MlflowClient(mlflow.uri)
    exp = client.get_experiment_by_name("vaedist/mnist")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.data.tags.get("vaedist.name"): r for r in runs}
    train = by_name["train-mnist"]  # from `ray job submit`
    assert train.info.status == "FINISHED"
    images = {a.path for a in client.list_artifacts(train.info.run_id, "images")}
    for key in ("samples", "reconstructions"):
        assert any(p.startswith(f"images/{key}+step+1+") for p in images), (key, images)
    if TUNE_JOB:
        parents = [r for r in runs if r.data.tags.get("vaedist.kind") == "tune"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        assert all(client.list_artifacts(c.info.run_id, "images") for c in children)
    champion = client.get_model_version_by_alias("vaedist-mnist", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    assert len(client.search_model_versions("name='vaedist-mnist'")) == 2  # one per job
    assert list(mlflow.artifacts.rglob("MLmodel")), (
        "the models did not go through the server's artifact store"
    )
    print(f"both jobs done in {time.monotonic() - t0:.0f} s")

    if TUNE_JOB:
        # The search once more, through Ray's own CLI: it resumes the finished search, reruns no trial and
        # registers nothing new (the best trial's version is handed back).
        versions = len(client.search_model_versions("name='vaedist-mnist'"))
        rerun = subprocess.run(
            [*ray_cmd[: ray_cmd.index("--") + 1], "python", "-m", "vaedist", "run", f"jobs/{TUNE_JOB}.yaml",
             "--preset", "smoke"],
            env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-6000:]
        assert "resuming search" in rerun.stdout and "best trial" in rerun.stdout, rerun.stdout[-4000:]
        runs_after = client.search_runs([exp.experiment_id])
        assert sorted(r.info.run_id for r in runs_after) == sorted(r.info.run_id for r in runs)
        assert len(client.search_model_versions("name='vaedist-mnist'")) == versions

    # --resubmit runs it again under <id>-r2; stopped, a plain repeat reports that and exits 1.
    again = _vaedist(*submit_cmd[3:], "--resubmit", "--no-wait", env=env, cwd=tmp_path)
    assert again.returncode == 0 and f"submitted {sid}-r2" in again.stdout, again.stdout + again.stderr
    stop = _vaedist("jobs", "stop", f"{sid}-r2", "--address", head.address, env=env, cwd=tmp_path)
    assert stop.returncode == 0 and f"{sid}-r2: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    again = _vaedist(*submit_cmd[3:], env=env, cwd=tmp_path)
    assert again.returncode == 1 and f"{sid}-r2 already ran: STOPPED" in again.stdout, again.stdout
    assert len(_submissions(head)) == count + 1 + (1 if TUNE_JOB else 0)


@pytest.mark.slow
def test_tune_cifar_smoke_runs_on_real_cifar10_content_through_submit(cluster, data_dir, tmp_path):
    """The headline search on CIFAR-10 images (the JPEG folder: 200 training and 50 test images per class),
    with the dataset pointed at the folder by --dataset, through the Jobs API of a real head."""
    import shutil

    from mlflow import MlflowClient

    head, mlflow = cluster
    src, folder = data_dir / "cifar10-jpeg", tmp_path / "cifar-sub"
    for split, n in (("train", 200), ("test", 50)):
        for cls in sorted(p.name for p in (src / split).iterdir()):
            (folder / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy(f, folder / split / cls / f.name)
    env = _client_env(head, mlflow)
    out = _vaedist("submit", "tune-cifar", "--preset", "smoke", "--dataset", str(folder), "--address", head.address,
                   env=env, cwd=tmp_path, timeout=420)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "SUCCEEDED after" in out.stdout
    client = MlflowClient(mlflow.uri)
    exp = client.get_experiment_by_name("vaedist/cifar-sub")  # named after the folder
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vaedist.kind") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params.get("data.dataset", "").startswith(str(folder))
    assert client.get_model_version_by_alias("vaedist-cifar-sub", "champion").run_id in {r.info.run_id for r in runs}
