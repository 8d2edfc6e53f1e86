"""vaedist.evaluate for real: a small CVAE trained on real MNIST, local Ray, MLflow on a throwaway sqlite store.

The generated folders are written here in the exact contract of DESIGN.md ("Generated Parquet") with plain
pyarrow, so CAS is tested independently of vaedist.generate.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vaedist import evaluate as ev
from vaedist.checkpoint import load_model, save_checkpoint
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError
from vaedist.models import CVAE, AutoEncoder, binarize, to_model_input

MNIST = get_spec("mnist")
NUM_DIMS = 28 * 28


# ---------------------------------------------------------------------------------------- fixtures


def _quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store and one Ray storage folder for the module (env read at call time); the cwd
    moves there too, since a sqlite store keeps artifacts in ./mlruns."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("VAEDIST_STORAGE_PATH", str(root / "runs"))
        mp.chdir(root)
        yield root


@pytest.fixture(scope="module")
def trained_cvae(tmp_path_factory) -> Path:
    """A dense CVAE trained 300 steps on dynamically binarized real MNIST with plain torch (~3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine has 2 CPUs shared with Ray workers: avoid oversubscription
    try:
        torch.manual_seed(0)
        images, labels = load_split("mnist", "train")
        model = CVAE(image_shape=(28, 28, 1), num_classes=10, likelihood="bernoulli", arch="dense",
                     latent_dim=8, width=256, depth=1)  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = rng.integers(0, len(labels), 128)
            x = binarize(to_model_input(torch.from_numpy(images[idx])), generator=g)
            out = model.loss(x, torch.from_numpy(labels[idx]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("cvae") / "model.pt"
    save_checkpoint(path, model.eval(), optimizer, 1, {"data.dataset": "mnist", "model.variant": "cvae"}, {})
    return path


@pytest.fixture(scope="module")
def registered(store, trained_cvae) -> dict[str, str]:
    """The trained CVAE as training leaves it: a run with the checkpoint, registered as vaedist-mnist v1."""
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("vaedist/mnist")
    run = client.create_run(exp, run_name="small-cvae")
    client.log_artifact(run.info.run_id, str(trained_cvae), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("vaedist-mnist")
    mv = client.create_model_version(
        "vaedist-mnist", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    return {
        "uri": f"models:/vaedist-mnist/{mv.version}",
        "version": str(mv.version),
        "run_id": run.info.run_id,
    }


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False
    )  # never join a cluster already running here
    yield
    ray.shutdown()


def write_generated(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str = "mnist",
    image_format: str = "raw",
    z: np.ndarray | None = None,
    model: dict | None = None,
    shard_rows: int = 1000,
    manifest: bool = True,
    class_names: tuple[str, ...] | None = None,
) -> Path:
    """A generated folder as vaedist.generate writes it (DESIGN.md "Generated Parquet"): part-NNNNN.parquet
    shards with ``vaedist.``-prefixed key-value metadata, then ``_manifest.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    names = class_names or get_spec(dataset).class_names
    model = model or {"uri": "models:/vaedist-mnist/1", "version": "1", "name": "vaedist-mnist", "run_id": ""}
    z = np.zeros((len(labels), 2), np.float32) if z is None else z
    h, w, c = images.shape[1:]
    meta = {"model_uri": model["uri"], "model_version": model["version"], "dataset": dataset, "seed": "0",
            "version": "0.1.0", "image_format": image_format, "image_shape": f"{h},{w},{c}"}  # fmt: skip
    image_type = pa.fixed_shape_tensor(pa.uint8(), (h, w, c)) if image_format == "raw" else pa.binary()
    schema = pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("label", pa.int16(), nullable=False),
            pa.field("label_name", pa.string(), nullable=False),
            pa.field("image", image_type, nullable=False),
            pa.field("z", pa.list_(pa.float32(), z.shape[1]), nullable=False),
        ],
        metadata={"vaedist." + k: v for k, v in meta.items()},
    )
    shards = []
    for shard, start in enumerate(range(0, len(labels), shard_rows)):
        rows = slice(start, start + shard_rows)
        if image_format == "png":
            from PIL import Image

            image_col = []
            for img in images[rows]:
                buf = io.BytesIO()
                Image.fromarray(img[..., 0] if c == 1 else img).save(buf, format="PNG")
                image_col.append(buf.getvalue())
            image_col = pa.array(image_col, pa.binary())
        else:
            # A fresh copy: a permuted view with a size-1 axis would give pyarrow a permuted tensor type.
            image_col = pa.FixedShapeTensorArray.from_numpy_ndarray(images[rows].copy())
        columns = [
            pa.array(np.arange(len(labels))[rows], pa.int64()),
            pa.array(labels[rows], pa.int16()),
            pa.array([names[v] if v >= 0 else "" for v in labels[rows]], pa.string()),
            image_col,
            pa.FixedSizeListArray.from_arrays(pa.array(z[rows].ravel(), pa.float32()), z.shape[1]),
        ]
        name = f"part-{shard:05d}.parquet"
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), folder / name)
        data = (folder / name).read_bytes()
        shards.append({"file": name, "shard": shard, "rows": len(labels[rows]), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    if manifest:
        counts = np.bincount(labels[labels >= 0], minlength=len(names))
        (folder / "_manifest.json").write_text(json.dumps({
            "format": "vaedist-generated/1", "vaedist_version": "0.1.0", "model": model, "dataset": dataset,
            "seed": 0, "image_format": image_format, "image_shape": [h, w, c], "latent_dim": z.shape[1],
            "rows": int(len(labels)),
            "rows_per_label": [{"label": i, "name": names[i], "rows": int(n)} for i, n in enumerate(counts) if n],
            "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
            "schema_metadata": {k.decode(): v.decode() for k, v in schema.metadata.items()},
            "shards": shards,
        }))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def generated(trained_cvae, registered, tmp_path_factory) -> Path:
    """150 images per label decoded by the trained CVAE from z ~ N(0, I), in two shards."""
    model, _ = load_model(trained_cvae)
    g = torch.Generator().manual_seed(1)
    labels = np.repeat(np.arange(10), 150)
    z = torch.randn(len(labels), model.latent_dim, generator=g)
    with torch.no_grad():
        x = model.generate(z, torch.from_numpy(labels))  # (N, 1, 28, 28) in [0, 1]
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    model_info = {"uri": registered["uri"], "version": registered["version"], "name": "vaedist-mnist",
                  "run_id": registered["run_id"]}  # fmt: skip
    return write_generated(tmp_path_factory.mktemp("gen") / "mnist-small", images, labels, z=z.numpy(),
                           model=model_info)  # fmt: skip


# ------------------------------------------------------------------------------------ likelihood


def test_binarization_is_fixed_by_the_seed():
    images, _ = load_split("mnist", "test")
    a = ev.prepare_test_images(images[:500], binarized=True, seed=0)
    b = ev.prepare_test_images(images[:500], binarized=True, seed=0)
    c = ev.prepare_test_images(images[:500], binarized=True, seed=1)
    assert a.dtype == np.uint8 and a.shape == (500, 28, 28, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(a).tolist()) == {0, 255}
    # Black stays black, white stays white; in between the draw follows the intensity.
    assert not a[images[:500] == 0].any() and a[images[:500] == 255].all()
    assert abs(a.mean() / 255 - images[:500].mean() / 255) < 0.01
    eight_bit = ev.prepare_test_images(images[:5], binarized=False, seed=0)
    assert np.array_equal(eight_bit, images[:5])  # other likelihoods see the images as stored


def test_shards_are_contiguous_and_batch_aligned():
    assert ev.batch_aligned_shards(1000, 100, 3) == [(0, 400), (400, 700), (700, 1000)]
    assert ev.batch_aligned_shards(250, 100, 2) == [(0, 200), (200, 250)]
    assert ev.batch_aligned_shards(50, 100, 4) == [(0, 50)]


@pytest.mark.slow
def test_likelihood_on_ray_equals_the_unsplit_computation(local_ray, store, trained_cvae, registered):
    n, k = 300, 50
    cfg = EvaluateConfig(model=registered["uri"], k=k, k_batch=25, batch_size=50, seed=0)
    lines: list[str] = []
    out = ev.run_evaluate(cfg, ResourcesConfig(workers=2), "likelihood", echo=lines.append, limit=n)
    split = out["likelihood"]
    m = split["metrics"]
    iw_key = f"test_iw_nll_k{k}"
    assert split["images"] == n and split["dataset"] == "mnist" and split["conditional"]
    assert any("label-conditioned" in line for line in lines)
    assert any("binarized with seed 0" in line for line in lines)

    # The IW bound is tighter than the ELBO, and both are in a sane range for a briefly trained model.
    assert m[iw_key] <= m["test_neg_elbo"]
    assert 80 < m[iw_key] < 200
    assert m["test_neg_elbo"] == pytest.approx(m["test_recon"] + m["test_kl"], rel=1e-6)
    # bits/dim = nats / (D ln 2)
    bits = NUM_DIMS * math.log(2)
    assert m["test_bits_per_dim"] == pytest.approx(m[iw_key] / bits, rel=1e-12)
    assert m["test_elbo_bits_per_dim"] == pytest.approx(m["test_neg_elbo"] / bits, rel=1e-12)

    # One process, no Ray, the whole range at once: the same numbers (shards are batch-aligned and
    # every batch's draws are seeded by its first row).
    model, _ = load_model(trained_cvae)
    images, labels = load_split("mnist", "test")
    prepared = ev.prepare_test_images(images, binarized=True, seed=0)
    direct = ev.score_images(model, prepared, labels, 0, n, k=k, k_batch=25, batch_size=50, seed=0)
    assert direct["iw_nll"].mean() == pytest.approx(m[iw_key], abs=1e-4)
    assert direct["neg_elbo"].mean() == pytest.approx(m["test_neg_elbo"], abs=1e-4)

    # An independent estimate with the model's own iw_nll and other draws agrees statistically.
    x = to_model_input(torch.from_numpy(prepared[:n]))
    y = torch.from_numpy(np.array(labels[:n]))
    other = model.iw_nll(x, y, k=k, chunk=50, generator=torch.Generator().manual_seed(123))
    assert float(other.mean()) == pytest.approx(m[iw_key], abs=0.5)

    # A checkpoint path on one worker: identical numbers again, printed but not logged.
    lines.clear()
    path_cfg = EvaluateConfig(model=str(trained_cvae), k=k, k_batch=25, batch_size=50, seed=0)
    single = ev.run_evaluate(path_cfg, ResourcesConfig(workers=1), "likelihood", echo=lines.append, limit=n)
    single = single["likelihood"]
    assert single["run_id"] is None and any("not logged" in line for line in lines)
    for key, value in m.items():
        assert single["metrics"][key] == pytest.approx(value, abs=1e-4), key

    # Logged on the model's run, found through the registry.
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert split["run_id"] == registered["run_id"]
    logged = client.get_run(registered["run_id"]).data
    for key in ("neg_elbo", f"iw_nll_k{k}", "bits_per_dim", "kl", "recon"):  # named for the 300-image subset
        assert logged.metrics[f"test_first{n}_{key}"] == pytest.approx(m[f"test_{key}"]), key
    assert not any(key.startswith("test_neg") for key in logged.metrics)
    assert "binarized" in logged.tags["vaedist.eval.likelihood.mnist.protocol"]
    assert "label-conditioned" in logged.tags["vaedist.eval.likelihood.mnist.conditioning"]


def test_likelihood_refuses_an_autoencoder_and_a_wrong_dataset(tmp_path, trained_cvae):
    ae = AutoEncoder(
        image_shape=(28, 28, 1), num_classes=10, likelihood="bernoulli", arch="dense", width=32, depth=1
    )
    save_checkpoint(tmp_path / "ae.pt", ae, None, 0, {"data.dataset": "mnist"}, {})
    with pytest.raises(
        UsageError, match=r"plain autoencoder \(variant 'ae'\): it has no posterior and no likelihood"
    ):
        ev.load_for_likelihood(str(tmp_path / "ae.pt"), None)
    with pytest.raises(UsageError, match=r"takes 28x28x1 images but cifar10 images are 32x32x3"):
        ev.load_for_likelihood(str(trained_cvae), "cifar10")


# ------------------------------------------------------------------------------------------- CAS


def test_generated_folder_reads_the_same_in_both_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 3)
    raw = ev.read_generated(str(write_generated(tmp_path / "raw", images, labels, shard_rows=7)))
    png = ev.read_generated(str(write_generated(tmp_path / "png", images, labels, image_format="png")))
    assert (raw.image_format, png.image_format) == ("raw", "png")
    assert np.array_equal(raw.images, images) and np.array_equal(png.images, images)
    assert np.array_equal(raw.labels, labels) and raw.labels.dtype == np.int64
    assert raw.dataset == "mnist" and raw.model_uri == "models:/vaedist-mnist/1" and raw.model_version == "1"
    assert ev.check_generated(raw, None) == "mnist"


@pytest.mark.slow
def test_cas_of_a_small_generated_set(local_ray, store, generated, registered):
    import mlflow

    cfg = EvaluateConfig(generated=str(generated), dataset="mnist", classifier_epochs=2,
                         classifier_batch_size=64, seed=0)  # fmt: skip
    lines: list[str] = []
    out = ev.run_evaluate(cfg, ResourcesConfig(workers=2), "cas", echo=lines.append)["cas"]

    assert (
        out["generated_images"] == 1500 and out["real_train_images"] == 1500 and out["test_images"] == 10000
    )
    assert out["cas"] > 0.5, out  # chance is 0.1
    assert out["real_accuracy"] > 0.75 and out["real_accuracy"] > out["cas"] - 0.05, out
    assert out["ratio"] == pytest.approx(out["cas"] / out["real_accuracy"])
    assert list(out["per_class"]) == list(MNIST.class_names) and all(
        0 <= v <= 1 for v in out["per_class"].values()
    )
    cm = np.array(out["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == 10000 and np.trace(cm) / 10000 == pytest.approx(out["cas"])
    assert any("CAS" in line for line in lines)

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(out["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "vaedist/mnist"
    assert run.info.status == "FINISHED" and run.data.tags["vaedist.kind"] == "evaluate"
    assert run.data.tags["vaedist.model_uri"] == registered["uri"]
    assert run.data.tags["vaedist.model_version"] == registered["version"]
    assert run.data.tags["vaedist.model_run_id"] == registered["run_id"]
    assert run.data.metrics["cas"] == pytest.approx(out["cas"])
    assert run.data.metrics["cas_real_accuracy"] == pytest.approx(out["real_accuracy"])
    assert run.data.metrics["cas_ratio"] == pytest.approx(out["ratio"])
    assert sorted(k for k in run.data.metrics if k.startswith("cas_class_")) == sorted(
        f"cas_class_{i}" for i in range(10)
    )
    images = [a.path for a in client.list_artifacts(out["run_id"], "images")]
    assert any(p.startswith("images/cas_confusion_matrix") for p in images), images
    assert any(a.path == "evaluation/cas.json" for a in client.list_artifacts(out["run_id"], "evaluation"))


# ------------------------------------------------------------------------------------- bad input


def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vaedist", "evaluate", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)  # fmt: skip


def _digits(n_per_label=2, labels=range(10), shape=(28, 28, 1)):
    labels = np.repeat(np.array(list(labels)), n_per_label)
    return np.zeros((len(labels), *shape), np.uint8), labels


def _bad_folder(kind: str, root: Path) -> Path:
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if kind == "no-manifest":
        return write_generated(root / "partial", *_digits(), manifest=False)
    if kind == "missing-shard":
        folder = write_generated(root / "lost", *_digits(), shard_rows=5)
        (folder / "part-00001.parquet").unlink()
        return folder
    if kind == "shape":
        return write_generated(root / "small", *_digits(shape=(14, 14, 1)))
    if kind == "labels":
        return write_generated(root / "half", *_digits(labels=range(5)))
    if kind == "unconditional":
        return write_generated(root / "vae", np.zeros((10, 28, 28, 1), np.uint8), np.full(10, -1))
    if kind == "names":
        return write_generated(
            root / "fashion", *_digits(), class_names=get_spec("fashion-mnist").class_names
        )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is empty: no _manifest.json and no part-NNNNN.parquet files"),
        ("no-manifest", "is incomplete: 1 shard(s) but no _manifest.json"),
        ("missing-shard", "is incomplete: _manifest.json lists part-00001.parquet but the file is missing"),
        ("shape", "are 14x14x1 but mnist images are 28x28x1"),
        ("labels", "has no images of class(es) 5, 6, 7, 8, 9: CAS needs every mnist class"),
        ("unconditional", "holds unlabelled images (label -1: an unconditional model)"),
        ("names", "generated label 0 in"),
    ],
)
def test_cli_cas_bad_generated_data_is_one_line(kind, message, tmp_path):
    folder = _bad_folder(kind, tmp_path)
    proc = _cli(["cas", "--generated", str(folder), "--dataset", "mnist"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was recorded


def test_cli_likelihood_bad_input_is_one_line(tmp_path, trained_cvae):
    ae = AutoEncoder(
        image_shape=(28, 28, 1), num_classes=10, likelihood="bernoulli", arch="dense", width=32, depth=1
    )
    save_checkpoint(tmp_path / "ae.pt", ae, None, 0, {"data.dataset": "mnist"}, {})
    cases = [
        (["--model", str(trained_cvae), "--k", "0"], "error: evaluate.k: must be an integer >= 1, got 0"),
        (["--model", str(trained_cvae), "--k", "-5"], "error: evaluate.k: must be an integer >= 1, got -5"),
        (["--model", str(tmp_path / "ae.pt")], "plain autoencoder (variant 'ae')"),
    ]
    for args, message in cases:
        proc = _cli(["likelihood", *args], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
