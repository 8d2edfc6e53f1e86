"""Datasets beyond memory (issue 12, item 5): the decision to stream, a path dataset's facts and small splits
from its listing alone (the same rows, pixels and fingerprint as the in-memory path), and (slow) the Ray
Data stream on real CIFAR-10 JPEGs and a Parquet written by Hugging Face datasets: the same rows as the
in-memory train split, another order each epoch, full batches, equal shards, and Ray Train's dataset shard.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vaedist import streaming
from vaedist.data import get_spec, listed, load_split
from vaedist.data.registry import DATASETS
from vaedist.errors import UsageError

pytestmark = pytest.mark.usefixtures("decoded_cache")  # conftest: a decoded-data cache of each test's own


def _folder(root: Path, classes=("cat", "ant", "bee"), per_class=20, size=(8, 8), mode="L", seed=0) -> None:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")


def _same_as_in_memory(dataset: str) -> None:
    """Listed spec == decoded spec; every split decoded alone == the in-memory split, row for row."""
    spec = listed.listed_spec(dataset)  # first: from the listing (nothing in the cache yet)
    assert spec == get_spec(dataset)  # shape, classes, sizes, fingerprint
    for split in ("train", "val", "test", "train_full"):
        x, y = load_split(dataset, split)
        lx, ly = listed.decode_split(dataset, split, 5000)
        assert np.array_equal(lx, x) and np.array_equal(ly, y), split  # same rows, same order, same pixels


# --------------------------------------------------------------------------------------------------
# The decision (pure)


def test_the_budget_is_half_the_object_store_unless_given():
    assert streaming.budget_bytes(None, 8 * 10**9) == 4 * 10**9
    assert streaming.budget_bytes("1MB", 8 * 10**9) == 10**6 and streaming.budget_bytes("2GiB", 0) == 2 * 2**30
    assert streaming.budget_bytes(None, 0) == 0  # no object store known: no budget


def test_the_estimate_is_the_decoded_train_split_and_built_in_datasets_never_stream():
    assert streaming.estimated_train_bytes(DATASETS["mnist"]) == 60000 * (28 * 28 + 8)
    for name in DATASETS:
        assert not streaming.streams(name, "1B", 10**12)  # official files, tens of MB: always in memory


def test_a_dataset_is_decoded_whole_only_where_it_fits_and_decoding_keeps_a_cpu_where_it_can():
    """One rule (data.spec.decode_whole) for the spec lookup and the trainer: whole when the decoded train
    split fits the budget; the spec lookup's budget is that of a local Ray on this machine."""
    from vaedist.data import spec
    from vaedist.train import decode_cpus

    assert spec.decode_whole(10**6, 10**6) and not spec.decode_whole(10**6 + 1, 10**6)
    assert spec.decode_whole(10**12, 0)  # no budget known (memory unknown): as before, decoded
    assert streaming.decode_whole is spec.decode_whole  # the trainer asks the same function
    assert spec.budget_bytes(None, spec.local_object_store_bytes()) == int(spec.memory_bytes() * 0.3) // 2
    assert decode_cpus(2, 1) == 1.0 and decode_cpus(2, 2) == 0.0 and decode_cpus(16, 14.5) == 1.0


def test_a_folder_too_large_for_memory_gets_its_spec_from_the_listing(tmp_path, monkeypatch):
    """get_spec of a dataset over the budget of a local Ray (half its object store) decodes one image, not
    the folder; the trainer would stream it by the same rule."""
    from vaedist.data import spec as data_spec

    _folder(tmp_path / "big", per_class=5)
    monkeypatch.setattr(data_spec, "memory_bytes", lambda: 40)  # a machine with 40 bytes of memory
    assert streaming.streams(str(tmp_path / "big"), None, data_spec.local_object_store_bytes())
    spec = get_spec(str(tmp_path / "big"))
    assert spec.image_shape == (8, 8, 1) and spec.train_size > 0 and spec.class_names == ("ant", "bee", "cat")
    cache = tmp_path / "decoded"
    assert not cache.exists() or not any(cache.iterdir())  # nothing decoded into the cache


