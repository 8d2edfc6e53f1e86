"""The team MLflow server of cluster/mlflow, for real: PostgreSQL behind ``mlflow server``, fed by ``vaedist train``.

A session fixture starts PostgreSQL (initdb + pg_ctl, as the ``postgres`` user when the tests run as root) on
127.0.0.1 and a free port, in a throwaway folder; another starts ``mlflow server --backend-store-uri
postgresql://... --serve-artifacts`` in front of it through cluster/mlflow/mlflow-server.sh, the recipe itself. The database
password is random and lives only in the server's environment (``PGPASSWORD``, read by libpq): never in a URI,
an argument list, a log line or an MLflow param. Both fixtures stop exactly the processes they started, also
when a test fails.

Needs Debian's ``postgresql`` package and ``psycopg[binary]``: SQLAlchemy 2.1 (pinned for MLflow) maps a plain
``postgresql://`` URI to psycopg 3, not psycopg2. Skipped, with the reason in the summary, where either is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from raycluster import free_port

DB_NAME = "mlflow"
DB_USER = "vaedist"
RUN_NAME = "pg-smoke"
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "mlflow" / "mlflow-server.sh"


def _pg_bindir() -> Path | None:
    """Debian keeps the server binaries under /usr/lib/postgresql/<major>/bin; elsewhere they are on PATH."""

    def major(p: Path) -> int:
        name = p.parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=major)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _tail(text: str, secret: str | None = None, lines: int = 40) -> str:
    out = "\n".join(text.splitlines()[-lines:])
    return out.replace(secret, "<redacted>") if secret else out


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    db: str
    user: str
    password: str

    @property
    def uri(self) -> str:
        """No password in it: libpq reads PGPASSWORD from the server's environment."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.db}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        # .ci/run installs it: a missing server is a broken set-up, not a reason to skip.
        pytest.fail("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    # MLflow's postgresql:// store needs psycopg (SQLAlchemy 2.1's default driver), a dev extra.
    import psycopg  # noqa: F401

    # initdb refuses to run as root: run the server as the postgres user, in a folder it owns. The folder is
    # made with mkdtemp (mode 0700) directly under /tmp, since pytest's tmp folders (and maybe $TMPDIR) are
    # root-only.
    as_root = os.geteuid() == 0
    runas = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="vaedist-pg-", dir="/tmp" if as_root else None))
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, log = root / "data", root / "postgres.log"
    port = free_port()
    password = secrets.token_hex(16)

    def pg(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*runas, *args], capture_output=True, text=True, timeout=120, **kw)

    started = False
    try:
        # Local socket (inside the 0700 folder): trust, to create the role; TCP: password only.
        init = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256")  # fmt: skip
        assert init.returncode == 0, f"initdb failed:\n{_tail(init.stdout + init.stderr)}"
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
        start = pg(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"
        )
        started = True  # from here on, always try to stop it
        assert start.returncode == 0, f"pg_ctl start failed:\n{_tail(start.stdout + start.stderr)}\n" + (
            _tail(log.read_text()) if log.exists() else ""
        )
        # The password goes in on stdin, not argv: nothing in `ps` ever shows it.
        sql = f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{password}';\nCREATE DATABASE {DB_NAME} OWNER {DB_USER};\n"
        made = pg(str(bindir / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres", "-d", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-q", "-f", "-", input=sql)  # fmt: skip
        assert made.returncode == 0, f"creating the MLflow database failed:\n{_tail(made.stderr, password)}"
        yield Postgres("127.0.0.1", port, DB_NAME, DB_USER, password)
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path
    log: Path
    pgid: int  # the session the server and its children run in


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts, log = root / "artifacts", root / "server.log"
    port = free_port()
    # The recipe of cluster/mlflow, run as a team would run it on a VM: configuration and the password in
    # the environment; the script builds `mlflow server --backend-store-uri postgresql://... --serve-artifacts
    # --artifacts-destination ... --host 127.0.0.1 --port ...` and execs it (same pid: teardown stops it).
    mlflow_bin = root / "mlflow"
    mlflow_bin.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mlflow "$@"\n')
    mlflow_bin.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(
        MLFLOW_BIN=str(mlflow_bin), MLFLOW_DB_HOST=postgres.host, MLFLOW_DB_PORT=str(postgres.port),
        MLFLOW_DB_NAME=postgres.db, MLFLOW_DB_USER=postgres.user, PGPASSWORD=postgres.password,
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts), MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )  # fmt: skip
    cmd = ["bash", str(SERVER_SCRIPT)]
    uri = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        # Its own session, so teardown can stop the server and the workers it forks, and nothing else.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}:\n{_tail(log.read_text(), postgres.password)}"
                )
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after 240 s:\n{_tail(log.read_text(), postgres.password)}"
                )
            time.sleep(0.5)
        yield MlflowServer(uri, artifacts, log, proc.pid)
    finally:
        # MLflow's job-runner consumers can take ~20 s to wind down; a test server need not wait for them.
        _stop_group(proc, grace=5.0)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp
                members.append(int(stat.parent.name))
    return members


