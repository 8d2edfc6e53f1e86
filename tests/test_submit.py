"""``vaedist submit`` and ``vaedist jobs``: the plan, bad input, and the real thing.

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

from vaedist import jobs
from vaedist.cli import main
from vaedist.errors import VaedistError

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
    spec, plan = jobs.plan_submission("train-mnist", preset="smoke")
    _, again = jobs.plan_submission("jobs/train-mnist.yaml", preset="smoke")
    _, other = jobs.plan_submission("train-mnist")
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
    _, bare = jobs.plan_submission("train-mnist", preset="smoke")
    assert "VAEDIST_DATA_DIR" not in bare.runtime_env["env_vars"]
    # The id follows the spec file's contents: an edited spec is another job.
    assert jobs.submission_id("train-mnist", "smoke", b"a") != jobs.submission_id(
        "train-mnist", "smoke", b"b"
    )


def test_token_is_found_where_ray_looks(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.auth_token() == (None, "nowhere")
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token()[0] == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == ("from-env", "$RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(VaedistError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        jobs.auth_token()


def test_address_defaults_and_explicit_wins(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.jobs_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "head:8265")
    assert jobs.jobs_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api.example/")
    assert jobs.jobs_address(None) == "https://api.example"
    assert jobs.jobs_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert jobs.redact_url("http://u:pw@h:1/x") == "http://u:***@h:1/x"


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


@pytest.mark.parametrize(("name", "preset"), _shipped_specs())
def test_every_shipped_spec_and_preset_validates(name, preset):
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