def test_blocks_and_steps():
    assert streaming.block_rows((32, 32, 3), 45000) == 704  # 64 blocks of 32x32 RGB
    assert streaming.block_rows((32, 32, 3), 10**7) == 1024 and streaming.block_rows((256, 256, 3), 10**7) == 42
    assert streaming.block_rows((8, 8, 1), 100) == 32
    assert streaming.steps_per_epoch(1000, 3, 64) == 5  # 333 rows each (equal split), 5 full batches


# --------------------------------------------------------------------------------------------------
# Facts and small splits from the listing (no Ray)


def test_a_folders_facts_come_from_its_listing_and_its_first_image(tmp_path, monkeypatch):
    from vaedist.data import images

    _folder(tmp_path / "bugs", mode="RGB")
    decoded = []
    real = images._decode_one
    monkeypatch.setattr(images, "_decode_one", lambda source, *a: decoded.append(source) or real(source, *a))
    spec = listed.listed_spec(str(tmp_path / "bugs"))
    assert len(decoded) == 1 and spec.image_shape == (8, 8, 3)  # one image read: its shape
    assert spec.class_names == ("ant", "bee", "cat") and (spec.train_size, spec.test_size) == (54, 6)
    x, _ = listed.decode_split(spec.source, "val", 5000)
    assert len(x) == 5 and len(decoded) == 1 + 5  # the validation rows alone, not the 49 others
    assert len(listed.split_items(spec.source, "train", 5000)) == 49
    _same_as_in_memory(str(tmp_path / "bugs"))


def test_options_shape_the_stream_as_they_shape_the_arrays(tmp_path):
    _folder(tmp_path / "m", classes=("a",), per_class=6, size=(10, 12))
    _folder(tmp_path / "m", classes=("b",), per_class=6, size=(20, 8), mode="RGB", seed=1)
    with pytest.raises(UsageError, match=r"images differ in size: .*m/b/\d+.png is 20x8, the dataset's first image 10x12"):
        listed.decode_split(str(tmp_path / "m"), "train_full", 5000)
    _same_as_in_memory(f"{tmp_path / 'm'}?image_size=16x16&channels=3&test_size=2")  # greyscale given 3 channels
    _same_as_in_memory(f"{tmp_path / 'm'}?image_size=6&channels=1&test_size=2")


def test_a_table_in_row_groups_with_string_labels_and_tensors(tmp_path):
    """Two files, small row groups, encoded images and stored tensors: the listed order is the decoded one."""
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), rng.integers(0, 256, (30, 6, 6, 1), dtype=np.uint8)
    (tmp_path / "t").mkdir()
    pngs = []
    for arr in a:
        Image.fromarray(arr).save(tmp_path / "x.png")
        pngs.append((tmp_path / "x.png").read_bytes())
    pq.write_table(pa.table({"image": pngs, "label": ["dog", "cat", "eel", "dog"] * 10}),
                   tmp_path / "t" / "a.parquet", row_group_size=7)  # fmt: skip
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), (6, 6, 1)),
                                            pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), 36))  # fmt: skip
    pq.write_table(pa.table({"image": tensor, "label": ["cat", "eel"] * 15}), tmp_path / "t" / "b.parquet", row_group_size=8)
    dataset = f"{tmp_path / 't'}?test_size=10"
    _same_as_in_memory(dataset)
    items = listed.split_items(dataset, "train", 5000)
    blocks = listed.blocks(items, 5)
    assert sum(map(len, blocks)) == len(items) and max(map(len, blocks)) <= 5
    assert all(len(set(b.column("part").to_pylist())) == 1 for b in blocks)  # one row group read per block
    decoded = [listed.decode_items(dataset, "parquet", blk, (6, 6, 1)) for blk in blocks]
    assert np.array_equal(np.concatenate([d.images for d in decoded]), load_split(dataset, "train")[0])


def test_a_bad_image_is_refused_in_one_line_or_skipped_and_counted(tmp_path):
    _folder(tmp_path / "c", per_class=10)
    (tmp_path / "c" / "ant" / "000.png").write_bytes(b"not a png")  # the first listed image
    items = listed.source(str(tmp_path / "c")).train  # every listed image, none carved away
    with pytest.raises(UsageError, match=r"c/ant/000.png is not a readable image .*pass --skip-bad-images"):
        listed.decode_items(str(tmp_path / "c"), "image-folder", items, (8, 8, 1))
    skipping = str(tmp_path / "c") + "?skip_bad_images=true"
    assert listed.listed_spec(skipping).image_shape == (8, 8, 1)  # from the first readable image
    block = listed.decode_items(skipping, "image-folder", listed.source(skipping).train, (8, 8, 1))
    assert block.skipped == ["ant/000.png"] and len(block.images) == len(block.labels) == len(items) - 1
    assert block.labels.tolist() == items.column("label").to_pylist()[1:]  # labels stay with their images


