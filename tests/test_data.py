"""The dataset layer on the real MNIST / Fashion-MNIST files, and on a CIFAR-10 fixture in the official format."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import make_cifar_fixture

import vaedist.data as data
from vaedist.data import DATASETS, dataset_info, fetch, get_spec, load_split, verify
from vaedist.data.readers import read_idx, val_indices
from vaedist.errors import UsageError, VaedistError

# Class counts from /work/shared/data/README.md (the official files' content checks).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def data_root(data_dir: Path) -> Path:
    """The folder with the official files (conftest's ``data_dir``: fails with how to get it when missing)."""
    if not (data_dir / "fashion-mnist").is_dir():
        pytest.fail(f"the real Fashion-MNIST files are not in {data_dir}: set VAEDIST_DATA_DIR to that folder")
    return data_dir


# ---------------------------------------------------------------- registry


def test_registry_facts():
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10"}
    mnist, fashion, cifar = get_spec("mnist"), get_spec("fashion-mnist"), get_spec("cifar10")
    assert mnist.image_shape == fashion.image_shape == (28, 28, 1)
    assert cifar.image_shape == (32, 32, 3)
    assert mnist.class_names == tuple("0123456789")
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert cifar.class_names[:2] == ("airplane", "automobile") and cifar.class_names[-1] == "truck"
    assert all(s.num_classes == 10 for s in DATASETS.values())
    assert (mnist.default_likelihood, fashion.default_likelihood, cifar.default_likelihood) == (
        "bernoulli",
        "logistic",
        "logistic",
    )
    assert (mnist.train_size, mnist.test_size, cifar.train_size) == (60000, 10000, 50000)
    assert cifar.files[0].md5 == "c58f30108f718f92721af3b95e74349a" and cifar.files[0].size == 170498071
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert {f.filename for f in mnist.files} == {f.filename for f in fashion.files}


def test_unknown_dataset_is_a_usage_error(tmp_path):
    msg = "unknown dataset 'foo' (choose from: mnist, fashion-mnist, cifar10; or a path to an image folder or Parquet table, e.g. ./my-images)"
    for call in (
        lambda: get_spec("foo"),
        lambda: load_split("foo", "train", tmp_path),
        lambda: fetch("foo", tmp_path),
        lambda: verify("foo", tmp_path),
        lambda: dataset_info("foo", tmp_path),
    ):
        with pytest.raises(UsageError) as exc:
            call()
        assert str(exc.value) == msg
        assert exc.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []  # nothing created for a bad name


def test_public_api_reexports():
    for name in (
        "DatasetSpec",
        "DATASETS",
        "get_spec",
        "default_data_dir",
        "fetch",
        "verify",
        "load_split",
        "dataset_info",
    ):
        assert hasattr(data, name)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDIST_DATA_DIR", str(tmp_path / "d"))
    assert data.default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("VAEDIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "vaedist" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_data_dir() == Path.home() / ".cache" / "vaedist" / "data"


def test_data_package_does_not_import_ray_or_mlflow():
    for path in Path(data.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
        assert "mlflow" not in text, path


# ---------------------------------------------------------------- real MNIST / Fashion-MNIST


@pytest.mark.slow
def test_verify_real_files_ok(data_root):
    for name in ("mnist", "fashion-mnist"):
        assert verify(name, data_root) == {f.filename: "ok" for f in get_spec(name).files}
    # Present and verified: fetch needs no network and returns the shared folder as is.
    assert fetch("mnist", data_root, progress=False) == data_root / "mnist"


@pytest.mark.slow
def test_read_idx_raw(data_root):
    images = read_idx(data_root / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    # The first MNIST test digit is a 7: a known fact of the official files.
    assert labels[0] == 7
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize(
    "name, train_counts, test_counts",
    [
        ("mnist", MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS),
        ("fashion-mnist", [6000] * 10, [1000] * 10),
    ],
)
@pytest.mark.slow
def test_full_splits_match_the_official_content(data_root, name, train_counts, test_counts):
    for split, n, counts in (("train_full", 60000, train_counts), ("test", 10000, test_counts)):
        x, y = load_split(name, split, data_root)
        assert x.shape == (n, 28, 28, 1)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        assert y.shape == (n,)
        assert x.flags.c_contiguous
        assert np.bincount(y, minlength=10).tolist() == counts
        assert 0 < x.mean() < 255


@pytest.mark.slow
def test_val_split_deterministic_disjoint_and_complete(data_root):
    xf, yf = load_split("mnist", "train_full", data_root)
    xt, yt = load_split("mnist", "train", data_root)
    xv, yv = load_split("mnist", "val", data_root)
    assert len(yt) == 55000 and len(yv) == 5000
    assert xt.shape[1:] == xv.shape[1:] == (28, 28, 1)

    train_rows, val_rows = val_indices(60000, 5000)
    # The documented recipe: last 5000 of a PCG64(0) permutation, each side sorted.
    perm = np.random.Generator(np.random.PCG64(0)).permutation(60000)
    np.testing.assert_array_equal(val_rows, np.sort(perm[-5000:]))
    np.testing.assert_array_equal(train_rows, np.sort(perm[:-5000]))
    assert np.intersect1d(train_rows, val_rows).size == 0
    np.testing.assert_array_equal(np.union1d(train_rows, val_rows), np.arange(60000))

    # The split arrays really are those rows of the full training set.
    np.testing.assert_array_equal(xv, xf[val_rows])
    np.testing.assert_array_equal(yv, yf[val_rows])
    np.testing.assert_array_equal(xt, xf[train_rows])
    np.testing.assert_array_equal(yt, yf[train_rows])
    # Together they hold every class count of the official training set.
    assert (np.bincount(yt, minlength=10) + np.bincount(yv, minlength=10)).tolist() == MNIST_TRAIN_COUNTS
    # Stratification is not promised, but a random 5000 has every class.
    assert np.bincount(yv, minlength=10).min() > 300

    # Same answer from a fresh computation (no hidden state), and nested across val sizes.
    np.testing.assert_array_equal(val_indices(60000, 5000)[1], val_rows)
    assert np.isin(val_indices(60000, 1000)[1], val_rows).all()


@pytest.mark.slow
def test_val_size_zero_and_bounds(data_root):
    xf, _ = load_split("mnist", "train_full", data_root)
    xt, _ = load_split("mnist", "train", data_root, val_size=0)
    xv, yv = load_split("mnist", "val", data_root, val_size=0)
    assert xt.shape == xf.shape
    assert xv.shape == (0, 28, 28, 1) and yv.shape == (0,) and yv.dtype == np.int64
    x7, _ = load_split("mnist", "val", data_root, val_size=7)
    assert len(x7) == 7
    for bad in (-1, 60000, 1.5):
        with pytest.raises(UsageError, match="val_size"):
            load_split("mnist", "val", data_root, val_size=bad)
    with pytest.raises(
        UsageError, match=r"unknown split 'validation' \(choose from: train, val, train_full, test\)"
    ):
        load_split("mnist", "validation", data_root)


@pytest.mark.slow
def test_arrays_are_cached_and_read_only(data_root):
    x1, y1 = load_split("mnist", "test", data_root)
    x2, y2 = load_split("mnist", "test", data_root)
    assert x1 is x2 and y1 is y2
    for a in (x1, y1, *load_split("mnist", "train", data_root)):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 1


@pytest.mark.slow
def test_dataset_info(data_root):
    info = dataset_info("mnist", data_root)
    assert info["folder"] == str(data_root / "mnist")
    assert info["ready"] is True
    assert set(info["files"].values()) == {"ok"}
    splits = info["splits"]
    assert {k: v["count"] for k, v in splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    assert all(v["image_shape"] == (28, 28, 1) for v in splits.values())
    assert splits["test"]["class_counts"] == MNIST_TEST_COUNTS
    assert [
        a + b for a, b in zip(splits["train"]["class_counts"], splits["val"]["class_counts"], strict=True)
    ] == (MNIST_TRAIN_COUNTS)
    assert info["default_likelihood"] == "bernoulli"


def test_dataset_info_never_downloads(tmp_path):
    info = dataset_info("cifar10", tmp_path)  # nothing there, and no mirror is contacted
    assert info["files"] == {"cifar-10-python.tar.gz": "missing"}
    assert info["ready"] is False and info["splits"] == {}
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- missing and corrupt files


def _copy_mnist(data_root: Path, dest: Path) -> Path:
    shutil.copytree(data_root / "mnist", dest / "mnist")
    for p in (dest / "mnist").iterdir():
        p.chmod(0o644)  # the shared copy is read-only
    return dest / "mnist"


@pytest.mark.slow
def test_corrupt_local_file_is_reported_not_deleted(data_root, tmp_path):
    folder = _copy_mnist(data_root, tmp_path)
    assert verify("mnist", tmp_path)["t10k-labels-idx1-ubyte.gz"] == "ok"
    target = folder / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[100] ^= 0xFF  # same size, different content: only the md5 can tell
    target.write_bytes(bytes(blob))
    # A new mtime and the same size: the md5 cache must notice the rewrite.
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))

    assert verify("mnist", tmp_path)["t10k-labels-idx1-ubyte.gz"] == "corrupt"
    for call in (
        lambda: load_split("mnist", "test", tmp_path, download=False),
        lambda: load_split("mnist", "test", tmp_path),  # download=True must not "repair" it silently
        lambda: fetch("mnist", tmp_path, mirrors=["http://127.0.0.1:9/"], progress=False),
    ):
        with pytest.raises(VaedistError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg
        assert str(target) in msg and "corrupt" in msg and "delete it" in msg
        assert "ec29112dd5afa0611ce80d1b7f02629c" in msg  # the expected md5
    assert target.read_bytes() == bytes(blob)  # the user's file is still there, untouched


@pytest.mark.slow
def test_truncated_local_file_reports_size(data_root, tmp_path):
    folder = _copy_mnist(data_root, tmp_path)
    target = folder / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(VaedistError, match=r"is corrupt \(1000 bytes, expected 28881\)"):
        load_split("mnist", "train", tmp_path, download=False)


@pytest.mark.slow
def test_missing_file_without_download(data_root, tmp_path):
    folder = _copy_mnist(data_root, tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    assert verify("mnist", tmp_path)["t10k-images-idx3-ubyte.gz"] == "missing"
    with pytest.raises(
        VaedistError, match=r"t10k-images-idx3-ubyte.gz for mnist is missing from .*mnist/"
    ) as exc:
        load_split("mnist", "test", tmp_path, download=False)
    assert "\n" not in str(exc.value)
    info = dataset_info("mnist", tmp_path)
    assert info["ready"] is False and info["files"]["t10k-images-idx3-ubyte.gz"] == "missing"


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad-magic.gz"
    bad_magic.write_bytes(gzip.compress((1234).to_bytes(4, "big") + bytes(12)))
    with pytest.raises(VaedistError, match="IDX magic 1234, expected 2051"):
        read_idx(bad_magic)
    short = tmp_path / "short.gz"
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
    short.write_bytes(gzip.compress(header + bytes(28 * 28)))  # one image where two are announced
    with pytest.raises(VaedistError, match="IDX header"):
        read_idx(short)
    not_gz = tmp_path / "plain.gz"
    not_gz.write_bytes(b"this is not gzip")
    with pytest.raises(VaedistError, match="not a readable gzip file"):
        read_idx(not_gz)


def test_spec_override_must_match_name(tmp_path):
    with pytest.raises(UsageError, match="does not match"):
        verify("mnist", tmp_path, spec=get_spec("fashion-mnist"))


# ---------------------------------------------------------------- CIFAR-10 (fixture in the official format)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar-root")
    fx = make_cifar_fixture(root, n_train_per_batch=20, n_test=20, seed=0)
    fx["root"] = root
    return fx


def test_cifar_fixture_is_rejected_by_the_official_checksum(cifar):
    assert verify("cifar10", cifar["root"]) == {"cifar-10-python.tar.gz": "corrupt"}
    assert verify("cifar10", cifar["root"], spec=cifar["spec"]) == {"cifar-10-python.tar.gz": "ok"}
    with pytest.raises(VaedistError, match="is corrupt .*expected 170498071.*delete it"):
        load_split("cifar10", "test", cifar["root"])


def test_cifar_reads_exactly_what_was_written(cifar):
    spec = cifar["spec"]
    x, y = load_split("cifar10", "train_full", cifar["root"], spec=spec)
    assert x.shape == (100, 32, 32, 3) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x, cifar["train_images"])  # batches 1..5 in order, NHWC
    np.testing.assert_array_equal(y, cifar["train_labels"])
    assert x[0, 0, 0].tolist() == [10, 20, 30]  # R, G, B in that order
    xt, yt = load_split("cifar10", "test", cifar["root"], spec=spec)
    np.testing.assert_array_equal(xt, cifar["test_images"])
    np.testing.assert_array_equal(yt, cifar["test_labels"])
    assert not x.flags.writeable and not xt.flags.writeable


def test_cifar_val_split_and_info(cifar):
    spec = cifar["spec"]
    xv, yv = load_split("cifar10", "val", cifar["root"], val_size=10, spec=spec)
    xt, yt = load_split("cifar10", "train", cifar["root"], val_size=10, spec=spec)
    train_rows, val_rows = val_indices(100, 10)
    np.testing.assert_array_equal(xv, cifar["train_images"][val_rows])
    np.testing.assert_array_equal(yt, cifar["train_labels"][train_rows])
    assert len(xt) + len(xv) == 100
    with pytest.raises(UsageError, match="val_size"):
        load_split("cifar10", "val", cifar["root"], spec=spec)  # default 5000 > 100 rows

    info = dataset_info("cifar10", cifar["root"], val_size=10, spec=spec)
    assert info["ready"] is True
    assert {k: v["count"] for k, v in info["splits"].items()} == {"train": 90, "val": 10, "test": 20}
    assert info["splits"]["test"]["image_shape"] == (32, 32, 3)
    assert info["splits"]["test"]["class_counts"] == np.bincount(cifar["test_labels"], minlength=10).tolist()


def test_cifar_fixture_is_deterministic(tmp_path, cifar):
    again = make_cifar_fixture(tmp_path, n_train_per_batch=20, n_test=20, seed=0)
    assert again["md5"] == cifar["md5"] and again["size"] == cifar["size"]


def test_cifar_tarball_without_batches_is_rejected(tmp_path):
    fx = make_cifar_fixture(tmp_path)
    spec = fx["spec"]
    fx["path"].write_bytes(gzip.compress(b"\0" * 1024))  # a valid gzip of an empty tar
    blob = fx["path"].read_bytes()
    spec = dataclasses.replace(
        spec, files=(dataclasses.replace(spec.files[0], md5=hashlib.md5(blob).hexdigest(), size=len(blob)),)
    )
    with pytest.raises(VaedistError, match="lacks cifar-10-batches-py/data_batch_1"):
        load_split("cifar10", "test", tmp_path, spec=spec)


# ---------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_data_info_and_fetch_on_the_official_files(data_root, tmp_path):
    from click.testing import CliRunner

    from vaedist.cli import main

    result = CliRunner().invoke(main, ["data", "info", "mnist", "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"mnist: {data_root / 'mnist'}"
    assert sum(line.startswith("  ok ") for line in lines) == 4
    test_row = lines.index("  test   10000 images 28x28x1")
    assert lines[test_row + 1].strip() == "per class: " + ", ".join(f"{i}={n}" for i, n in enumerate(MNIST_TEST_COUNTS))
    # Present and verified: fetch downloads nothing (this machine has no internet) and says so.
    result = CliRunner().invoke(main, ["data", "fetch", "mnist", "--data-dir", str(data_root)])
    assert result.exit_code == 0 and result.output.strip() == f"mnist: verified in {data_root / 'mnist'}"

    # An empty cache: where the files belong and what to run, and nothing written there.
    empty = tmp_path / "cache"
    result = CliRunner().invoke(main, ["data", "info", "fashion-mnist", "--data-dir", str(empty)])
    assert result.exit_code == 0
    assert result.output.count("  missing ") == 4 and "run 'vaedist data fetch fashion-mnist'" in result.output
    assert not empty.exists() or not any(empty.rglob("*"))