def _stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the session the fixture created (mlflow, its uvicorn and job-runner children), then SIGKILL
    what is left after ``grace`` seconds. The group id is the pid of our own child, so nothing else is hit."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_members(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.slow
def test_train_records_run_metrics_and_model_in_postgres(
    postgres: Postgres, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    cmd = [
        sys.executable, "-m", "vaedist", "train",
        "--dataset", "mnist", "--variant", "cvae", "--arch", "dense", "--width", "64", "--latent-dim", "4",
        "--epochs", "1", "--workers", "1", "--batch-size", "256",
        "--name", RUN_NAME, "--storage-path", str(tmp_path / "runs"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG", "RAY_ADDRESS"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri  # VAEDIST_DATA_DIR comes from conftest via os.environ
    # Its own session too, so a timeout leaves no local Ray processes behind.
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        _stop_group(proc)
    assert proc.returncode == 0, (
        f"vaedist train failed ({proc.returncode}):\n{_tail(output, postgres.password)}"
    )
    assert postgres.password not in output

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("vaedist/mnist")
    assert experiment is not None, "vaedist train did not create the experiment vaedist/mnist"
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == RUN_NAME]
    assert len(runs) == 1, f"expected one run named {RUN_NAME}, got {[r.info.run_name for r in runs]}"
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params.get("data.dataset") == "mnist"
    assert params.get("model.arch") == "dense"
    assert params.get("model.width") == "64"
    assert params.get("model.latent_dim") == "4"
    assert params.get("train.epochs") == "1"

    history = client.get_metric_history(run.info.run_id, "val_neg_elbo")
    assert len(history) >= 1, "no per-epoch val_neg_elbo"
    assert all(0 < m.value < float("inf") for m in history), [m.value for m in history]

    versions = client.search_model_versions("name='vaedist-mnist'")
    assert any(v.run_id == run.info.run_id for v in versions), (
        "the run's model is not registered as vaedist-mnist"
    )
    # --serve-artifacts: the model went through the server into --artifacts-destination.
    assert list(mlflow_server.artifacts.rglob("MLmodel")), "no model artifacts under --artifacts-destination"

    # The database password is in no param, tag or server log line.
    for key, value in {**params, **run.data.tags}.items():
        assert postgres.password not in key and postgres.password not in value, f"password leaked into {key}"
    assert postgres.password not in mlflow_server.log.read_text(errors="replace")
    # Nor on any command line of the server's processes (what `ps` shows every user of the machine).
    members = _group_members(mlflow_server.pgid)
    assert members, "the mlflow server's processes are gone"
    for pid in members:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            assert postgres.password not in cmdline, f"password on the command line of pid {pid}"