def test_a_tiny_budget_streams_a_folder_and_a_large_one_keeps_it_in_memory(tmp_path):
    _folder(tmp_path / "f", per_class=10)
    dataset = str(tmp_path / "f")
    assert streaming.streams(dataset, "1KB", 10**12)  # 27 x (64 + 8) bytes > 1 kB
    assert not streaming.streams(dataset, None, 10**12)  # half of a 1 TB object store
    assert not (tmp_path / "decoded").exists()  # deciding decoded nothing into the cache


# --------------------------------------------------------------------------------------------------
# The Ray Data stream: real CIFAR-10 JPEGs, real local Ray


@pytest.fixture(scope="module")
def quiet_ray(local_ray):
    """conftest's local Ray, without Ray Data's progress bars (a stream per test would draw several)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def pets(data_dir, tmp_path_factory) -> Path:
    """3 classes x 200 training JPEGs of ../shared/data/cifar10-jpeg (a carved test split)."""
    src = data_dir / "cifar10-jpeg" / "train"
    if not (src / "cat").is_dir():
        pytest.fail(f"the CIFAR-10 JPEG folder is not at {src.parent} (../shared/data/cifar10-jpeg)", pytrace=False)
    dst = tmp_path_factory.mktemp("stream") / "pets"
    for name in ("cat", "dog", "ship"):
        (dst / name).mkdir(parents=True)
        for f in sorted((src / name).iterdir())[:200]:
            shutil.copy(f, dst / name / f.name)
    return dst


@pytest.fixture(scope="module")
def pets_table(pets) -> str:
    """The same JPEGs as a Parquet table written by Hugging Face datasets (image bytes embedded)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    files = sorted(pets.rglob("*.jpg"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "ship"])})
    table = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [["cat", "dog", "ship"].index(f.parent.name)
                                        for f in files]}, features=features)  # fmt: skip
    out = pets.parent / "pets-table"
    out.mkdir()
    table.to_parquet(str(out / "train-00000-of-00001.parquet"))
    return str(out)


