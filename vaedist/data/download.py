"""Get the official dataset files into the local cache and prove they are the official ones (md5).

Layout: `<root>/<dataset>/<official file name>`, the same as /work/shared/data, so pointing
`VAEDIST_DATA_DIR` at a folder that already holds the files needs no copy and no network.
A file is only ever put in place by `os.replace` of a fully downloaded, md5-checked temp file
in the same folder, so a failed, interrupted or corrupt download leaves nothing behind, and
several processes (e.g. Ray workers on one node) downloading at once cannot see half a file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from vaedist.data.registry import resolve
from vaedist.data.spec import DatasetSpec, FileSpec
from vaedist.errors import VaedistError

_CHUNK = 1 << 20
# Long enough for a slow mirror to start answering, short enough that a dead one is skipped soon.
_TIMEOUT_S = 60.0
_USER_AGENT = "vaedist/0.1 (+python urllib)"


@functools.lru_cache(maxsize=256)
def _md5_cached(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so a file rewritten in place is hashed again;
    # otherwise repeated loads in one process (every epoch, every trial) cost a stat() only.
    del size, mtime_ns
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _md5(path: Path) -> str:
    st = path.stat()
    return _md5_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _check_file(path: Path, fs: FileSpec) -> str:
    """'ok' | 'missing' | 'corrupt' for one local file (size first: cheaper than hashing)."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != fs.size:
        return "corrupt"
    return "ok" if _md5(path) == fs.md5 else "corrupt"


def _corrupt_error(name: str, path: Path, fs: FileSpec) -> VaedistError:
    size = path.stat().st_size
    # A size mismatch is reported without hashing: it is proof enough, and instant.
    got = f"{size} bytes, expected {fs.size}" if size != fs.size else f"md5 {_md5(path)}, expected {fs.md5}"
    return VaedistError(
        f"{path} is corrupt ({got}): it is not the official {name} file; "
        f"delete it and run again to download it, or replace it with the official file"
    )


def verify(
    name: str, root: str | os.PathLike | None = None, *, spec: DatasetSpec | None = None
) -> dict[str, str]:
    """Status of every official file of `name` under `<root>/<name>/`: filename -> 'ok'|'missing'|'corrupt'.

    Never downloads and never modifies anything.
    """
    spec, folder = resolve(name, root, spec)
    return {fs.filename: _check_file(folder / fs.filename, fs) for fs in spec.files}


def ensure_files(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: tuple[str, ...] | list[str] | None = None,
    progress: bool = True,
    spec: DatasetSpec | None = None,
) -> Path:
    """`fetch` when `download`; otherwise fail with one line if any file is missing or corrupt."""
    spec, folder = resolve(name, root, spec)
    for fs in spec.files:
        path = folder / fs.filename
        status = _check_file(path, fs)
        if status == "ok":
            continue
        if status == "corrupt":
            # Never delete a user's file silently: it may be the only copy of something.
            raise _corrupt_error(spec.name, path, fs)
        if not download:
            raise VaedistError(
                f"{fs.filename} for {spec.name} is missing from {folder}/: put the official files there, "
                f"point VAEDIST_DATA_DIR at a folder that has them, or allow downloading"
            )
        _download(spec, folder, fs, tuple(mirrors) if mirrors is not None else spec.mirrors, progress)
    return folder


def fetch(
    name: str,
    root: str | os.PathLike | None = None,
    mirrors: tuple[str, ...] | list[str] | None = None,
    progress: bool = True,
    *,
    spec: DatasetSpec | None = None,
) -> Path:
    """Make sure every official file of `name` is in `<root>/<name>/` with the right md5; return that folder.

    Missing files are downloaded, trying `mirrors` (default: the spec's) in order; files already
    there are only checked (md5 cached per path, size and mtime). A present file with the wrong md5
    is an error (we do not delete user files), as is a download whose md5 is wrong on every mirror.
    """
    return ensure_files(name, root, download=True, mirrors=mirrors, progress=progress, spec=spec)


