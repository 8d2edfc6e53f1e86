"""The user's own images as datasets: image folders and Parquet tables (one written by Hugging Face
datasets itself), the shape rule, the cache, bad input; then (slow) the real CIFAR-10 JPEG folder, and a
conv CVAE trained on a folder and on a datasets-written Parquet, generating rows with the folder's names.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vaedist.config import check_dataset, experiment_from_dict
from vaedist.data import dataset_info, get_spec, load_split
from vaedist.data.custom import spec_for
from vaedist.errors import UsageError

pytestmark = pytest.mark.usefixtures("decoded_cache")  # conftest: a decoded-data cache of each test's own


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, classes=("cat", "ant", "bee"), per_class=20, size=(8, 8), mode="L", seed=0) -> dict:
    """ROOT/<class>/<i>.png with random pixels; {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (*size, 3) if mode == "RGB" else size
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
            written[f"{name}/{i:03d}.png"] = arr
    return written


def test_an_image_folder_is_a_dataset_with_sorted_classes_and_a_carved_test_split(tmp_path):
    written = _folder(tmp_path / "bugs")
    spec = get_spec(str(tmp_path / "bugs"))
    assert spec.name == "bugs" and spec.class_names == ("ant", "bee", "cat")  # sorted: the ImageFolder rule
    assert spec.image_shape == (8, 8, 1) and spec.format == "image-folder"
    assert (spec.train_size, spec.test_size) == (54, 6)  # a tenth carved for test
    x_tr, y_tr = load_split(spec.source, "train_full")
    x_te, y_te = load_split(spec.source, "test")
    x_val, _ = load_split(spec.source, "val")
    assert len(x_val) == 5 and len(load_split(spec.source, "train")[1]) == 49  # val: a tenth of train
    every = {arr.tobytes(): ("ant", "bee", "cat").index(rel.split("/")[0]) for rel, arr in written.items()}
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        assert [every[im[:, :, 0].tobytes()] for im in x] == y.tolist()  # each image with its folder's label
    assert spec.fingerprint == get_spec(str(tmp_path / "bugs")).fingerprint  # deterministic
    info = dataset_info(str(tmp_path / "bugs"))
    assert info["splits"]["test"]["class_counts"] == np.bincount(y_te, minlength=3).tolist()


def test_split_folders_are_kept_and_validation_joins_train(tmp_path):
    _folder(tmp_path / "s" / "train", per_class=5)
    _folder(tmp_path / "s" / "validation", per_class=2, seed=1)
    _folder(tmp_path / "s" / "test", classes=("ant", "cat"), per_class=3, seed=2)
    spec = get_spec(str(tmp_path / "s"))
    assert spec.class_names == ("ant", "bee", "cat") and (spec.train_size, spec.test_size) == (21, 6)
    assert sorted(set(load_split(spec.source, "test")[1].tolist())) == [0, 2]


def test_sizes_must_agree_unless_image_size_is_given(tmp_path):
    _folder(tmp_path / "m", classes=("a",), per_class=3, size=(10, 12))
    _folder(tmp_path / "m", classes=("b",), per_class=3, size=(20, 8), mode="RGB", seed=1)
    with pytest.raises(UsageError, match=r"images differ in size: a/000.png is 10x12, b/000.png is 20x8; pass --image-size"):
        get_spec(str(tmp_path / "m"))
    spec = get_spec(f"{tmp_path / 'm'}?image_size=16x16")
    assert spec.image_shape == (16, 16, 3)  # one colour image: all RGB
    grey = get_spec(f"{tmp_path / 'm'}?image_size=6&channels=1&name=mixed")
    assert grey.image_shape == (6, 6, 1) and grey.name == "mixed" and grey.fingerprint != spec.fingerprint


def test_the_shape_rule_covers_then_crops_the_centre():
    from vaedist.data.images import fit

    arr = np.zeros((10, 40), np.uint8)
    arr[:, 18:22] = 255  # a white band in the middle of a wide image
    out = fit(Image.fromarray(arr), (20, 20), None)
    assert out.shape == (20, 20, 1)  # 10x40 -> 20x80 (the short side covers 20), then columns 30..49
    assert out[:, 8:12].min() > 200 and out[:, :3].max() < 60 and out[:, -3:].max() < 60  # band at 6..13


def test_a_parquet_written_by_hugging_face_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y", "z"])})
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in arrays], "kind": [i % 3 for i in range(12)]}, features=features
    )
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    with pytest.raises(UsageError, match=r"has no 'image' column \(it has: img, kind\); pass --image-column"):
        get_spec(str(tmp_path / "hf.parquet"))
    spec = get_spec(f"{tmp_path / 'hf.parquet'}?image_column=img&label_column=kind&test_size=3")
    assert spec.name == "hf" and spec.class_names == ("x", "y", "z") and spec.image_shape == (8, 8, 3)
    x, y = load_split(spec.source, "train_full")
    tx, ty = load_split(spec.source, "test")
    got = {a.tobytes(): int(lab) for a, lab in zip(np.concatenate([x, tx]), np.concatenate([y, ty]), strict=True)}
    assert got == {a.tobytes(): i % 3 for i, a in enumerate(arrays)}


