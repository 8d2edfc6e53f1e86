"""vaedist evaluate audit: the measures on arrays whose answer is known, the blocked neighbour search against
brute force, the verdicts and the bad-input checks (fast, no data, no Ray), then for real (slow): real MNIST
written as Parquet tables with a Hugging Face Image column (training images passed off as generated, held-out
test images, uniform noise) and a small CVAE's samples as a vaedist folder, audited on local Ray with MLflow
on a throwaway sqlite store. The feature classifier trains once (1 epoch) and is read back from MLflow after.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vaedist.charts import per_class_bars
from vaedist.config import ConfigError, EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError
from vaedist.evaluate import audit as A
from vaedist.evaluate import neighbours as nb
from vaedist.evaluate import sets
from vaedist.evaluate.entry import check_request
from vaedist.figures import nearest_copies_grid
from vaedist.generate.format import PNG_STRUCT
from vaedist.generate.plan import Plan
from vaedist.generate.png import encode_pngs
from vaedist.generate.reader import GeneratedSet
from vaedist.generate.writer import write_folder

N = 5000  # images per audited set (the sizes)


def _quiet(*_args) -> None:
    pass


def write_table(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A labelled image table as other generators write it: a Hugging Face Image struct column (PNG bytes)
    and an int64 label column, no vaedist metadata."""
    column = pa.array([{"bytes": b, "path": None} for b in encode_pngs(images)], type=PNG_STRUCT)
    pq.write_table(pa.table({"image": column, "label": pa.array(labels, pa.int64())}), path)
    return path


def vaedist_folder(folder: Path, images: np.ndarray, labels: np.ndarray, *, dataset: str = "mnist",
                   model: dict | None = None, manifest: bool = True, model_uri: str = "models:/vaedist-mnist/1",
                   model_version: str = "1", class_names: tuple[str, ...] | None = None) -> Path:  # fmt: skip
    """A folder as vaedist generate writes it (the format module's writer), images grouped by label."""
    names = class_names or get_spec(dataset).class_names
    present = sorted(set(labels.tolist()))
    counts = tuple(int((labels == k).sum()) for k in present)
    plan = Plan(model_uri, model_version, "0" * 64, dataset, tuple(present), tuple(names[k] for k in present), counts,
                0, 1.0, 2500, "png", tuple(images.shape[1:]), 2, tuple(names))  # fmt: skip
    order = np.argsort(labels, kind="stable")  # the plan's rows go label by label
    z = np.zeros((len(labels), 2), np.float32)
    write_folder(str(folder), plan, images[order], z, model_info=model or {"name": "vaedist-mnist", "run_id": ""},
                 manifest=manifest)  # fmt: skip
    return folder