class _Progress:
    """A minimal progress line on stderr: redrawn in place on a tty, start and end lines otherwise."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0
        if enabled and not self.tty:
            # Logs (Ray jobs, CI) get one line, not thousands of carriage returns.
            print(f"downloading {label} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0) if self.total else 1.0
            bar = "#" * int(frac * 30)
            sys.stderr.write(
                f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
            )
            sys.stderr.flush()

    def close(self, ok: bool) -> None:
        if self.tty:
            sys.stderr.write("\n" if ok else " failed\n")
            sys.stderr.flush()


def _short_reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _download(
    spec: DatasetSpec, folder: Path, fs: FileSpec, mirrors: tuple[str, ...], progress: bool
) -> None:
    """Download one file into `folder`, md5-checked, trying `mirrors` in turn; atomic, no leftovers."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VaedistError(
            f"cannot create the data folder {folder} ({exc.strerror}): set VAEDIST_DATA_DIR to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        # Say so now, rather than blaming every mirror for a local permission problem.
        raise VaedistError(
            f"{fs.filename} for {spec.name} is missing and {folder} is not writable: "
            f"put the official files there or set VAEDIST_DATA_DIR to a writable folder"
        )
    try:
        _download_from_mirrors(spec, folder, fs, mirrors, progress)
    except BaseException:
        # A failed first download leaves no empty folders behind either (rmdir fails if not empty).
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _download_from_mirrors(
    spec: DatasetSpec, folder: Path, fs: FileSpec, mirrors: tuple[str, ...], progress: bool
) -> None:
    failures: list[str] = []
    bad_md5: str | None = None
    for mirror in mirrors:
        url = mirror if mirror.endswith("/") else mirror + "/"
        url += fs.filename
        try:
            got = _download_one(url, folder, fs, progress)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, IncompleteRead, timeouts
            failures.append(f"{url}: {_short_reason(exc)}")
            continue
        if got is None:
            return
        bad_md5 = got
        failures.append(f"{url}: md5 {got}")
    if bad_md5 is not None:
        raise VaedistError(
            f"downloaded {fs.filename} for {spec.name} has md5 {bad_md5}, expected {fs.md5} "
            f"(tried {len(mirrors)} mirror(s)); nothing was saved: try again later or put the official file in {folder}/"
        )
    reason = "; ".join(failures) if failures else "no mirrors configured"
    raise VaedistError(
        f"could not download {fs.filename} for {spec.name} from any mirror ({reason}); "
        f"this machine may be offline: put the official files in {folder}/ "
        f"or point VAEDIST_DATA_DIR at a folder that has them"
    )


def _download_one(url: str, folder: Path, fs: FileSpec, progress: bool) -> str | None:
    """Stream `url` into a temp file next to the target; install it and return None if the md5 matches.

    Returns the md5 actually received when it does not match (the temp file is removed);
    raises OSError/ValueError/HTTPException on network trouble (the temp file is removed too).
    """
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{fs.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    installed = False
    bar: _Progress | None = None
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
                # Only once the mirror answered: a dead mirror should not print "downloading".
                bar = _Progress(progress, f"{fs.filename} <- {url}", fs.size)
                h = hashlib.md5(usedforsecurity=False)
                n = 0
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
                    if n > fs.size:
                        # Not the file we want (an error page, a different release): do not fill the disk.
                        break
                # urllib's read(amt) returns b"" when the server hangs up early, even with a
                # Content-Length: call it what it is (a network failure), not a bad file.
                length = resp.headers.get("Content-Length")
                if n <= fs.size and length is not None and length.isdigit() and n < int(length):
                    raise OSError(f"connection closed after {n} of {int(length)} bytes")
            out.flush()
            os.fsync(out.fileno())
        # A short body without Content-Length also ends quietly; its md5 cannot match.
        got = h.hexdigest()
        if got != fs.md5:
            return got
        os.replace(tmp, folder / fs.filename)
        installed = True
        return None
    finally:
        if bar is not None:
            bar.close(installed)
        if not installed:
            # Also on KeyboardInterrupt: an interrupted download must leave nothing in the cache.
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
