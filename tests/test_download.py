"""fetch() against a real HTTP server on 127.0.0.1: success, bad md5, dead mirrors, cut connections.

The dataset is a tiny IDX one made here ("tiny": 12 train / 5 test images), served under several
URL prefixes that each misbehave in one way. Nothing here touches the internet.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from vaedist.data import download as download_mod
from vaedist.data import fetch, load_split, verify
from vaedist.data.registry import DatasetSpec, FileSpec, get_spec
from vaedist.errors import VaedistError

N_TRAIN, N_TEST = 12, 5


def _idx(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    # mtime=0: the same arrays give the same bytes, hence the same md5 in every run.
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _make_payloads() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    arrays = {
        "train_x": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    names = [
        f.filename for f in get_spec("mnist").files
    ]  # train images, train labels, test images, test labels
    blobs = [
        _idx(arrays["train_x"], 2051),
        _idx(arrays["train_y"], 2049),
        _idx(arrays["test_x"], 2051),
        _idx(arrays["test_y"], 2049),
    ]
    return dict(zip(names, blobs, strict=True)), arrays


PAYLOADS, ARRAYS = _make_payloads()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good/F serves F; /bad/F, F with one byte flipped; /big/F, F plus 3 MiB of zeros;
    /cut/F announces F's length, sends half of it and hangs up."""

    protocol_version = "HTTP/1.1"
    hits: list[str]

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        _, mode, filename = self.path.split("/", 2)
        body = PAYLOADS.get(filename)
        if body is None or mode not in ("good", "bad", "cut", "big"):
            self.send_error(404)
            return
        if mode == "big":
            body = body + bytes(3 << 20)  # the right start, then far more than announced in the spec
        if mode == "bad":
            b = bytearray(body)
            b[len(b) // 2] ^= 0xFF
            body = bytes(b)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    handler = type("Handler", (_Handler,), {"hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, handler.hits
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would get requests meant for 127.0.0.1.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def dead_url() -> str:
    """A URL on a port where nothing listens (bound then released: connection refused, instantly)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/good/"


def tiny_spec(mirrors: tuple[str, ...]) -> DatasetSpec:
    files = tuple(FileSpec(n, hashlib.md5(b).hexdigest(), len(b)) for n, b in PAYLOADS.items())
    return dataclasses.replace(
        get_spec("mnist"), name="tiny", files=files, mirrors=mirrors, train_size=N_TRAIN, test_size=N_TEST
    )


def _all_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_download_verify_and_layout(server, tmp_path, capsys):
    base, hits = server
    spec = tiny_spec((f"{base}/good/",))
    root = tmp_path / "cache"  # does not exist yet: fetch creates it
    assert verify("tiny", root, spec=spec) == dict.fromkeys(PAYLOADS, "missing")

    folder = fetch("tiny", root, progress=False, spec=spec)
    assert folder == root / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == sorted(PAYLOADS)  # no temp files left over
    for name, blob in PAYLOADS.items():
        assert (folder / name).read_bytes() == blob
    assert verify("tiny", root, spec=spec) == dict.fromkeys(PAYLOADS, "ok")
    assert capsys.readouterr().err == ""  # progress=False is silent

    # Present and verified: a second fetch downloads nothing.
    n_hits = len(hits)
    fetch("tiny", root, progress=False, spec=spec)
    assert len(hits) == n_hits

    # The downloaded files parse into what was generated.
    x, y = load_split("tiny", "train_full", root, spec=spec, progress=False)
    assert x.shape == (N_TRAIN, 28, 28, 1)
    np.testing.assert_array_equal(x[..., 0], ARRAYS["train_x"])
    np.testing.assert_array_equal(y, ARRAYS["train_y"].astype(np.int64))
    xv, _ = load_split("tiny", "val", root, val_size=3, spec=spec)
    assert len(xv) == 3


def test_load_split_downloads_on_a_fresh_machine(server, tmp_path, capsys):
    base, _ = server
    spec = tiny_spec((f"{base}/good/",))
    x, y = load_split("tiny", "test", tmp_path, spec=spec)  # download=True by default
    np.testing.assert_array_equal(x[..., 0], ARRAYS["test_x"])
    np.testing.assert_array_equal(y, ARRAYS["test_y"])
    err = capsys.readouterr().err
    # stderr is not a tty under pytest: one "downloading" line per file, no carriage returns.
    assert err.count("downloading ") == 4 and "\r" not in err


def test_corrupt_download_leaves_nothing(server, tmp_path):
    base, _ = server
    spec = tiny_spec((f"{base}/bad/",))
    with pytest.raises(VaedistError) as exc:
        fetch("tiny", tmp_path, progress=False, spec=spec)
    msg = str(exc.value)
    first = next(iter(PAYLOADS))
    assert "\n" not in msg
    assert first in msg and spec.files[0].md5 in msg
    bad = bytearray(PAYLOADS[first])
    bad[len(bad) // 2] ^= 0xFF
    assert hashlib.md5(bytes(bad)).hexdigest() in msg  # names the md5 actually received
    assert _all_files(tmp_path) == []


def test_oversized_download_is_rejected(server, tmp_path):
    base, _ = server
    spec = tiny_spec((f"{base}/big/",))
    with pytest.raises(VaedistError, match=r"has md5 [0-9a-f]{32}, expected"):
        fetch("tiny", tmp_path, progress=False, spec=spec)
    assert _all_files(tmp_path) == []


def test_bad_mirror_then_good_mirror(server, tmp_path):
    base, _ = server
    spec = tiny_spec((f"{base}/bad/", f"{base}/good/"))
    fetch("tiny", tmp_path, progress=False, spec=spec)
    assert verify("tiny", tmp_path, spec=spec) == dict.fromkeys(PAYLOADS, "ok")
    assert len(_all_files(tmp_path)) == 1 + len(PAYLOADS)


def test_dead_mirror_falls_through(server, tmp_path, dead_url):
    base, hits = server
    spec = tiny_spec(("http://unused.invalid/",))
    # `mirrors` overrides the spec's list.
    fetch("tiny", tmp_path, mirrors=[dead_url, f"{base}/good"], progress=False, spec=spec)
    assert verify("tiny", tmp_path, spec=spec) == dict.fromkeys(PAYLOADS, "ok")
    assert hits[-1] == "/good/" + list(PAYLOADS)[-1]


def test_all_mirrors_dead_gives_the_offline_line(tmp_path, dead_url):
    spec = tiny_spec((dead_url, dead_url.replace("/good/", "/other/")))
    with pytest.raises(VaedistError) as exc:
        fetch("tiny", tmp_path, progress=False, spec=spec)
    msg = str(exc.value)
    first = next(iter(PAYLOADS))
    assert "\n" not in msg
    assert msg.startswith(f"could not download {first} for tiny from any mirror (")
    assert msg.endswith(
        f"); this machine may be offline: put the official files in {tmp_path / 'tiny'}/ "
        "or point VAEDIST_DATA_DIR at a folder that has them"
    )
    assert "refused" in msg.lower()  # the short reason
    assert _all_files(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, tmp_path):
    base, _ = server
    spec = tiny_spec((f"{base}/cut/",))
    with pytest.raises(VaedistError, match=r"could not download .* from any mirror") as exc:
        fetch("tiny", tmp_path, progress=False, spec=spec)
    assert "\n" not in str(exc.value)
    assert "connection closed after" in str(exc.value)  # the short reason says what happened
    assert _all_files(tmp_path) == []


def test_ctrl_c_during_download_leaves_nothing(server, tmp_path, monkeypatch):
    base, _ = server
    spec = tiny_spec((f"{base}/good/",))

    def interrupt(self, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(download_mod._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch("tiny", tmp_path, progress=False, spec=spec)
    assert _all_files(tmp_path) == []


def test_existing_corrupt_file_is_not_overwritten(server, tmp_path):
    base, hits = server
    spec = tiny_spec((f"{base}/good/",))
    folder = tmp_path / "tiny"
    folder.mkdir()
    first = next(iter(PAYLOADS))
    (folder / first).write_bytes(b"not the file")
    n_hits = len(hits)
    with pytest.raises(VaedistError, match=rf"{first} is corrupt .*delete it"):
        fetch("tiny", tmp_path, progress=False, spec=spec)
    assert (folder / first).read_bytes() == b"not the file"
    assert len(hits) == n_hits  # no download attempted


def test_md5_is_cached_per_path_size_and_mtime(server, tmp_path):
    base, _ = server
    spec = tiny_spec((f"{base}/good/",))
    fetch("tiny", tmp_path, progress=False, spec=spec)
    download_mod._md5_cached.cache_clear()
    verify("tiny", tmp_path, spec=spec)
    misses = download_mod._md5_cached.cache_info().misses
    verify("tiny", tmp_path, spec=spec)
    fetch("tiny", tmp_path, progress=False, spec=spec)
    info = download_mod._md5_cached.cache_info()
    assert info.misses == misses == len(PAYLOADS)  # hashed once each, then served from the cache
    assert info.hits >= 2 * len(PAYLOADS)