def _brute_nearest(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


# ----------------------------------------------------------------------------- the neighbour search


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks far smaller than the data, so every query and reference block boundary is crossed."""
    monkeypatch.setattr(nb, "QUERY_BLOCK", 37)
    monkeypatch.setattr(nb, "REF_BLOCK", 101)
    monkeypatch.setattr(nb, "SHORTLIST", 16)


KERNELS = [nb.Kernel("cpu", dtype) for dtype in nb.PASS1_DTYPES]  # each pass-1 path, forced on this machine


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.dtype)
def test_nearest_in_blocks_is_the_brute_force_answer(small_blocks, kernel):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(900, 24)).astype(np.float32) * 3 + 5  # off-centre: the search centres
    queries = rng.normal(size=(250, 24)).astype(np.float32) * 3 + 5
    dist, idx = nb.nearest(queries, reference, 5, kernel=kernel)
    want_d, want_i = _brute_nearest(queries, reference, 5)
    assert dist.shape == (250, 5) and idx.dtype == np.int64
    assert np.array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.dtype)
def test_nearest_finds_an_exact_copy_at_distance_zero(small_blocks, kernel):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (600, 8, 8, 1), dtype=np.uint8)  # uint8 images: pixels in [0, 1]
    copies = train[[5, 77, 599]]
    dist, idx = nb.nearest(copies, train, 2, kernel=kernel)
    assert (dist[:, 0] == 0).all() and idx[:, 0].tolist() == [5, 77, 599]
    want_d, _ = _brute_nearest(copies.reshape(3, -1) / 255, train.reshape(600, -1) / 255, 2)
    np.testing.assert_allclose(dist[:, 1], want_d[:, 1], rtol=1e-5)
    with pytest.raises(ValueError, match="k=601 nearest neighbours asked of 600"):
        nb.nearest(copies, train, 601, kernel=kernel)


@pytest.mark.parametrize("space", ["features", "pixels"])
def test_the_two_pass1_kernels_agree(small_blocks, space):
    """Exact copies: the same neighbours at distance 0 from both kernels; points near (not on) a reference:
    the same nearest index but for near-ties, distances within 1e-5 (pass 2 is exact float32 either way)."""
    rng = np.random.default_rng(3)
    if space == "features":  # the audit's 64-d features
        reference = rng.normal(size=(3000, 64)).astype(np.float32)
        near = reference[5::10] + rng.normal(scale=0.05, size=(300, 64)).astype(np.float32)
    else:  # uint8 pixels, D = 196
        reference = rng.integers(0, 256, (3000, 14, 14, 1), dtype=np.uint8)
        near = np.clip(reference[5::10].astype(int) + rng.integers(-3, 4, (300, 14, 14, 1)), 0, 255).astype(np.uint8)
    copies = reference[::10]
    bf16, fp32 = KERNELS
    for d, i in (nb.nearest(copies, reference, 3, kernel=bf16), nb.nearest(copies, reference, 3, kernel=fp32)):
        assert (d[:, 0] == 0).all() and np.array_equal(i[:, 0], np.arange(0, 3000, 10))
    (d_b, i_b), (d_f, i_f) = nb.nearest(near, reference, 3, kernel=bf16), nb.nearest(near, reference, 3, kernel=fp32)
    assert (i_b[:, 0] == i_f[:, 0]).mean() >= 0.99
    np.testing.assert_allclose(d_b, d_f, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_float32_on_a_cpu_without_native_bf16():
    avx2_only = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # an AMD EPYC before Zen 4
    assert nb.choose_kernel("cpu", flags=avx2_only) == nb.Kernel("cpu", "float32")
    for native in ("amx_bf16", "avx512_bf16", "bf16"):  # Sapphire Rapids, Cooper Lake / Zen 4, ARMv8.6
        assert nb.choose_kernel("cpu", flags=avx2_only | {native}).dtype == "bfloat16"
    assert nb.choose_kernel("cpu", forced="bfloat16", flags=avx2_only).dtype == "bfloat16"
    assert nb.choose_kernel("cpu", forced="float32", flags=frozenset({"amx_bf16"})).name == "cpu/float32"
    with pytest.raises(ValueError, match="VAEDIST_SEARCH_DTYPE='fp8' is not one of bfloat16, float32"):
        nb.choose_kernel("cpu", forced="fp8")


def test_the_kernel_here_follows_this_cpu_and_the_environment(monkeypatch):
    from vaedist import hardware

    monkeypatch.delenv(nb.DTYPE_ENV, raising=False)
    assert nb.kernel_here().dtype == ("bfloat16" if hardware.native_bf16_matmul() else "float32")
    monkeypatch.setenv(nb.DTYPE_ENV, "bfloat16")
    assert nb.kernel_here() == nb.Kernel("cpu", "bfloat16")
    search = A.Search()  # in this process: the kernel it ran is recorded
    search.nearest(np.zeros((4, 3), np.float32), np.ones((5, 3), np.float32), 1)
    assert search.kernels == {"cpu/bfloat16"}


def test_ball_counts_are_the_brute_force_counts(small_blocks):
    rng = np.random.default_rng(2)
    reference, queries = rng.normal(size=(500, 6)), rng.normal(size=(300, 6))
    radii = rng.uniform(0.5, 1.5, size=500)
    d, _ = _brute_nearest(queries, reference, 500)
    want = (np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(-1)) < radii[None]).sum(1)
    assert d.shape == (300, 500)
    counts = nb.ball_counts(queries, reference, radii)
    assert np.abs(counts - want).max() <= 1 and (counts == want).mean() > 0.99  # float32 at the ball's edge


# ----------------------------------------------------------------------------------- the measures


def test_prdc_of_identical_and_of_far_apart_sets():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(400, 8)).astype(np.float32)
    same = A.prdc(real, real.copy(), 5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=0.3)
    far = A.prdc(real, real + 100.0, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    half = A.prdc(real, np.concatenate([real[:200], real[:200] + 100.0]), 5)  # half the samples look real
    assert half["precision"] == pytest.approx(0.5, abs=0.02)


def test_frechet_distance_and_kid_know_the_answer():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(20000, 4))
    assert A.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 0.0, 4.0, 0.0])
    # Same covariance, means 5 apart: FD = ||mu_r - mu_f||^2 = 25 (the trace term cancels).
    assert A.frechet_distance(real, real + shift) == pytest.approx(25.0, rel=1e-3)
    # N(0, I) vs N(0, 4 I) in D=4: sum over dims of (1 + 4 - 2 * 2) = 4.
    assert A.frechet_distance(real, 2.0 * rng.normal(size=(20000, 4))) == pytest.approx(4.0, rel=0.05)
    same, spread = A.kernel_inception_distance(real[:5000], real[5000:10000], seed=0)
    assert abs(same) < 3 * spread < 0.05
    assert A.kernel_inception_distance(real[:5000], real[5000:10000] + shift, seed=0)[0] > 1.0
    assert A.kernel_inception_distance(real[:5000], real[5000:10000], seed=0) == (same, spread)  # seeded


def test_copies_have_no_distance_and_a_strongly_negative_z():
    rng = np.random.default_rng(5)
    test = rng.uniform(1.0, 2.0, 2000)
    copies = A.dcr_figures(np.zeros(1000), test)
    assert copies["copy_fraction"] == 1.0 and copies["dcr_ratio"] == 0.0
    fresh = A.dcr_figures(rng.uniform(1.0, 2.0, 1000), test)
    assert fresh["copy_fraction"] < 0.03 and fresh["dcr_ratio"] == pytest.approx(1.0, abs=0.05)
    assert A.mann_whitney_z(np.zeros(200), test[:300]) < -10
    assert abs(A.mann_whitney_z(rng.uniform(1.0, 2.0, 200), test[:300])) < 3
    cells_t, cells_g = rng.integers(0, 4, 2000), rng.integers(0, 4, 1000)
    z, used = A.data_copying_z(test, cells_t, np.zeros(1000), cells_g)
    assert used == 4 and z < -10
    z, used = A.data_copying_z(test, cells_t, rng.uniform(1.0, 2.0, 1000), cells_g)
    assert used == 4 and abs(z) < 3
    assert math.isnan(A.data_copying_z(test, cells_t, np.zeros(10), cells_g[:10])[0])  # no cell of > 20


def _result(**changes) -> dict:
    real = {"fd": 1.0, "kid": 0.0, "kid_std": 0.01, "precision": 0.8, "recall": 0.8, "density": 1.0, "coverage": 0.9,
            "dcr_ratio": 1.0, "copy_fraction": 0.01, "data_copying_z": 0.0}  # fmt: skip
    return {**real, "real": real, **changes}


def test_verdicts_read_each_measure_against_its_floor():
    fresh = A.judge(_result(fd=1.5))
    assert {v["level"] for v in fresh.values()} == {"ok"} and A.headline(fresh) == {
        "fidelity": "ok", "diversity": "ok", "memorization": "ok"}  # fmt: skip
    copies = A.judge(_result(copy_fraction=1.0, dcr_ratio=0.0, data_copying_z=-12.0))
    assert (
        copies["copy_fraction"]["level"]
        == copies["data_copying_z"]["level"]
        == copies["dcr_ratio"]["level"]
        == "fail"
    )
    assert A.headline(copies)["memorization"] == "fail" and A.headline(copies)["fidelity"] == "ok"
    noise = A.judge(_result(fd=400.0, precision=0.0, recall=0.0, coverage=0.0))
    assert A.headline(noise) == {"fidelity": "fail", "diversity": "fail", "memorization": "ok"}
    assert "400x" in noise["fd"]["text"]
    assert A.judge(_result(fd=5.0))["fd"]["level"] == "warn"
    assert A.judge(_result(data_copying_z=5.0))["data_copying_z"]["text"].endswith("underfitting)")
    line = A.verdict_line({**_result(fd=400.0), "headline": A.headline(noise)})
    assert line.startswith("fidelity FAIL (FD 400, real 1;") and "memorization OK" in line
    assert A.json_ready({"a": float("nan"), "b": [np.float32(2.5), math.inf]}) == {
        "a": None,
        "b": [2.5, None],
    }


# ----------------------------------------------------------------------- sets: which, and checked


def test_a_vaedist_folder_is_told_from_a_foreign_table(tmp_path):
    rng = np.random.default_rng(6)
    images, labels = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(10), 2)
    folder = vaedist_folder(tmp_path / "gen", images, labels)
    table = write_table(tmp_path / "other.parquet", images, labels)
    (tmp_path / "hub").mkdir()
    write_table(tmp_path / "hub" / "train-00000-of-00001.parquet", images, labels)
    (tmp_path / "empty").mkdir()
    assert sets.is_vaedist(str(folder)) and sets.is_vaedist(str(vaedist_folder(tmp_path / "partial", images, labels,
                                                                               manifest=False)))  # fmt: skip
    assert not sets.is_vaedist(str(table)) and not sets.is_vaedist(str(tmp_path / "hub"))
    assert sets.is_vaedist(str(tmp_path / "empty"))  # nothing foreign to read: vaedist's reader says "empty"
    with pytest.raises(UsageError, match="is one shard of a vaedist generated folder: pass the folder"):
        sets.is_vaedist(str(folder / "data/train-00000-of-00001.parquet"))
    ours, theirs = sets.read_set(str(folder)), sets.read_set(str(table))
    assert ours.model_uri == "models:/vaedist-mnist/1" and theirs.model_uri is None
    assert theirs.image_format == "table" and len(theirs.manifest_sha1) == 16 and theirs.label_names == {}
    assert np.array_equal(theirs.images, images) and np.array_equal(theirs.labels, labels)
    assert sorted(ours.labels.tolist()) == sorted(labels.tolist())


def _set(images: np.ndarray, labels, **changes) -> GeneratedSet:
    values = {"folder": "s", "images": images, "labels": np.asarray(labels, np.int64), "dataset": None,
              "model_uri": None, "model_version": None, "model_run_id": None, "image_format": "table"}  # fmt: skip
    return GeneratedSet(**{**values, **changes})


def test_a_set_is_checked_against_its_dataset():
    images = np.zeros((12, 28, 28, 1), np.uint8)
    dataset, checked = A.check_set(_set(images, np.arange(12) % 10), "mnist", 5)
    assert dataset == "mnist" and checked.labels.tolist() == (np.arange(12) % 10).tolist()
    # Declared names are mapped onto the dataset's class indices (string labels come sorted).
    fashion = get_spec("fashion-mnist").class_names
    named = _set(images, [0] * 12, label_names={0: [fashion[7]]})
    assert A.check_set(named, "fashion-mnist", 5)[1].labels.tolist() == [7] * 12
    cases = [
        (_set(images, [0] * 12), None, "does not say which dataset it imitates: pass --dataset"),
        (_set(np.zeros((12, 14, 14, 1), np.uint8), [0] * 12), "mnist", "are 14x14x1 but mnist images are 28x28x1"),
        (_set(images[:5], [0] * 5), "mnist", "holds 5 image(s), fewer than k + 1 = 6"),
        (_set(images, [12] * 12), "mnist", "label 12 in s is not a mnist class (0..9)"),
        (_set(images, [0] * 12, label_names={0: ["cat"]}), "mnist", "class 'cat' of s is not a mnist class"),
        (_set(images, [0] * 12, image_format="png", label_names={0: ["T-shirt/top"]}), "mnist",
         "label 0 in s is named 'T-shirt/top' but mnist calls it '0'"),
        (_set(images, [0] * 12, dataset="fashion-mnist"), "mnist", "was generated for fashion-mnist, not mnist"),
    ]  # fmt: skip
    for gen, dataset, message in cases:
        with pytest.raises(
            UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
        ):
            A.check_set(gen, dataset, 5)


def test_a_set_from_a_model_of_other_data_is_refused_unless_allowed():
    """The data a set is judged against is named by its fingerprint: the manifest keeps the generating
    model's (from its checkpoint); another is refused in one line, unless --allow-other-data."""
    images, mnist = np.zeros((12, 28, 28, 1), np.uint8), get_spec("mnist").fingerprint
    same = _set(images, np.arange(12) % 10, manifest={"dataset_fingerprint": mnist})
    assert A.check_set(same, "mnist", 5)[0] == "mnist"
    unknown = _set(images, np.arange(12) % 10, manifest={"dataset_fingerprint": ""})  # an older folder
    assert A.check_set(unknown, "mnist", 5)[0] == "mnist"
    other = _set(images, np.arange(12) % 10, manifest={"dataset_fingerprint": "0123456789abcdef"})
    with pytest.raises(UsageError, match=rf"s was generated by a model trained on data with fingerprint 0123456789abcdef, "
                                         rf"but mnist is now {mnist} .*--allow-other-data"):  # fmt: skip
        A.check_set(other, "mnist", 5)
    assert A.check_set(other, "mnist", 5, allow_other_data=True)[0] == "mnist"


def test_config_and_request_know_the_audit():
    cfg = EvaluateConfig(generated="g", audit=True)
    assert check_request(cfg, "cas", None) == ("cas", "audit")
    assert check_request(EvaluateConfig(generated="g", model="m"), "all", None) == ("likelihood", "cas")
    assert check_request(EvaluateConfig(generated="g"), "audit", None) == ("audit",)
    with pytest.raises(UsageError, match="evaluate audit needs a synthetic set"):
        check_request(EvaluateConfig(), "audit", None)
    with pytest.raises(ConfigError, match="evaluate.audit_k: must be an integer >= 1, got 0"):
        EvaluateConfig(audit_k=0)
    with pytest.raises(ConfigError, match="evaluate.audit: must be true or false"):
        EvaluateConfig(audit="yes")


def test_audit_pictures():
    rng = np.random.default_rng(7)
    gen, near = rng.integers(0, 256, (2, 6, 28, 28, 1), dtype=np.uint8)
    grid = nearest_copies_grid(gen, near, [0.0, 0.1, 1, 2, 3, 4], threshold=0.5, title="copies")
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > 6 * 56
    with pytest.raises(ValueError, match="5 distances for 6 pairs"):
        nearest_copies_grid(gen, near, [0.0] * 5)
    bars = per_class_bars(list("abc"), {"precision": [0.5, 0.9, float("nan")], "recall": [0.2, 0.3, 0.4]},
                          {"precision": [0.6, 0.8, 0.7]}, title="per class")  # fmt: skip
    assert bars.dtype == np.uint8 and bars.shape[0] == 500 and bars.shape[2] == 3


# ------------------------------------------------------------------------------------- bad input


def _bad(kind: str, root: Path) -> Path:
    rng = np.random.default_rng(8)
    images, labels = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(10), 2)
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if kind == "unfinished":
        return vaedist_folder(root / "partial", images, labels, manifest=False)
    if kind == "shape":
        return write_table(root / "small.parquet", images[:, :14, :14], labels)
    if kind == "classes":
        return vaedist_folder(
            root / "fashion", images, labels, class_names=get_spec("fashion-mnist").class_names
        )
    if kind == "labels":
        return write_table(root / "labels.parquet", images, labels + 5)
    if kind == "few":
        return write_table(root / "few.parquet", images[:5], labels[:5])
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is empty: no _manifest.json and no shard files"),
        (
            "unfinished",
            "is incomplete: 1 shard(s) but no _manifest.json (written last), so generation did not finish",
        ),
        ("shape", "are 14x14x1 but mnist images are 28x28x1"),
        ("classes", "is named 'T-shirt/top' but mnist calls it '0'"),
        ("labels", "label 10 in"),
        ("few", "holds 5 image(s), fewer than k + 1 = 6"),
    ],
)
def test_cli_audit_bad_input_is_one_line(kind, message, tmp_path, cli_in_process):
    args = ["evaluate", "audit", "--generated", str(_bad(kind, tmp_path)), "--dataset", "mnist"]
    proc = cli_in_process(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()  # refused before anything


# -------------------------------------------------------------------- for real: MNIST, Ray, MLflow


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    """5,000 real MNIST training images, 5,000 held-out test images (a seeded random choice: the test
    set's first half comes from other writers than its second), and uniform noise, each as a table."""
    root, rng = tmp_path_factory.mktemp("tables"), np.random.default_rng(0)
    (train_x, train_y), (test_x, test_y) = load_split("mnist", "train_full"), load_split("mnist", "test")
    rows, test_rows = rng.choice(len(train_y), N, replace=False), rng.choice(len(test_y), N, replace=False)
    noise = rng.integers(0, 256, (N, 28, 28, 1), dtype=np.uint8)
    return {
        "copies": write_table(root / "train-copies.parquet", train_x[rows], train_y[rows]),
        "test": write_table(root / "held-out.parquet", test_x[test_rows], test_y[test_rows]),
        "noise": write_table(root / "noise.parquet", noise, rng.integers(0, 10, N)),
    }


@pytest.fixture(scope="module")
def model_samples(module_store, tmp_path_factory) -> tuple[Path, dict]:
    """A dense CVAE trained 300 steps on real MNIST (plain torch, ~3 s), registered as vaedist-mnist v1,
    and 500 of its samples per digit as the folder vaedist generate writes."""
    import mlflow

    from vaedist.checkpoint import save_checkpoint
    from vaedist.models import CVAE, binarize, to_model_input

    torch.manual_seed(0)
    images, labels = load_split("mnist", "train")
    model = CVAE(image_shape=(28, 28, 1), num_classes=10, likelihood="bernoulli", arch="dense", latent_dim=8,
                 width=256, depth=1)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = rng.integers(0, len(labels), 128)
        out = model.loss(
            binarize(to_model_input(torch.from_numpy(images[idx])), generator=g),
            torch.from_numpy(labels[idx]),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("cvae") / "model.pt"
    save_checkpoint(path, model.eval(), optimizer, 1, {"data.dataset": "mnist", "model.variant": "cvae"}, {})
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vaedist/mnist")
    run = client.create_run(
        exp.experiment_id if exp else client.create_experiment("vaedist/mnist"), run_name="cvae"
    )
    client.log_artifact(run.info.run_id, str(path), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("vaedist-mnist")
    mv = client.create_model_version(
        "vaedist-mnist", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    sample_labels = np.repeat(np.arange(10), N // 10)
    with torch.no_grad():
        x = model.generate(torch.randn(N, 8, generator=g), torch.from_numpy(sample_labels))  # (N, 1, 28, 28)
    samples = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    folder = vaedist_folder(tmp_path_factory.mktemp("gen") / "cvae-samples", samples, sample_labels,
                            model={"name": "vaedist-mnist", "run_id": run.info.run_id},
                            model_uri=f"models:/vaedist-mnist/{mv.version}", model_version=str(mv.version))  # fmt: skip
    return folder, {"run_id": run.info.run_id, "uri": f"models:/vaedist-mnist/{mv.version}"}


@pytest.fixture(scope="module")
def audit_of(module_store, local_ray, tables):
    """Audit a set once per module (1-epoch feature classifier, 2 workers); results by name."""
    from vaedist.evaluate import run_evaluate

    done: dict[str, tuple[dict, list[str]]] = {}

    def run(name: str, source: Path | None = None) -> tuple[dict, list[str]]:
        if name not in done:
            lines: list[str] = []
            cfg = EvaluateConfig(generated=str(source or tables[name]), dataset="mnist", classifier_epochs=1)
            done[name] = (
                run_evaluate(cfg, ResourcesConfig(workers=2), "audit", echo=lines.append)["audit"],
                lines,
            )
            print(
                f"\n{name}:", *(line for line in lines if line.startswith("  ") and "[" not in line), sep="\n"
            )
        return done[name]

    return run


@pytest.mark.slow
def test_training_images_passed_off_as_generated_are_flagged(audit_of):
    r, lines = audit_of("copies")
    assert r["copy_fraction"] > 0.9 and r["data_copying_z"] < -3 and r["dcr_ratio"] < 0.2, r
    assert r["headline"]["memorization"] == "fail"
    assert r["pixel"]["copy_fraction"] > 0.9 and r["pixel"]["dcr_ratio"] < 0.2  # exact copies: pixels agree
    assert r["nearest_copies"][0][2] < 1e-3  # the closest pair is a copy
    assert any("feature extractor: training" in line for line in lines)  # the first audit trains it
    assert any("not Inception FID" in line for line in lines) and any("verdict: " in line for line in lines)
    assert r["generated_images"] == N and r["sample_size"] == N and r["train_images"] == 60000


@pytest.mark.slow
def test_held_out_test_images_pass_as_fresh_and_json_has_the_keys(audit_of, tables, module_store):
    from click.testing import CliRunner

    from vaedist.cli import main

    audit_of("copies")  # the feature classifier exists: the CLI below reads it back from MLflow
    result = CliRunner().invoke(main, ["evaluate", "audit", "--generated", str(tables["test"]), "--dataset", "mnist",
                                       "--epochs", "1", "--workers", "2", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout.strip().splitlines()[-1])
    print("\ntest (CLI --json):", *A.summary_lines(r), sep="\n")
    for key in ("fd", "fd_real_floor", "kid", "precision", "recall", "density", "coverage", "dcr_ratio",
                "copy_fraction", "data_copying_z", "per_class"):  # fmt: skip
        assert key in r, key
    assert "from MLflow run" in result.stderr  # the classifier was trained once, then read back
    assert r["copy_fraction"] < 0.1 and r["data_copying_z"] > -3, r
    assert r["precision"] > 0.6 and r["recall"] > 0.6, r
    assert r["fd"] < 2 * r["fd_real_floor"], r  # near the floor
    assert r["headline"] == {"fidelity": "ok", "diversity": "ok", "memorization": "ok"}, r["verdicts"]
    assert list(r["per_class"]) == list(get_spec("mnist").class_names)
    assert all(
        entry["precision"] > 0.5 and entry["real"]["recall"] > 0.5 for entry in r["per_class"].values()
    )
    # which pass-1 kernel ran, chosen from this machine's CPU, and the machine itself
    assert r["search"]["pass1_kernels"] == [nb.kernel_here().name], r["search"]
    assert r["search"]["driver"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "searches: pass 1 in cpu/" in result.stderr


@pytest.mark.slow
def test_uniform_noise_is_far_from_real_data(audit_of):
    r, _ = audit_of("noise")
    assert r["fd"] > 10 * r["fd_real_floor"] and r["precision"] < 0.05, r
    assert r["headline"]["fidelity"] == "fail"


@pytest.mark.slow
def test_model_samples_land_between_and_are_recorded(audit_of, model_samples):
    import mlflow

    folder, model = model_samples
    r, lines = audit_of("model", folder)
    copies, noise = audit_of("copies")[0], audit_of("noise")[0]
    assert copies["fd"] < r["fd"] < noise["fd"], (copies["fd"], r["fd"], noise["fd"])
    assert noise["precision"] < r["precision"] and r["copy_fraction"] < copies["copy_fraction"]
    assert r["data_copying_z"] > copies["data_copying_z"]
    assert r["model_uri"] == model["uri"] and any("verdict: fidelity" in line for line in lines)

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(r["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["vaedist.evaluate"] == "audit"
    assert run.data.tags["vaedist.model_run_id"] == model["run_id"]
    assert run.data.tags["vaedist.audit.search_kernels"] == nb.kernel_here().name  # the kernel that ran
    assert (
        run.data.metrics["audit_fd"] == pytest.approx(r["fd"]) and "audit_class_9_recall" in run.data.metrics
    )
    pictures = [a.path for a in client.list_artifacts(r["run_id"], "images")]
    assert any("audit_nearest_copies" in p for p in pictures) and any(
        "audit_per_class" in p for p in pictures
    )
    on_model = client.get_run(model["run_id"]).data  # and on the generating model's run
    assert on_model.metrics["audit_copy_fraction"] == pytest.approx(r["copy_fraction"])
    assert on_model.tags["vaedist.eval.audit.run_id"] == r["run_id"]

    # A pipeline's rerun reads the finished audit back instead of recomputing it.
    from vaedist.evaluate import run_evaluate

    lines.clear()
    cfg = EvaluateConfig(generated=str(folder), dataset="mnist", classifier_epochs=1)
    again = run_evaluate(cfg, ResourcesConfig(workers=2), "audit", echo=lines.append, reuse=True)["audit"]
    assert again["run_id"] == r["run_id"] and again["fd"] == r["fd"] and "reusing it" in lines[0]


class _Pooled(torch.nn.Module):
    """A stand-in for a user's extractor (an Inception wrapper would resize and normalise here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, 4)
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_a_user_extractor_is_torch_export_or_torchscript(tmp_path):
    from vaedist.evaluate.features import custom_extractor, features_of

    images = np.random.default_rng(9).integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
    batch = torch.export.Dim("batch")
    program = torch.export.export(_Pooled(), (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "pooled.pt2")
    torch.jit.save(torch.jit.script(_Pooled()), tmp_path / "pooled.ts")
    exported, scripted = (
        custom_extractor(str(tmp_path / "pooled.pt2")),
        custom_extractor(str(tmp_path / "pooled.ts")),
    )
    assert (exported.kind, scripted.kind) == ("export", "torchscript") and exported.digest != scripted.digest
    want = _Pooled()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    for extractor in (exported, scripted):  # 300 images: batches of 128, 128 and 44
        np.testing.assert_allclose(features_of(extractor.build(), images), want, rtol=1e-5, atol=1e-6)
    (tmp_path / "junk.pt2").write_bytes(b"not a module")
    with pytest.raises(UsageError, match="is neither a torch.export program nor TorchScript"):
        custom_extractor(str(tmp_path / "junk.pt2"))
    with pytest.raises(UsageError, match="does not exist"):
        custom_extractor(str(tmp_path / "missing.pt2"))


@pytest.mark.slow
def test_the_feature_extractor_on_one_worker_trains_in_a_task(local_ray, module_store):
    """One worker: the extractor trains in one Ray task (no Ray Train run folder), and the weights it
    returns are the classifier it measured."""
    import io

    from vaedist.cluster import plan_workers
    from vaedist.evaluate import features
    from vaedist.evaluate.cas import CASClassifier
    from vaedist.models import to_model_input

    cfg = EvaluateConfig(dataset="mnist", classifier_epochs=1, seed=3)
    storage = module_store / "runs"
    blob, accuracy = features.train_extractor("extractor-one", "mnist", cfg, plan_workers(ResourcesConfig(workers=1)),
                                              str(storage))  # fmt: skip
    assert accuracy > 0.95  # the CAS CNN after one epoch on the 60,000 MNIST training images
    assert not (storage / "extractor-one").exists()

    saved = torch.load(io.BytesIO(blob), weights_only=True)
    net = CASClassifier(tuple(saved["image_shape"]), saved["num_classes"])
    net.load_state_dict(saved["state_dict"])
    x, y = load_split("mnist", "test")
    with torch.no_grad():
        pred = net.eval()(to_model_input(torch.from_numpy(np.array(x[:2000])))).argmax(1).numpy()
    assert abs(float((pred == y[:2000]).mean()) - accuracy) < 0.02
