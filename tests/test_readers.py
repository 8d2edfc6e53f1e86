"""What vaedist generate writes, read by the tools people use: Hugging Face datasets, pandas, polars, duckdb,
pyarrow (Ray Data: tests/test_generate.py). Folders are written through the format module in-process
(no Ray, no data), so these run in the fast tier; test_generate.py repeats the key checks on a folder the
real `vaedist generate` wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from vaedist import generate as G
from vaedist.errors import UsageError
from vaedist.generate.card import record_evaluation

CLASSES = ("zero", "one", "two")


def _plan(image_format: str = "png", labels=(0, 2), counts=(7, 5), shard_rows=5) -> G.Plan:
    names = tuple(CLASSES[k] if k >= 0 else "" for k in labels)
    return G.Plan("models:/vaedist-x/2", "2", "ab" * 32, "x", tuple(labels), names, tuple(counts), 3, 0.8,
                  shard_rows, image_format, (6, 5, 1), 4, CLASSES if labels != (-1,) else ())  # fmt: skip


def _write(folder: Path, plan: G.Plan, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (plan.total, *plan.image_shape), dtype=np.uint8)
    G.write_folder(str(folder), plan, images, G.latents(plan.seed, 0, plan.total, plan.latent_dim),
                   model_info={"name": "vaedist-x", "run_id": "r9"}, request={"per_label": 6})  # fmt: skip
    return images


@pytest.fixture
def hf(monkeypatch, tmp_path):
    """datasets, offline, with its cache in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    return datasets


def test_datasets_loads_images_and_class_labels_both_ways(tmp_path, hf):
    folder = tmp_path / "gen"
    images = _write(folder, _plan())
    for ds in (
        hf.load_dataset("parquet", data_dir=str(folder / "data"), split="train", cache_dir=str(tmp_path / "c1")),
        hf.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "c2")),  # through the card
    ):
        assert len(ds) == 12 and isinstance(ds.features["image"], hf.Image)
        assert ds.features["label"].names == list(CLASSES)  # every class of the model, not only those asked
        assert ds.features["z"].length == 4
        ds = ds.sort("sample_id")
        assert [ds.features["label"].int2str(v) for v in ds["label"]] == ds["label_name"]
        np.testing.assert_array_equal(np.stack([np.asarray(im) for im in ds["image"]])[..., None], images)


def test_pandas_polars_duckdb_pyarrow_read_every_row(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    folder = tmp_path / "gen"
    images = _write(folder, _plan())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "_manifest.json", "_plan.json", "data"]
    assert sorted(p.name for p in (folder / "data").iterdir()) == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    shards = f"{folder}/{G.SHARD_GLOB}"
    frames = {  # data/ holds the shards only: no options, as the card says
        "pandas": pd.read_parquet(f"{folder}/data"),
        "pyarrow": pq.read_table(f"{folder}/data").to_pandas(),
        "polars": pl.read_parquet(shards).to_pandas(),
        "duckdb": duckdb.sql(f"SELECT * FROM '{shards}'").df(),
    }
    for tool, df in frames.items():
        df = df.sort_values("sample_id")
        assert df["sample_id"].tolist() == list(range(12)), tool
        assert sorted(set(zip(df["label"], df["label_name"], strict=True))) == [(0, "zero"), (2, "two")], tool
        np.testing.assert_array_equal(G.read_images(df), images, err_msg=tool)