def _rows(images, labels) -> list[tuple[bytes, int]]:
    return sorted(zip([np.asarray(im).tobytes() for im in images], [int(v) for v in labels], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_the_stream_yields_the_in_memory_train_split_reshuffled_each_epoch(quiet_ray, pets, pets_table, kind):
    dataset = str(pets) if kind == "folder" else pets_table
    assert streaming.streams(dataset, "1MB", 10**12)  # 540 x 3 kB: a tiny budget streams it
    spec = listed.listed_spec(dataset)
    x, y = load_split(dataset, "train")  # the in-memory path (decodes into the test's cache)
    assert spec == get_spec(dataset) and spec.image_shape == (32, 32, 3) and spec.class_names == ("cat", "dog", "ship")
    rows = streaming.train_rows(dataset, 5000)
    assert rows == len(y) == 486
    shard = streaming.train_dataset(dataset, 5000, seed=0).streaming_split(1, equal=True)[0]
    one_by_one = list(streaming.shard_batches(shard, 1, epoch=0, seed=0))
    assert _rows(*zip(*[(im[0], lab[0]) for im, lab in one_by_one], strict=True)) == _rows(x, y)  # same rows, pixels
    orders = []
    for epoch in (1, 2):
        batches = list(streaming.shard_batches(shard, 32, epoch, seed=0))
        assert len(batches) == streaming.steps_per_epoch(rows, 1, 32) == 15  # full batches only
        assert all(im.shape == (32, 32, 32, 3) and im.dtype == torch.uint8 and lab.dtype == torch.int64
                   for im, lab in batches)  # fmt: skip
        images, labels = torch.cat([im for im, _ in batches]), torch.cat([lab for _, lab in batches])
        assert set(_rows(images, labels)) <= set(_rows(x, y))
        orders.append(labels.numpy())
    assert not np.array_equal(orders[0], orders[1])  # another order each epoch


@pytest.mark.slow
def test_ranks_get_equal_shards_and_ray_train_hands_them_out(quiet_ray, pets, tmp_path):
    import ray.train
    import ray.train.torch

    dataset, rows = str(pets), streaming.train_rows(str(pets), 5000)
    shards = streaming.train_dataset(dataset, 5000, seed=1).streaming_split(2, equal=True)
    seen: dict[int, list] = {}

    def consume(rank: int) -> None:  # every split must be read at once: the coordinator's barrier
        seen[rank] = [int(v) for _, y in streaming.shard_batches(shards[rank], 1, 0, 1, rank) for v in y]

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(seen[0]) == len(seen[1]) == rows // 2  # equal: the same steps on every rank

    out = tmp_path / "seen.txt"

    def loop_per_worker(config):
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            n = sum(len(y) for _, y in streaming.shard_batches(shard, 64, epoch, 0))
            with open(config["out"], "a") as f:
                f.write(f"{epoch} {n}\n")
            ray.train.report({"epoch": epoch})

    trainer = ray.train.torch.TorchTrainer(  # one worker x 1 CPU: the other CPU decodes
        loop_per_worker, train_loop_config={"out": str(out)},
        datasets={"train": streaming.train_dataset(dataset, 5000, seed=0)}, dataset_config=streaming.dataset_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="stream", storage_path=str(tmp_path / "runs")),
    )  # fmt: skip
    trainer.fit()
    assert out.read_text().split("\n")[:2] == [f"0 {rows // 64 * 64}", f"1 {rows // 64 * 64}"]


@pytest.mark.slow
def test_training_streams_a_folder_beyond_a_tiny_budget(quiet_ray, pets, mlflow_store, tmp_path):
    """`vaedist train --memory-budget 1KB` on real JPEGs: the train split is never put in the object store
    whole, each epoch reads the whole stream, and the model is trained, logged and registered."""
    from vaedist.config import experiment_from_dict
    from vaedist.train import run_training

    cfg = experiment_from_dict({
        "data": {"dataset": str(pets), "memory_budget": "1KB", "val_size": 60},
        "model": {"variant": "cvae", "arch": "conv", "base_channels": 8, "latent_dim": 8, "likelihood": "logistic"},
        "train": {"epochs": 2, "batch_size": 64}, "resources": {"workers": 1, "cpus_per_worker": 1},
    })  # fmt: skip
    said: list[str] = []
    result = run_training(cfg, name="streamed", storage=str(tmp_path / "runs"), echo=said.append)
    rows = streaming.train_rows(str(pets), 60)
    assert any("streams through Ray Data" in line and f"({rows} images)" in line for line in said)
    assert result.model_uri.startswith("models:/vaedist-pets/")
    history = mlflow_store.get_metric_history(result.run_id, "val_neg_elbo")
    assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value  # it learned
    assert mlflow_store.get_metric_history(result.run_id, "train_images_per_s")[0].value > 0
    # 600 images - 60 carved for test - 60 for validation = 480 streamed rows: 7 full batches of 64 an epoch
    assert rows == 480 and streaming.steps_per_epoch(rows, 1, 64) == 7


@pytest.mark.slow
def test_a_one_worker_tune_trial_streams_in_its_own_process(quiet_ray, pets, mlflow_store, tmp_path, monkeypatch):
    from vaedist.config import TuneConfig, experiment_from_dict
    from vaedist.tune import run_tune

    monkeypatch.setenv("VAEDIST_STORAGE_PATH", str(tmp_path / "runs"))
    base = experiment_from_dict({
        "data": {"dataset": str(pets), "memory_budget": "1KB", "val_size": 60},
        "model": {"variant": "vae", "arch": "dense", "width": 32, "latent_dim": 4, "likelihood": "logistic"},
        "train": {"epochs": 1, "batch_size": 64}, "resources": {"workers": 1, "cpus_per_worker": 1},
    })  # fmt: skip
    result = run_tune(base, TuneConfig(search_space={"model.latent_dim": {"grid": [4]}}, num_samples=1),
                      job_name="stream-tune", echo=lambda *_: None)  # fmt: skip
    [row] = result.table
    assert row["status"] == "OK" and row["epochs_run"] == 1 and row["val_neg_elbo"] > 0
