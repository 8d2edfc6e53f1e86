"""Files on any filesystem pyarrow opens (local, ``s3://``, ...): the folder a URI names, and the one
atomic write. The bottom of the house: imports nothing of vaedist."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def resolve_folder(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root inside it, canonical URI) of a local folder or ``s3://...`` prefix; pyarrow's
    own exception for a URI it cannot open (callers word the message for their flag)."""
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/"), uri.rstrip("/")
    path = str(Path(uri).expanduser().resolve())
    return pafs.LocalFileSystem(), path, path


def write_atomic(fs: pafs.FileSystem, root: str, name: str, data: bytes | pa.Buffer) -> None:
    """Write ``root/name`` (``name`` may hold a sub-folder: ``data/x``) under a unique hidden temporary
    name in the same folder, then rename: whole or absent, and readers that skip ``.`` names never see
    the half-written file."""
    folder, _, base = name.rpartition("/")
    where = join(root, folder) if folder else root
    tmp = join(where, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, join(where, base))
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
