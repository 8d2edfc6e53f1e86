"""Real servers for tests: a Ray head (``ray start --head``, token auth on) and an ``mlflow server``.

Both bind to 127.0.0.1 on free ports, keep their state in a throwaway folder, and stop exactly the
processes they started, also when a test fails::

    with MlflowServer(tmp) as mlflow, RayHead(num_cpus=2, env={"MLFLOW_TRACKING_URI": mlflow.uri}) as head:
        head.address      # http://127.0.0.1:<port>: the dashboard, i.e. the Jobs API
        head.gcs_address  # <ip>:<port>: for `ray start --address` and ray.init(address=...)
        head.env          # the environment to talk to it with: the token, PATH with the venv's bin first
        head.add_node(num_cpus=1)  # a second raylet on this machine that joins the head

Why it is built this way (Ray 2.60):
- ``ray start --head`` turns token auth on only when RAY_AUTH_MODE=token or a token already exists; the
  head gets RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN in its environment, so every Ray process it
  starts, job drivers included, has the token, and no ~/.ray/auth_token is read or written.
- Ray's own SDK and CLI add the token header only where RAY_AUTH_MODE=token: ``env`` sets both.
- ``ray stop`` stops every Ray on the machine (other tests' local Ray included). Each ``ray start`` here
  runs in a session of its own (setsid); stopping signals the processes of those sessions and their
  descendants (job drivers run in sessions of their own, below the raylet's workers), nothing else.
- Ray replaces ``--node-ip-address 127.0.0.1`` with the machine's address for the GCS and raylets; the
  dashboard, where jobs are submitted, does stay on 127.0.0.1.
- Unix socket paths (under the temp dir) are limited to ~107 bytes: the temp dir is /tmp/vd-XXXXXXXX.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow, and the `python` job entrypoints run
# Variables of the caller that would point Ray clients or MLflow elsewhere.
_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free on every interface that this process has not handed out before.

    The kernel may hand the same just-closed port to two bind(0) calls in a row; Ray refuses to start
    when two of its components get the same port ("... is used by other components"), so ports given
    out are remembered for the life of the test session.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))  # all interfaces: Ray binds some ports on the machine's address, not loopback
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def wait_http(
    url: str, timeout: float, headers: dict | None = None, proc: subprocess.Popen | None = None
) -> None:
    """Until ``url`` answers 200; fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
                last = r.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s (last: {last})")


# -------------------------------------------------------------------------------------------------
# Processes by session, from /proc (psutil is not a dependency)


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, sid) of every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(sids: set[int]) -> set[int]:
    """Processes in the sessions ``sids``, and all their descendants wherever they went."""
    table = _proc_table()
    found = {pid for pid, (_, sid) in table.items() if sid in sids}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def terminate(pids: set[int], grace: float = 10.0) -> set[int]:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL the rest; returns what is still alive (should be none)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            break
    return pids


# -------------------------------------------------------------------------------------------------
# Ray


class RayHead:
    """A Ray head on 127.0.0.1 with token auth, started with the venv's ``ray``; a context manager."""

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None, token: str | None = None):
        self.num_cpus = num_cpus
        self.token = token or secrets.token_hex(16)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))
        self.log_dir = self.temp_dir / "logs-start"
        self.log_dir.mkdir()
        base = {k: v for k, v in os.environ.items() if k not in _DROP}
        base.update(env or {})
        base.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        })  # fmt: skip
        self.env = base
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address: str | None = None
        self._sids: set[int] = set()
        # Worker ports: a block of 200 below Linux's ephemeral range and above Ray's default 10002-19999.
        self._port_block = random.randrange(20000, 31000, 200)
        self._nodes = 0
        self._node_dirs: list[Path] = []

    # The ports a raylet would otherwise take at fixed defaults (52365 ...), clashing with other Rays.
    def _node_ports(self) -> list[str]:
        start = self._port_block + 200 * self._nodes
        if start + 199 >= 32768:
            raise RuntimeError("no worker-port block left for another node")
        return [
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--min-worker-port", str(start), "--max-worker-port", str(start + 199),
        ]  # fmt: skip

    def _ray_start(self, args: list[str], label: str, timeout: float = 180) -> None:
        log = self.log_dir / f"{label}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", *args], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.temp_dir, start_new_session=True,
            )  # fmt: skip
        self._sids.add(proc.pid)  # setsid: its session id is its pid; the daemons it forks keep it
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"`ray start` ({label}) took more than {timeout:.0f} s:\n{tail(log)}"
            ) from None
        if rc != 0:
            raise RuntimeError(f"`ray start` ({label}) exited with {rc}:\n{tail(log)}")
        self._nodes += 1

    def start(self) -> RayHead:
        args = [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()), "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
            "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *self._node_ports(),
        ]  # fmt: skip
        try:
            self._ray_start(args, "head")
            self.gcs_address = (self.temp_dir / "ray_current_cluster").read_text().strip()
            headers = {"Authorization": f"Bearer {self.token}"}
            wait_http(f"{self.address}/api/version", 60, headers)
            wait_http(f"{self.address}/api/jobs/", 60, headers)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int = 1, resources: str | None = None) -> None:
        """Another raylet on this machine joining the head (`ray start --address`), stopped with the head."""
        # Its own temp dir, as on a separate machine: nodes sharing one would also share the unpacked
        # job working_dir, and one node's runtime-env agent would delete it under the other's job.
        node_dir = Path(tempfile.mkdtemp(prefix="vdn-", dir="/tmp"))
        self._node_dirs.append(node_dir)
        args = ["--address", str(self.gcs_address), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                "--temp-dir", str(node_dir), "--disable-usage-stats", *self._node_ports()]  # fmt: skip
        if resources:
            args += ["--resources", resources]
        self._ray_start(args, f"node-{self._nodes}")

    def processes(self) -> set[int]:
        return session_processes(self._sids)

    def stop(self) -> None:
        """Stop this cluster's processes (and only those), then remove its temp dir."""
        left = terminate(self.processes(), grace=3.0) if self._sids else set()
        self._sids.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for node_dir in self._node_dirs:
            shutil.rmtree(node_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes {sorted(left)} survived SIGKILL")

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------------
# MLflow


class MlflowServer:
    """``mlflow server`` on sqlite, serving artifacts, on 127.0.0.1; a context manager."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "mlflow-server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def launch(self) -> MlflowServer:
        """Start without waiting (see ``wait``), so it can come up while something else starts."""
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
            )
        return self

    def wait(self, timeout: float = 120) -> MlflowServer:
        try:
            wait_http(f"{self.uri}/health", timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{tail(self.log)}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(session_processes({self.proc.pid}))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.launch().wait()

    def __exit__(self, *exc) -> None:
        self.stop()
