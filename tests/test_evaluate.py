"""vaedist.evaluate: the pure parts and the bad-input checks as unit tests (no Ray, no data), then for real
(slow): a small CVAE trained on real MNIST, local Ray, MLflow on a throwaway sqlite store.

The generated folders are written with the format module's own writer (``vaedist.generate.format``), the
same code ``vaedist generate`` writes them with, from images decoded here (no Ray Data).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vaedist import evaluate as ev
from vaedist.checkpoint import load_model, save_checkpoint
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError
from vaedist.generate.plan import Plan
from vaedist.generate.writer import write_folder
from vaedist.models import CVAE, AutoEncoder, binarize, to_model_input

MNIST = get_spec("mnist")
NUM_DIMS = 28 * 28


# ---------------------------------------------------------------------------------------- fixtures


def _quiet(*_args) -> None:
    pass


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
def registered(module_store, trained_cvae) -> dict[str, str]:
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


def generated_plan(
    labels=range(10),
    per_label: int = 2,
    *,
    dataset: str = "mnist",
    shape: tuple[int, int, int] = (28, 28, 1),
    image_format: str = "png",
    latent_dim: int = 2,
    shard_rows: int = 1000,
    class_names: tuple[str, ...] | None = None,
    model_uri: str = "models:/vaedist-mnist/1",
    model_version: str = "1",
) -> Plan:
    """The plan of a generated folder: ``per_label`` rows of each label (-1: an unconditional model)."""
    names = class_names or get_spec(dataset).class_names
    labels = tuple(labels)
    return Plan(model_uri, model_version, "0" * 64, dataset, labels, tuple(names[k] if k >= 0 else "" for k in labels),
                (per_label,) * len(labels), 0, 1.0, shard_rows, image_format, shape, latent_dim)  # fmt: skip


def plan_labels(plan: Plan) -> np.ndarray:
    """The label of every row, in sample-id order (int64 (N,))."""
    return np.asarray(plan.labels, dtype=np.int64)[plan.label_index(0, plan.total)]


def write_generated(
    folder: Path,
    plan: Plan,
    images: np.ndarray | None = None,
    *,
    z: np.ndarray | None = None,
    model: dict | None = None,
    manifest: bool = True,
) -> Path:
    """A generated folder as vaedist generate writes it (the format module's writer): images uint8 (N, H, W, C)
    in sample-id order (black by default), z float32 (N, L) (zeros by default); ``_manifest.json`` last."""
    images = np.zeros((plan.total, *plan.image_shape), np.uint8) if images is None else images
    z = np.zeros((plan.total, plan.latent_dim), np.float32) if z is None else z
    info = model or {"name": "vaedist-mnist", "run_id": ""}
    write_folder(str(folder), plan, images, z, model_info=info, manifest=manifest)
    return folder


@pytest.fixture(scope="module")
def generated(trained_cvae, registered, tmp_path_factory) -> Path:
    """150 images per label decoded by the trained CVAE from z ~ N(0, I), in two shards."""
    model, _ = load_model(trained_cvae)
    plan = generated_plan(per_label=150, latent_dim=model.latent_dim, model_uri=registered["uri"],
                          model_version=registered["version"])  # fmt: skip
    labels = plan_labels(plan)
    assert plan.num_shards == 2 and np.bincount(labels).tolist() == [150] * 10
    g = torch.Generator().manual_seed(1)
    z = torch.randn(len(labels), model.latent_dim, generator=g)
    with torch.no_grad():
        x = model.generate(z, torch.from_numpy(labels))  # (N, 1, 28, 28) in [0, 1]
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, 28, 28, 1)
    model_info = {"name": "vaedist-mnist", "run_id": registered["run_id"]}
    return write_generated(tmp_path_factory.mktemp("gen") / "mnist-small", plan, images, z=z.numpy(),
                           model=model_info)  # fmt: skip


@pytest.fixture(scope="module")
def untrained_cvae(tmp_path_factory) -> Path:
    """The trained CVAE's architecture as built: enough for every check made before scoring (no data)."""
    torch.manual_seed(0)
    model = CVAE(image_shape=(28, 28, 1), num_classes=10, likelihood="bernoulli", arch="dense",
                 latent_dim=8, width=256, depth=1)  # fmt: skip
    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    save_checkpoint(path, model.eval(), None, 0, {"data.dataset": "mnist", "model.variant": "cvae"}, {})
    return path


# ------------------------------------------------------------------------------------ likelihood


def test_binarization_is_fixed_by_the_seed_on_any_images():
    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    images[:, 0] = 0
    images[:, 1] = 255
    a = ev.prepare_test_images(images, binarized=True, seed=0)
    assert np.array_equal(a, ev.prepare_test_images(images, binarized=True, seed=0))
    assert not np.array_equal(a, ev.prepare_test_images(images, binarized=True, seed=1))
    assert a.dtype == np.uint8 and a.shape == images.shape and set(np.unique(a).tolist()) == {0, 255}
    assert not a[:, 0].any() and a[:, 1].all()
    assert abs(a.mean() / 255 - images.mean() / 255) < 0.02
    assert ev.prepare_test_images(images, binarized=False, seed=0) is images


@pytest.mark.slow
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


def test_metrics_and_their_mlflow_names():
    scores = {"neg_elbo": np.array([100.0, 110.0]), "recon": np.array([80.0, 86.0]), "kl": np.array([20.0, 24.0]),
              "iw_nll": np.array([95.0, 105.0])}  # fmt: skip
    m = ev.likelihood_metrics(scores, k=50, num_dims=784)
    assert m["test_neg_elbo"] == 105.0 and m["test_recon"] == 83.0 and m["test_kl"] == 22.0
    assert m["test_iw_nll_k50"] == 100.0 and m["test_iw_nll_k50_stderr"] == pytest.approx(5.0)
    assert m["test_bits_per_dim"] == pytest.approx(100.0 / (784 * math.log(2)))
    assert m["test_elbo_bits_per_dim"] == pytest.approx(105.0 / (784 * math.log(2)))
    assert set(ev.logged_names(m, "mnist", "mnist", 10000, 10000)) == set(m)
    assert "test_first500_iw_nll_k50" in ev.logged_names(m, "mnist", "mnist", 500, 10000)
    assert "test_fashion_mnist_neg_elbo" in ev.logged_names(m, "fashion-mnist", "mnist", 10000, 10000)


def test_a_request_is_checked_before_anything_loads():
    both = EvaluateConfig(model="m.pt", generated="out/gen")
    assert ev.check_request(both, "all", None) == ("likelihood", "cas")
    assert ev.check_request(both, "cas", 5) == ("cas",)
    for cfg, what, limit, match in [
        (both, "everything", None, "evaluate: what 'everything' is not one of likelihood, cas, all"),
        (EvaluateConfig(generated="g"), "all", None, "evaluate likelihood needs a model"),
        (EvaluateConfig(model="m.pt"), "cas", None, "evaluate cas needs a generated folder"),
        (both, "likelihood", 0, "evaluate: limit must be a positive number of test images, got 0"),
    ]:
        with pytest.raises(UsageError, match=match):
            ev.run_evaluate(cfg, ResourcesConfig(), what, echo=_quiet, limit=limit)


@pytest.mark.slow
def test_likelihood_on_ray_equals_the_unsplit_computation(local_ray, module_store, trained_cvae, registered):
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


def test_likelihood_refuses_an_autoencoder_and_a_wrong_dataset(tmp_path, untrained_cvae):
    trained_cvae = untrained_cvae  # the checks look at the architecture, not the weights
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
    plan = generated_plan(per_label=3, shard_rows=7, image_format="raw")
    labels = plan_labels(plan)
    assert np.bincount(labels).tolist() == [3] * 10
    raw = ev.read_generated(str(write_generated(tmp_path / "raw", plan, images)))
    png_plan = generated_plan(per_label=3, image_format="png")
    png = ev.read_generated(str(write_generated(tmp_path / "png", png_plan, images)))
    assert (raw.image_format, png.image_format) == ("raw", "png")
    assert np.array_equal(raw.images, images) and np.array_equal(png.images, images)
    assert np.array_equal(raw.labels, labels) and raw.labels.dtype == np.int64
    assert raw.dataset == "mnist" and raw.model_uri == "models:/vaedist-mnist/1" and raw.model_version == "1"
    assert ev.check_generated(raw, None) == "mnist"


@pytest.mark.slow
def test_cas_of_a_small_generated_set(local_ray, module_store, generated, registered):
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
    # Ray Train keeps rank 0's result where a one-worker task keeps its own: either path reads the other's
    assert len(list((module_store / "runs").glob("cas-*/classifier/classifier.json"))) >= 2

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
    (dataset,) = run.inputs.dataset_inputs  # the generated set is the evaluation's input
    assert dataset.dataset.name == f"generated/{generated.name}"
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "evaluation")]
    card = (generated / "README.md").read_text()  # the dataset card shows the figures
    assert f"MLflow run `{out['run_id']}`" in card and f"| CAS / real | {out['ratio']:.3f} |" in card


