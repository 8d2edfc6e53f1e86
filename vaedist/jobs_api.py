"""The Ray Jobs API client: which cluster, which token, and :class:`JobsAPI`, whose failures are one line.

:mod:`vaedist.submit` builds ``vaedist submit`` and ``vaedist jobs ...`` on it. Ray's SDK and requests are
imported inside the methods that talk to a cluster, so importing this module costs nothing.

Ray 2.60's SDK needs help in three places, each explained where it is given: it lets the environment
override the address it is passed (_explicit_address), it sends the token only under RAY_AUTH_MODE=token
(JobsAPI.__init__), and its requests have no timeout (JobsAPI._probe).
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vaedist.errors import UsageError, VaedistError, first_line, redact_url

DASHBOARD_PORT = 8265
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # the statuses a Ray job ends in
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it) to the cluster's token: "
    "`ray get-auth-token` on the head prints it"
)


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


def require_address(address: str | None) -> str:
    url = jobs_address(address)
    if url is None:
        raise UsageError(
            f"no Ray cluster given: pass --address http://HEAD:{DASHBOARD_PORT} or set RAY_ADDRESS "
            "(RAY_API_SERVER_ADDRESS) to the head's dashboard URL"
        )
    return url


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


def may_send_token(url: str) -> bool:
    """The cluster token is a key to run any command there: send it only where it cannot be sniffed.

    That is https://, or a loopback address (an SSH tunnel or ``kubectl port-forward``); elsewhere only
    when the user opted in with ``RAY_AUTH_MODE=token``, as Ray's own CLI asks.
    """
    if urllib.parse.urlsplit(url).scheme == "https" or is_local_address(url):
        return True
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


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
    return first_line(exc)


def _unreachable(url: str, reason: str) -> VaedistError:
    return VaedistError(
        f"cannot reach the Ray Jobs API at {redact_url(url)} ({reason}); is the head running? "
        f"is this the dashboard port ({DASHBOARD_PORT})?"
    )


def auth_error(url: str, status: int, withheld: bool, source: str) -> UsageError | None:
    """What a 401 or a 403 from the head means, as the one line the user sees; None for other statuses."""
    where = f"the Ray cluster at {redact_url(url)}"
    if status == 403:
        return UsageError(f"{where} rejected the auth token from {source}; {TOKEN_HELP}")
    if status != 401:
        return None
    if not withheld:
        return UsageError(f"{where} needs an auth token and none was found; {TOKEN_HELP}")
    return UsageError(
        f"{where} needs an auth token; vaedist did not send the one from {source} in clear text to a "
        "non-local http:// address: reach the dashboard through an SSH tunnel or kubectl port-forward "
        f"(http://127.0.0.1:{DASHBOARD_PORT}) or https://, or set RAY_AUTH_MODE=token to send it anyway"
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
        self.url = url
        # Ray's SDK sends the token only where this process has RAY_AUTH_MODE=token: vaedist reads it the way
        # Ray does and sends the header itself, so a plain shell with RAY_AUTH_TOKEN set talks to a token-auth
        # head too; but only where may_send_token allows.
        token, self.token_source = auth_token()
        self.withheld = bool(token) and not may_send_token(url)
        self._headers = {"Authorization": f"Bearer {token}"} if token and not self.withheld else {}
        self._probe()
        self.client = self._connect()

    def _probe(self) -> None:
        """GET /api/version with a timeout: an unreachable head, a wrong port or a missing token is named
        here, in one line, before the SDK (whose requests have no timeout) is used."""
        import requests

        url = self.url
        try:
            r = requests.get(f"{url}/api/version", headers=self._headers, timeout=self.PROBE_TIMEOUT_S)
        except requests.exceptions.Timeout:
            raise _unreachable(url, f"no answer in {self.PROBE_TIMEOUT_S} s") from None
        except requests.exceptions.SSLError as exc:
            raise _unreachable(url, f"TLS: {first_line(exc)}") from None
        except requests.exceptions.ConnectionError as exc:
            raise _unreachable(url, _connection_reason(exc)) from None
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise UsageError(
                f"--address {redact_url(url)!r} is not a usable URL ({first_line(exc)}); "
                f"expected http://HEAD:{DASHBOARD_PORT}"
            ) from None
        self._check_auth(r.status_code)
        try:
            r.raise_for_status()
            r.json()["ray_version"]
        except (requests.exceptions.HTTPError, ValueError, KeyError, TypeError):
            raise _unreachable(url, f"HTTP {r.status_code} on /api/version: not a Ray dashboard") from None

    def _connect(self):
        import logging

        from ray.job_submission import JobSubmissionClient

        # Ray logs each packaged file, upload and websocket close (its modules set INFO when imported, so
        # this comes after the import); vaedist says what matters itself.
        for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                            ("ray.dashboard.modules.job.sdk", logging.WARNING),
                            ("ray._private.runtime_env.packaging", logging.WARNING),
                            ("ray._private.runtime_env.working_dir", logging.ERROR)):  # fmt: skip
            logging.getLogger(name).setLevel(level)

        with _explicit_address():
            return self.call(lambda: JobSubmissionClient(self.url, headers=dict(self._headers)))

    def _check_auth(self, status: int) -> None:
        error = auth_error(self.url, status, self.withheld, self.token_source)
        if error is not None:
            raise error

    def call(self, fn: Callable[[], Any], job_id: str | None = None) -> Any:
        """Run one SDK call, turning its exceptions into vaedist's one-line errors."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as exc:
            text = str(exc)
            self._check_auth(403 if "Forbidden" in text or "invalid" in text.lower() else 401)
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
                f"the Ray Jobs API at {redact_url(self.url)} failed: {first_line(exc)}"
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