def test_string_labels_become_sorted_classes_and_bad_labels_are_refused(tmp_path):
    images = [_png(np.full((4, 4), v, np.uint8)) for v in range(6)]
    labels = ["dog", "cat", "dog", "eel", "cat", "dog"]
    pq.write_table(pa.table({"image": images, "label": labels}), tmp_path / "s.parquet")
    spec = get_spec(str(tmp_path / "s.parquet") + "?test_size=1")
    assert spec.class_names == ("cat", "dog", "eel")
    pq.write_table(pa.table({"image": images, "label": [0, 1, -1, 0, 1, 0]}), tmp_path / "neg.parquet")
    with pytest.raises(UsageError, match="label -1 is outside 0..1"):
        get_spec(str(tmp_path / "neg.parquet"))


def test_a_generated_folder_trains_like_any_table(tmp_path):
    from vaedist import generate as G

    plan = G.Plan("m", "", "0" * 64, "x", (0, 2), ("zero", "two"), (5, 5), 0, 1.0, 4, "png", (6, 6, 1), 2,
                  ("zero", "one", "two"))  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (10, 6, 6, 1), dtype=np.uint8)
    G.write_folder(str(tmp_path / "synth"), plan, images, G.latents(0, 0, 10, 2))
    spec = get_spec(str(tmp_path / "synth") + "?test_size=2")
    assert spec.class_names == ("zero", "one", "two") and spec.format == "parquet"  # the ClassLabel's names
    x, y = load_split(spec.source, "train_full")
    assert len(y) == 8 and set(y.tolist()) <= {0, 2}