@pytest.mark.slow
def test_cas_on_one_worker_runs_as_a_task_and_keeps_its_result(local_ray, module_store, generated, registered):
    """One worker: each classifier is one Ray task (no Ray Train run: its folder holds only the kept
    result); a rerun of the same budget reads the kept results back and trains nothing."""
    cfg = EvaluateConfig(generated=str(generated), dataset="mnist", classifier_epochs=2,
                         classifier_batch_size=64, seed=1)  # fmt: skip
    lines: list[str] = []
    out = ev.run_evaluate(cfg, ResourcesConfig(workers=1), "cas", echo=lines.append)["cas"]
    assert out["cas"] > 0.5 and out["real_accuracy"] > 0.75, out
    cm = np.array(out["confusion"])
    assert cm.sum() == 10000 and np.trace(cm) / 10000 == pytest.approx(out["cas"])

    runs = module_store / "runs"
    folders = sorted(p for p in runs.iterdir() if p.name.startswith("cas-") and "-" in p.name)
    kept = {}
    for folder in folders:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if files == ["classifier/classifier.json"]:  # this test's runs (the 2-worker test's are Ray Train's)
            kept[folder.name] = (folder / files[0]).stat().st_mtime_ns
    assert len(kept) == 2, (folders, kept)  # on generated images, and the ceiling on real ones

    again = ev.run_evaluate(cfg, ResourcesConfig(workers=1), "cas", echo=lines.append)["cas"]
    assert again["cas"] == out["cas"] and again["real_accuracy"] == out["real_accuracy"]
    for name, mtime in kept.items():  # reuse=False evaluates again, but trains nothing: results untouched
        assert (runs / name / "classifier" / "classifier.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------- bad input


def _bad_folder(kind: str, root: Path) -> Path:
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if kind == "no-manifest":
        return write_generated(root / "partial", generated_plan(), manifest=False)
    if kind == "missing-shard":
        folder = write_generated(root / "lost", generated_plan(shard_rows=5))
        (folder / "data/train-00001-of-00004.parquet").unlink()
        return folder
    if kind == "shape":
        return write_generated(root / "small", generated_plan(shape=(14, 14, 1)))
    if kind == "labels":
        return write_generated(root / "half", generated_plan(labels=range(5)))
    if kind == "unconditional":
        return write_generated(root / "vae", generated_plan(labels=[-1], per_label=10))
    if kind == "names":
        return write_generated(
            root / "fashion", generated_plan(class_names=get_spec("fashion-mnist").class_names)
        )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is empty: no _manifest.json and no shard files (data/train-NNNNN-of-NNNNN.parquet)"),
        ("no-manifest", "is incomplete: 1 shard(s) but no _manifest.json"),
        ("missing-shard", "is incomplete: _manifest.json lists data/train-00001-of-00004.parquet but the file is missing"),
        ("shape", "are 14x14x1 but mnist images are 28x28x1"),
        ("labels", "has no images of class(es) 5, 6, 7, 8, 9: CAS needs every mnist class"),
        ("unconditional", "holds unlabelled images (label -1: an unconditional model)"),
        ("names", "generated label 0 in"),
    ],
)
def test_cli_cas_bad_generated_data_is_one_line(kind, message, tmp_path, cli_in_process):
    folder = _bad_folder(kind, tmp_path)
    proc = cli_in_process(["evaluate", "cas", "--generated", str(folder), "--dataset", "mnist"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was recorded


def test_cli_likelihood_bad_input_is_one_line(tmp_path, untrained_cvae, cli_in_process):
    trained_cvae = untrained_cvae  # every case is refused before the weights matter
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
        proc = cli_in_process(["evaluate", "likelihood", *args], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_cas_reads_another_generators_labelled_table(tmp_path):
    """A Parquet table with a Hugging Face Image struct and integer labels, not written by vaedist."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaedist.generate.png import encode_pngs

    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    image = pa.StructArray.from_arrays([pa.array(encode_pngs(images), pa.binary()), pa.nulls(40, pa.string())],
                                       names=["bytes", "path"])  # fmt: skip
    pq.write_table(pa.table({"image": image, "label": np.arange(40) % 10}), tmp_path / "other.parquet")
    cfg = EvaluateConfig(generated=str(tmp_path / "other.parquet"), dataset="mnist", classifier_batch_size=16)
    gen, dataset = ev.cas.read_checked(cfg)
    assert dataset == "mnist" and np.array_equal(gen.images, images) and np.bincount(gen.labels).tolist() == [4] * 10
    with pytest.raises(UsageError, match="does not say which dataset it imitates: pass --dataset"):
        ev.cas.read_checked(EvaluateConfig(generated=str(tmp_path / "other.parquet"), classifier_batch_size=16))
