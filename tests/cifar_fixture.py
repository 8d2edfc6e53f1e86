"""A tiny CIFAR-10 in the exact official format, because the real one is not available offline.

`make_cifar_fixture(root)` writes `<root>/cifar10/cifar-10-python.tar.gz` laid out like the
official tarball (folder `cifar-10-batches-py/` with `data_batch_1..5`, `test_batch`,
`batches.meta`, `readme.html`; each batch a protocol-2 pickle of a dict with bytes keys,
`b'data'` uint8 (N, 3072) with the R, G, B planes of each 32x32 image row-major, `b'labels'` a
list of ints). It returns what it wrote, plus a spec whose checksum matches it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from vaedist.data.registry import FileSpec, get_spec

TARBALL = "cifar-10-python.tar.gz"


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 1244834358  # fixed: the same inputs always give the same tarball bytes (and md5)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def _batch(images_nhwc: np.ndarray, labels: np.ndarray, batch_label: str, first_id: int) -> bytes:
    # Official row layout: all red values, then green, then blue; each plane row-major.
    data = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)).reshape(len(images_nhwc), 3072)
    obj = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"fixture_{first_id + i:06d}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(obj, protocol=2)


def make_cifar_fixture(root: Path, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> dict:
    """Write the fixture tarball under `<root>/cifar10/` and describe it.

    Returns a dict:
      'path': the tarball; 'md5', 'size': its checksum and byte size;
      'train_images' uint8 (5 * n_train_per_batch, 32, 32, 3) NHWC, 'train_labels' int64 (same N,):
        data_batch_1..5 concatenated in order; 'test_images', 'test_labels': test_batch;
      'spec': `get_spec('cifar10')` with files (and train/test sizes) replaced to match this tarball.
    Images are random except pixel (0, 0), which is (R, G, B) = (10, 20, 30) in every image, so a
    channel-order mistake is obvious in a failing assertion.
    """
    rng = np.random.default_rng(seed)
    n_train = 5 * n_train_per_batch
    train_images = rng.integers(0, 256, size=(n_train, 32, 32, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    train_images[:, 0, 0] = (10, 20, 30)
    test_images[:, 0, 0] = (10, 20, 30)
    train_labels = rng.integers(0, 10, size=n_train).astype(np.int64)
    test_labels = rng.integers(0, 10, size=n_test).astype(np.int64)

    folder = Path(root) / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TARBALL
    meta = {
        b"num_cases_per_batch": n_train_per_batch,
        b"label_names": [c.encode() for c in get_spec("cifar10").class_names],
        b"num_vis": 3072,
    }
    # mtime=0 in the gzip header too, so the md5 is a function of the content only.
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tar.addfile(d)
        for b in range(5):
            sl = slice(b * n_train_per_batch, (b + 1) * n_train_per_batch)
            payload = _batch(train_images[sl], train_labels[sl], f"training batch {b + 1} of 5", sl.start)
            _add(tar, f"cifar-10-batches-py/data_batch_{b + 1}", payload)
        _add(tar, "cifar-10-batches-py/readme.html", b"<html>fixture</html>\n")
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        _add(
            tar,
            "cifar-10-batches-py/test_batch",
            _batch(test_images, test_labels, "testing batch 1 of 1", n_train),
        )

    blob = path.read_bytes()
    md5 = hashlib.md5(blob).hexdigest()
    spec = dataclasses.replace(
        get_spec("cifar10"),
        files=(FileSpec(TARBALL, md5, len(blob)),),
        train_size=n_train,
        test_size=n_test,
    )
    return {
        "path": path,
        "md5": md5,
        "size": len(blob),
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "spec": spec,
    }