def test_a_second_load_reads_the_cache_and_changed_files_are_decoded_again(tmp_path, decoded_cache):
    _folder(tmp_path / "c", per_class=4)
    first = get_spec(str(tmp_path / "c"))
    x1 = np.array(load_split(first.source, "train_full")[0])
    assert (decoded_cache / first.fingerprint / "meta.json").exists()
    victim = tmp_path / "c" / "bee" / "001.png"
    victim.write_bytes(b"\0" * victim.stat().st_size)  # unreadable, same size: the listing is unchanged
    spec_for.cache_clear()
    assert np.array_equal(load_split(get_spec(str(tmp_path / "c")).source, "train_full")[0], x1)  # not decoded
    victim.write_bytes(b"not a png")  # another size: decoded again, and refused
    spec_for.cache_clear()
    with pytest.raises(UsageError, match=r"c/bee/001.png is not a readable image .*pass --skip-bad-images"):
        get_spec(str(tmp_path / "c"))
    skipping = get_spec(str(tmp_path / "c") + "?skip_bad_images=true")
    assert skipping.train_size + skipping.test_size == 11


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty: put images in ROOT/<class>/"),
        ("no-images", "has no images (.png"),
        ("empty-class", "class folder"),
        ("no-label-column", "has no 'label' column (it has: image, y); pass --label-column"),
    ],
)
def test_bad_sources_are_one_line(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "empty":
        root.mkdir()
    elif layout == "no-images":
        root.mkdir()
        (root / "notes.txt").write_text("hi")
    elif layout == "empty-class":
        _folder(root, classes=("a",), per_class=2)
        (root / "b").mkdir()
    elif layout == "no-label-column":
        root.mkdir()
        pq.write_table(pa.table({"image": [_png(np.zeros((2, 2), np.uint8))], "y": [0]}), root / "t.parquet")
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_spec(str(root))


def test_model_checks_name_the_fix(tmp_path):
    _folder(tmp_path / "odd", classes=("a", "b"), per_class=3, size=(30, 30))
    base = {"data": {"dataset": str(tmp_path / "odd")}, "model": {"arch": "conv", "depth": 2}}
    with pytest.raises(UsageError, match=r"need an image side divisible by 4, but odd is 30x30 .*--image-size 32x32"):
        check_dataset(experiment_from_dict(base))  # built without reading the folder; the driver's check
    for name in ("x.png", "y.png"):
        shutil.copy(tmp_path / "odd" / "a" / "000.png", tmp_path / name)
    (tmp_path / "flat").mkdir()
    for name in ("x.png", "y.png"):
        shutil.move(tmp_path / name, tmp_path / "flat" / name)
    flat = {"data": {"dataset": str(tmp_path / "flat") + "?image_size=32&test_size=1"}, "model": {"variant": "cvae"}}
    with pytest.raises(UsageError, match="cvae needs labelled images, but flat has none"):
        check_dataset(experiment_from_dict(flat))
    vae = experiment_from_dict({**flat, "model": {"variant": "vae"}})
    check_dataset(vae)
    assert vae.data.dataset.startswith(str(tmp_path))


def test_a_relative_path_is_made_absolute_in_the_config(tmp_path, monkeypatch):
    _folder(tmp_path / "rel", classes=("a", "b"), per_class=5, size=(8, 8))
    monkeypatch.chdir(tmp_path)
    cfg = experiment_from_dict({"data": {"dataset": "./rel?name=mine"}, "model": {"arch": "dense"}})
    assert cfg.data.dataset == f"{tmp_path / 'rel'}?name=mine"
    from vaedist import tracking

    assert tracking.experiment_name(cfg.data.dataset) == "vaedist/mine"
    assert tracking.registered_model_name(cfg.data.dataset) == "vaedist-mine"
    assert os.path.isabs(get_spec(cfg.data.dataset).source.partition("?")[0])


# --------------------------------------------------------------------------------------------------
# Real CIFAR-10 content (../shared/data/cifar10-jpeg), real Ray, real MLflow


@pytest.fixture(scope="session")
def cifar_jpeg(data_dir) -> Path:
    path = data_dir / "cifar10-jpeg"
    if not (path / "train" / "cat").is_dir():
        pytest.fail(f"the CIFAR-10 JPEG folder is not at {path} (../shared/data/cifar10-jpeg in CI)", pytrace=False)
    return path


def _subset(src: Path, dst: Path, classes=("cat", "dog", "ship"), train=300, test=60) -> Path:
    for split, n in (("train", train), ("test", test)):
        for name in classes:
            (dst / split / name).mkdir(parents=True)
            for f in sorted((src / split / name).iterdir())[:n]:
                shutil.copy(f, dst / split / name / f.name)
    return dst


@pytest.mark.slow
def test_data_info_shows_the_cifar10_jpeg_folder(cifar_jpeg, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "VAEDIST_CACHE_DIR": str(tmp_path / "decoded")}
    out = subprocess.run([sys.executable, "-m", "vaedist", "data", "info", str(cifar_jpeg)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "cifar10-jpeg" in text and "train  45000 images 32x32x3" in text and "val     5000" in text
    assert "test   10000 images 32x32x3" in text and "50,000 training images (train + val)" in text
    assert "airplane=1000, automobile=1000, bird=1000, cat=1000" in text  # the test split, ImageFolder order
    assert "test split: given" in text


def _train_and_generate(dataset: str, tmp_path: Path, before_generate=lambda: None):
    from vaedist import generate as G
    from vaedist.config import GenerateConfig
    from vaedist.train import run_training

    cfg = experiment_from_dict({
        "data": {"dataset": dataset},
        "model": {"variant": "cvae", "arch": "conv", "base_channels": 8, "latent_dim": 8, "likelihood": "logistic"},
        "train": {"epochs": 1, "batch_size": 128}, "resources": {"workers": 1},
    })  # fmt: skip
    result = run_training(cfg, name="own", storage=str(tmp_path / "runs"), echo=lambda *_: None)
    before_generate()
    out = tmp_path / "synth"
    G.run_generate(GenerateConfig(model=result.model_uri, out=str(out), per_label=4), echo=lambda *_: None)
    return result, G.read_generated(str(out))


@pytest.mark.slow
def test_a_conv_cvae_trains_on_a_folder_and_generates_its_class_names(cifar_jpeg, local_ray, mlflow_store, tmp_path):
    folder = _subset(cifar_jpeg, tmp_path / "pets3")
    fingerprint = get_spec(str(folder)).fingerprint
    # the class names travel with the model: generation names its rows with the folder gone
    result, gen = _train_and_generate(str(folder), tmp_path, lambda: (shutil.rmtree(folder), spec_for.cache_clear()))
    assert result.model_uri.startswith("models:/vaedist-pets3/")
    run = mlflow_store.get_run(result.run_id)
    assert mlflow_store.get_experiment(run.info.experiment_id).name == "vaedist/pets3"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"pets3-train", "pets3-validation"}
    assert gen.label_names == {0: ["cat"], 1: ["dog"], 2: ["ship"]} and gen.images.shape[1:] == (32, 32, 3)
    # the data's fingerprint on the run's dataset inputs' source, the registered model and the manifest
    assert gen.manifest["dataset_fingerprint"] == fingerprint
    assert mlflow_store.get_model_version("vaedist-pets3", result.version).tags["dataset_fingerprint"] == fingerprint


@pytest.mark.slow
def test_a_conv_cvae_trains_on_a_parquet_written_by_datasets(cifar_jpeg, local_ray, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    folder = _subset(cifar_jpeg, tmp_path / "src", classes=("bird", "frog"), train=200, test=0)
    files = sorted((folder / "train").rglob("*.jpg"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["bird", "frog"])})
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files],
                                     "label": [0 if f.parent.name == "bird" else 1 for f in files]}, features=features)  # fmt: skip
    (tmp_path / "birds").mkdir()
    ds.to_parquet(str(tmp_path / "birds" / "train-00000-of-00001.parquet"))
    result, gen = _train_and_generate(str(tmp_path / "birds"), tmp_path)
    assert result.model_uri.startswith("models:/vaedist-birds/")
    assert gen.label_names == {0: ["bird"], 1: ["frog"]}