def test_the_schema_declares_the_features_for_datasets(tmp_path):
    folder = tmp_path / "gen"
    _write(folder, _plan())
    schema = pq.read_schema(folder / G.part_name(0, 3))
    assert schema.field("label").type == pa.int64()
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["label"] == {"names": list(CLASSES), "_type": "ClassLabel"}
    assert schema.metadata[b"vaedist.plan_hash"] == _plan().hash.encode()  # vaedist's own, beside it
    # an unconditional model: label -1 on every row, so no ClassLabel to declare
    _write(tmp_path / "vae", _plan(labels=(-1,), counts=(4,)))
    schema = pq.read_schema(tmp_path / "vae" / G.part_name(0, 1))
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["label"]["_type"] == "Value"


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_the_dataset_card_describes_the_folder_and_takes_evaluations(tmp_path):
    folder = tmp_path / "gen"
    _write(folder, _plan())
    meta, body = _card(folder)
    assert f'pd.read_parquet("{folder}/data")' in body and "ignore_prefixes" not in body
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": 12}]
    assert info["features"][1] == {"name": "label", "dtype": {"class_label": {"names": {"0": "zero", "1": "one", "2": "two"}}}}
    assert info["features"][3] == {"name": "image", "dtype": "image"}
    for fact in ("`models:/vaedist-x/2`", "registered as `vaedist-x` version 2", "MLflow run `r9`",
                 "seed 3", "N(0, 0.8^2 I)", "| 0 | zero | 7 |", "| 2 | two | 5 |", "Not evaluated yet"):  # fmt: skip
        assert fact in body, fact

    manifest = json.loads((folder / "_manifest.json").read_text())
    assert record_evaluation(str(folder), manifest, "cas", {"cas": 0.91, "real_accuracy": 0.98, "ratio": 0.9286}, "e1") is None
    _, body = _card(folder)
    assert "MLflow run `e1`" in body and "| CAS / real | 0.929 |" in body and "Not evaluated" not in body
    assert json.loads((folder / "_evaluations.json").read_text())["cas"]["run_id"] == "e1"
    assert G.read_generated(str(folder)).manifest == manifest  # the card and figures are not data

    if os.geteuid() != 0:  # root writes through chmod
        folder.chmod(0o555)
        try:
            assert "was not updated" in record_evaluation(str(folder), manifest, "cas", {"cas": 0.5}, "e2")
        finally:
            folder.chmod(0o755)


def test_a_raw_folder_declares_no_features_it_cannot_hold(tmp_path):
    folder = tmp_path / "raw"
    images = _write(folder, _plan("raw"))
    meta, body = _card(folder)
    assert "dataset_info" not in meta and "datasets cannot read them" in body
    assert b"huggingface" not in pq.read_schema(folder / G.part_name(0, 3)).metadata
    np.testing.assert_array_equal(G.read_generated(str(folder)).images, images)


def _old_layout(folder: Path) -> dict:
    """A new folder moved into the layout before data/: the shards at the root, the manifest naming them so."""
    manifest = json.loads((folder / "_manifest.json").read_text())
    for shard in manifest["shards"]:
        (folder / shard["file"]).rename(folder / Path(shard["file"]).name)
        shard["file"] = Path(shard["file"]).name
    (folder / "data").rmdir()
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_folders_with_shards_at_the_root_stay_readable(tmp_path):
    folder = tmp_path / "flat"
    images = _write(folder, _plan())
    manifest = _old_layout(folder)
    assert (folder / "train-00000-of-00003.parquet").is_file()
    gen = G.read_generated(str(folder))
    np.testing.assert_array_equal(gen.images, images)
    assert gen.manifest == manifest


def test_folders_of_earlier_versions_stay_readable(tmp_path):
    """vaedist < 0.5: part-NNNNN.parquet at the root, PNG as plain bytes, int16 labels, no card."""
    folder = tmp_path / "old"
    images = _write(folder, _plan())
    manifest = _old_layout(folder)
    for i, shard in enumerate(manifest["shards"]):
        table = pq.read_table(folder / shard["file"])
        table = table.set_column(1, pa.field("label", pa.int16()), table["label"].cast(pa.int16()))
        table = table.set_column(3, pa.field("image", pa.binary()), pa.chunked_array([c.field("bytes") for c in table["image"].chunks]))
        (folder / shard["file"]).unlink()
        shard["file"] = f"part-{i:05d}.parquet"
        pq.write_table(table.replace_schema_metadata({b"vaedist.image_format": b"png"}), folder / shard["file"])
    (folder / "README.md").unlink()
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    gen = G.read_generated(str(folder))
    np.testing.assert_array_equal(gen.images, images)
    assert gen.labels.dtype == np.int64 and gen.image_format == "png"


def test_a_generated_folder_with_an_image_stored_by_path_is_refused(tmp_path):
    folder = tmp_path / "gen"
    _write(folder, _plan(counts=(3, 2)))
    name = G.part_name(0, 1)
    table = pq.read_table(folder / name)
    by_path = pa.StructArray.from_arrays([pa.nulls(5, pa.binary()), pa.array(["a.png"] * 5)], fields=list(G.format.PNG_STRUCT))
    pq.write_table(table.set_column(3, table.schema.field("image"), by_path).replace_schema_metadata(table.schema.metadata), folder / name)
    with pytest.raises(UsageError, match="has no bytes"):
        G.read_generated(str(folder))