# --------------------------------------------------------------------------------------------------
# The CLI: flags become the dataset string; bad input is one line, exit 2


def test_cli_flags_shape_a_path_dataset_and_bad_input_is_one_line(tmp_path, cli_in_process):
    _folder(tmp_path / "pets", classes=("a", "b"), per_class=10, size=(12, 12))
    _folder(tmp_path / "mixed", classes=("a",), per_class=2, size=(5, 5))
    _folder(tmp_path / "mixed", classes=("b",), per_class=2, size=(6, 6), seed=1)
    out = cli_in_process(["train", "--dataset", "pets", "--image-size", "16", "--dataset-name", "my-pets", "--dry-run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"data.dataset = {tmp_path / 'pets'}?name=my-pets&image_size=16x16" in out.stdout
    out = cli_in_process(["run", "train-mnist", "--preset", "smoke", "--dataset", "./pets", "--dry-run"], cwd=tmp_path)
    assert out.returncode == 0 and f"dataset: {tmp_path / 'pets'}" in out.stdout, out.stderr
    out = cli_in_process(["data", "info", "pets", "--image-size", "8"], cwd=tmp_path)
    assert out.returncode == 0 and "train     17 images 8x8x1" in out.stdout and "test split: carved" in out.stdout, out.stderr
    for args, message in (
        (("train", "--dataset", "mnist", "--image-size", "16", "--dry-run"), "--image-size applies to a dataset given as a path"),
        (("train", "--dataset", "mixed", "--dry-run"), "images differ in size: a/000.png is 5x5, b/000.png is 6x6; pass --image-size"),
        (("train", "--dataset", "./nowhere", "--dry-run"), "does not exist"),
        (("train", "--dataset", "pets", "--image-size", "12x", "--dry-run"), "--image-size: expected N or HxW"),
        (("data", "info", "mixed"), "images differ in size"),
    ):
        out = cli_in_process(list(args), cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_evaluation_refuses_data_whose_fingerprint_changed_unless_allowed(tmp_path):
    from vaedist.checkpoint import dataset_facts, save_checkpoint
    from vaedist.config import ModelConfig
    from vaedist.evaluate.likelihood import load_for_likelihood
    from vaedist.models import build_model

    _folder(tmp_path / "f", classes=("a", "b"), per_class=6)
    dataset = str(tmp_path / "f")
    spec = get_spec(dataset)  # the facts training's set-up keeps in the checkpoint
    model = build_model(ModelConfig(variant="vae", arch="dense", width=8, latent_dim=2), (8, 8, 1), 2, "logistic")
    save_checkpoint(tmp_path / "model.pt", model, None, 1, {"data.dataset": dataset}, {},
                    dataset_facts(spec.name, spec.fingerprint, spec.class_names))  # fmt: skip
    assert load_for_likelihood(str(tmp_path / "model.pt"), None)[3] == dataset
    _folder(tmp_path / "f", classes=("b",), per_class=7, seed=5)  # one more image: other data
    spec_for.cache_clear()
    with pytest.raises(UsageError, match=r"was trained on data with fingerprint \w+, but f is now \w+ .*--allow-other-data"):
        load_for_likelihood(str(tmp_path / "model.pt"), None)
    assert load_for_likelihood(str(tmp_path / "model.pt"), None, allow_other_data=True)[3] == dataset


def test_a_table_mixing_encoded_images_and_tensors_keeps_every_row_in_order(tmp_path):
    """One file of PNG bytes, one of raw uint8 tensors: every row, in file order, with its label."""
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), rng.integers(0, 256, (3, 5, 5), dtype=np.uint8)
    (tmp_path / "mix").mkdir()
    pq.write_table(pa.table({"image": [_png(x) for x in a], "label": [0, 1, 0, 1]}), tmp_path / "mix" / "a.parquet")
    tensor = pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.uint8(), (5, 5, 1)), pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), 25)
    )
    pq.write_table(pa.table({"image": tensor, "label": [1, 0, 1]}), tmp_path / "mix" / "b.parquet")
    spec = get_spec(str(tmp_path / "mix") + "?test_size=1")
    x, y = load_split(spec.source, "train_full")
    tx, ty = load_split(spec.source, "test")
    rows = {im[:, :, 0].tobytes(): int(lab) for im, lab in zip(np.concatenate([x, tx]), np.concatenate([y, ty]), strict=True)}
    assert rows == {im.tobytes(): lab for im, lab in zip([*a, *b], [0, 1, 0, 1, 1, 0, 1], strict=True)}
