"""vaedist generate: the plan, the folder decision and the Parquet format as unit tests (no Ray, no data),
then for real (slow): a small conv CVAE trained on real MNIST, local Ray on 2 CPUs, Parquet on disk.

The kill-and-resume test runs ``python -m vaedist generate`` as a subprocess, SIGKILLs its process group
once some shards exist, and checks that the rerun finishes the folder without touching finished shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from vaedist import generate as G
from vaedist.checkpoint import save_checkpoint
from vaedist.cli import main
from vaedist.config import GenerateConfig, ModelConfig
from vaedist.data import load_split
from vaedist.errors import UsageError
from vaedist.models import binarize, build_model, to_model_input

REPO = Path(__file__).resolve().parents[1]
N_PER_LABEL = 200  # 2,000 rows in 10 shards of 200
SHARD_ROWS = 200


# --------------------------------------------------------------------------------------------------
# Fixtures: a briefly trained conditional model, an untrained unconditional one, local Ray, MLflow


def _save(model, path: Path, variant: str) -> Path:
    save_checkpoint(path, model, None, 1, {"data.dataset": "mnist", "model.variant": variant}, {})
    return path


@pytest.fixture(scope="session")
def cvae_ckpt(tmp_path_factory) -> Path:
    """A small conv CVAE, 200 Adam steps on real MNIST with plain torch (no Ray, no MLflow)."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(variant="cvae", arch="conv", base_channels=8, latent_dim=4), (28, 28, 1), 10, "bernoulli"
    )
    x, y = load_split("mnist", "train", progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        i = torch.randint(0, len(x), (64,), generator=gen).numpy()
        loss = model.loss(binarize(to_model_input(torch.from_numpy(x[i])), gen), torch.from_numpy(y[i])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return _save(model, tmp_path_factory.mktemp("models") / "cvae.pt", "cvae")


def _untrained(variant: str, folder: Path, name: str) -> Path:
    """A small conv model as built (seeded): its weights do not matter for the checks that use it."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, arch="conv", base_channels=8, latent_dim=4)
    return _save(build_model(cfg, (28, 28, 1), 10, "bernoulli").eval(), folder / name, variant)


@pytest.fixture(scope="session")
def untrained_cvae_ckpt(tmp_path_factory) -> Path:
    """A small conv CVAE as built: enough for every check made before a shard is written (no data)."""
    return _untrained("cvae", tmp_path_factory.mktemp("models"), "untrained-cvae.pt")


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory) -> Path:
    """An unconditional VAE; its weights do not matter for the checks that use it."""
    return _untrained("vae", tmp_path_factory.mktemp("models"), "vae.pt")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A throwaway MLflow store for the whole module (the in-process runs share it)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        yield mlflow.MlflowClient(uri)


def _cfg(model: Path, out: Path, **kw) -> GenerateConfig:
    kw.setdefault("per_label", N_PER_LABEL)
    kw.setdefault("shard_rows", SHARD_ROWS)
    return GenerateConfig(model=str(model), out=str(out), **kw)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def generated(local_ray, store, cvae_ckpt, tmp_path_factory):
    """The same plan twice (raw, to two folders) and once as PNG."""
    root = tmp_path_factory.mktemp("generated")
    out = {}
    for name, fmt in (("a", "raw"), ("b", "raw"), ("png", "png")):
        out[name] = (root / name, G.run_generate(_cfg(cvae_ckpt, root / name, image_format=fmt), echo=_quiet))
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    if not folder.exists():
        return {}
    return {  # by path inside the folder: data/train-... for the shards
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _shards(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob(G.SHARD_GLOB))]


def _by_id(folder: Path) -> pa.Table:
    return pq.read_table(_shards(folder)).sort_by("sample_id")


# --------------------------------------------------------------------------------------------------
# The plan: exact counts, a permutation of sample ids, z independent of the shard layout


# MNIST's training split, rows per class (the official files; the slow test below checks them on the data).
MNIST_TRAIN_FREQ = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _assert_split_by(freq: list[int]) -> None:
    counts = G.split_rows(1999, [freq[k] for k in (1, 3, 7)])
    assert sum(counts) == 1999
    exact = [1999 * freq[k] / sum(freq[j] for j in (1, 3, 7)) for k in (1, 3, 7)]
    assert all(abs(c - e) < 1 for c, e in zip(counts, exact, strict=True))


def test_split_rows_is_exact_largest_remainder():
    assert G.split_rows(10, [1, 1, 1]) == [4, 3, 3]
    assert G.split_rows(7, [5, 3, 2]) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: the .5 gets the leftover row
    assert G.split_rows(10, [1, 3]) == [3, 7]  # remainders tie: the earlier label gets the row
    _assert_split_by(MNIST_TRAIN_FREQ)
    with pytest.raises(UsageError, match="all zero"):
        G.split_rows(5, [0, 0])


@pytest.mark.slow
def test_split_rows_by_the_real_class_frequencies():
    _, y = load_split("mnist", "train_full", progress=False)
    freq = np.bincount(y).tolist()
    assert freq == MNIST_TRAIN_FREQ
    _assert_split_by(freq)


def _plan(counts=(700, 0, 300, 1), shard_rows=97) -> G.Plan:
    k = len(counts)
    return G.Plan("m", "", "0" * 64, "mnist", tuple(range(k)), tuple(map(str, range(k))), tuple(counts), 3, 1.0,
                  shard_rows, "raw", (28, 28, 1), 4)  # fmt: skip


def test_labels_are_exact_and_every_shard_mixes_the_classes():
    plan = _plan()
    idx = np.concatenate([plan.label_index(*plan.shard_range(s)) for s in range(plan.num_shards)])
    assert np.bincount(idx, minlength=4).tolist() == [700, 0, 300, 1]
    for s in range(plan.num_shards - 1):
        counts = plan.shard_label_counts(s)
        assert abs(counts[0] - 97 * 0.7) <= 2 and abs(counts[2] - 97 * 0.3) <= 2, counts


def test_latents_depend_on_seed_and_sample_id_only():
    z = G.latents(7, 0, 1000, 16)
    assert z.dtype == np.float32 and z.shape == (1000, 16)
    np.testing.assert_array_equal(G.latents(7, 300, 50, 16), z[300:350])  # any shard layout, same z
    np.testing.assert_array_equal(G.latents(7, 0, 10, 16, temperature=0.5), z[:10] * np.float32(0.5))
    assert not np.array_equal(G.latents(8, 0, 1000, 16), z)
    big = G.latents(0, 0, 50_000, 8).astype(np.float64)
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.02


def test_read_images_round_trips_both_formats_without_ray():
    plan = _plan(counts=(3, 2), shard_rows=5)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    z = G.latents(0, 0, 5, 4)
    for fmt in ("raw", "png"):
        p = G.Plan(**{**plan.__dict__, "image_format": fmt})
        data = G.parquet_bytes(G.shard_table(p, 0, images, z))
        table = pq.read_table(pa.BufferReader(data))
        assert table.schema.metadata[b"vaedist.image_format"] == fmt.encode()
        np.testing.assert_array_equal(G.read_images(table), images)
        np.testing.assert_array_equal(G.read_images(table.to_pandas()), images)


def test_parse_labels_and_specs():
    assert G.parse_labels(None) is None and G.parse_labels(" All ") is None
    assert (
        G.parse_labels("0, 3,7") == (0, 3, 7)
        and G.parse_labels([2, 5]) == (2, 5)
        and G.parse_labels(4) == (4,)
    )
    for bad, match in (("three", "--labels: expected class indices"), ("1,-2", "--labels"),
                       ({"a": 1}, "generate.labels: expected a list"), ("3,3", r"lists a class twice")):  # fmt: skip
        with pytest.raises(UsageError, match=match):
            G.parse_labels(bad)
    cfg, res = G.configs_from_spec(
        {"generate": {"labels": "all", "per_label": 3}, "resources": {"workers": 2}}
    )
    assert cfg.labels is None and cfg.per_label == 3 and res.workers == 2


def test_labels_and_rows_per_label_follow_the_request():
    facts = G.ModelFacts("m.pt", "mnist", True, 10, tuple("abcdefghij"), "cvae")
    assert G.plan_labels(None, facts) == (tuple(range(10)), tuple("abcdefghij"))
    assert G.plan_labels((3, 7), facts) == ((3, 7), ("d", "h"))
    with pytest.raises(UsageError, match=r"label 12 is not a class of the model \(mnist has classes 0..9\)"):
        G.plan_labels((3, 12), facts)
    vae = dataclasses.replace(facts, conditional=False, variant="vae")
    assert G.plan_labels(None, vae) == ((-1,), ("",))
    with pytest.raises(UsageError, match=r"m.pt is an unconditional model \(vae\).*omit --labels"):
        G.plan_labels((3,), vae)

    def unread():
        raise AssertionError("the training split is read only for --total with --class-balance as-train")

    def cfg(**kw):
        return GenerateConfig(model="m.pt", out="out", **kw)

    assert G.label_counts(cfg(per_label=5), (1, 2, 3), True, unread) == (5, 5, 5)
    assert G.label_counts(cfg(total=10), (1, 2, 3), True, unread) == (4, 3, 3)
    assert G.label_counts(cfg(total=10, class_balance="as-train"), (-1,), False, unread) == (10,)
    assert G.label_counts(cfg(total=10, class_balance="as-train"), (0, 2), True, lambda: [1, 100, 3]) == (
        3,
        7,
    )
    with pytest.raises(UsageError, match="--class-balance applies to --total only"):
        G.label_counts(cfg(per_label=5, class_balance="as-train"), (1,), True, unread)
    with pytest.raises(UsageError, match="is more than one generation run holds"):
        G.label_counts(cfg(per_label=2**31 + 1), (0, 1), True, unread)


# --------------------------------------------------------------------------------------------------
# The output folder: its state -> the action (pure), and the same on real files without Ray


def test_folder_state_decides_the_action():
    A, S = G.FolderAction, G.OutputState
    plan = _plan(counts=(30, 20), shard_rows=10)  # 5 shards
    new, other = plan.to_dict(), {**plan.to_dict(), "seed": 4}
    parts = {i: G.part_name(i, plan.num_shards) for i in range(plan.num_shards)}
    complete = {"plan": new, "shards": [{"file": name} for name in parts.values()]}

    def decide(state: G.OutputState, overwrite: bool = False) -> G.FolderAction:
        return G.decide_action(state, plan, overwrite, "out")

    assert decide(S()) is A.NEW and decide(S(), overwrite=True) is A.NEW  # nothing there to overwrite
    assert decide(S(tmp=[".part-00000.parquet.ab12.tmp"])) is A.NEW  # a killed attempt's leftovers only
    assert decide(S(tmp=[".part-00000.parquet.ab12.tmp"]), overwrite=True) is A.OVERWRITE
    assert (
        decide(S(plan=new)) is A.RESUME and decide(S(plan=new, parts={0: parts[0], 3: parts[3]})) is A.RESUME
    )
    assert decide(S(plan=other, parts=parts), overwrite=True) is A.OVERWRITE
    assert decide(S(parts=parts, manifest=complete, plan=new)) is A.COMPLETE
    assert decide(S(parts=parts, manifest=complete, plan=new), overwrite=True) is A.OVERWRITE
    assert decide(S(parts=parts, manifest={**complete, "plan": other}), overwrite=True) is A.OVERWRITE
    assert [a.value for a in A] == ["new", "resume", "overwrite", "complete", "repair"]
    # a shard missing from a complete folder is not refused: its checksum decides (test_a_damaged_...)
    assert decide(S(parts={i: n for i, n in parts.items() if i != 3}, manifest=complete, plan=new)) is A.COMPLETE
    # the card and evaluation figures are vaedist's beside a plan or manifest, somebody else's alone
    extras = ["README.md", "_evaluations.json"]
    assert decide(S(parts=parts, manifest=complete, plan=new, extras=extras)) is A.COMPLETE
    assert decide(S(plan=new, extras=extras)) is A.RESUME

    refused = [
        (S(foreign=["a.txt", "b/"]), True, r"--out out holds files that are not from vaedist generate \(a.txt and 1 more\)"),
        (S(extras=["README.md"]), True, r"not from vaedist generate \(README.md\)"),
        (S(parts=parts, manifest={**complete, "plan": other}), False,
         r"complete generation run of another plan \(seed 4 there, 3 now\); pass --overwrite"),
        (S(plan=other), False, r"unfinished run of another plan \(seed 4 there, 3 now\)"),
        (S(plan=new, parts={7: G.part_name(7, 8)}), False, "holds data/train-00007-of-00008.parquet, which is not in its plan"),
        (S(plan=new, parts={0: "part-00000.parquet"}), False, "holds part-00000.parquet, which is not in its plan"),
        (S(parts={0: parts[0]}), False, "holds part files but no _plan.json, so they cannot be verified"),
    ]  # fmt: skip
    for state, overwrite, match in refused:
        with pytest.raises(UsageError, match=match):
            decide(state, overwrite)


def test_a_complete_folder_whose_shards_differ_from_its_manifest_is_repaired():
    plan = _plan(counts=(30, 20), shard_rows=10)  # 5 shards
    files = [G.part_name(i, 5) for i in range(5)]
    manifest = {"plan": plan.to_dict(), "shards": [{"file": f, "shard": i, "sha256": f"h{i}"} for i, f in enumerate(files)]}
    found = {f: f"h{i}" for i, f in enumerate(files)}
    assert G.damaged_shards(manifest, found) == {}
    assert G.decide_repair(manifest, plan, {}, "out") is G.FolderAction.COMPLETE
    damaged = G.damaged_shards(manifest, {**found, files[1]: "other", files[4]: None})
    assert damaged == {1: "differs from the sha256 its manifest records", 4: "is missing"}
    assert G.decide_repair(manifest, plan, damaged, "out") is G.FolderAction.REPAIR
    # shards at the root (an earlier layout): not patched into a mixed folder
    flat = {**manifest, "shards": [{**s, "file": s["file"].removeprefix("data/")} for s in manifest["shards"]]}
    with pytest.raises(UsageError, match=r"--out out is complete but train-00001-of-00005.parquet differs from the "
                                         r"sha256 its manifest records; it has an earlier layout, so pass --overwrite"):  # fmt: skip
        G.decide_repair(flat, plan, G.damaged_shards(flat, {"train-00001-of-00005.parquet": "x"} | {
            s["file"]: s["sha256"] for s in flat["shards"] if s["shard"] != 1}), "out")  # fmt: skip


def test_the_plan_takes_the_model_facts_from_the_checkpoint_alone(tmp_path):
    """Class names and the training set's class frequencies come from the checkpoint, not the data: here a
    dataset that does not exist, so reopening it would fail."""
    from vaedist.checkpoint import dataset_facts

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="cvae", arch="dense", width=16, depth=1, latent_dim=3), (8, 8, 1), 3,
                        "bernoulli")  # fmt: skip
    facts = dataset_facts("gone", "f1ng3r", ("ant", "bee", "cow"), np.repeat([0, 1, 2], [90, 10, 0]), 5)
    save_checkpoint(tmp_path / "m.pt", model, None, 1, {"data.dataset": str(tmp_path / "gone")}, {}, facts)
    cfg = GenerateConfig(model=str(tmp_path / "m.pt"), out=str(tmp_path / "out"), total=100, class_balance="as-train",
                         labels=(0, 1))  # fmt: skip
    plan, _, info = G.build_plan(cfg)
    assert plan.counts == (90, 10) and plan.label_names == ("ant", "bee") and plan.class_names == ("ant", "bee", "cow")
    assert (plan.image_shape, plan.latent_dim, info["dataset_fingerprint"]) == ((8, 8, 1), 3, "f1ng3r")


def test_a_rerun_verifies_a_complete_folder_in_either_layout(tmp_path):
    """prepare (no Ray): a complete folder is checked shard by shard against its manifest, whether its shards
    are in data/ or (an earlier layout) at the root; only the current layout is repaired in place."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="cvae", arch="dense", width=16, depth=1, latent_dim=3), (8, 8, 1), 10,
                        "bernoulli")  # fmt: skip
    _save(model, tmp_path / "m.pt", "cvae")
    for layout in ("data", "root"):
        out = tmp_path / layout
        cfg = GenerateConfig(model=str(tmp_path / "m.pt"), out=str(out), per_label=3, shard_rows=8)
        plan, _, _ = G.build_plan(cfg)
        G.write_folder(str(out), plan, np.zeros((30, 8, 8, 1), np.uint8), G.latents(0, 0, 30, 3))
        if layout == "root":  # the shards moved up, the manifest naming them so
            manifest = json.loads((out / "_manifest.json").read_text())
            for shard in manifest["shards"]:
                (out / shard["file"]).rename(out / Path(shard["file"]).name)
                shard["file"] = Path(shard["file"]).name
            (out / "data").rmdir()
            (out / "_manifest.json").write_text(json.dumps(manifest))
        assert G.prepare(cfg).action is G.FolderAction.COMPLETE
        damaged = out / ("data/" if layout == "data" else "") / "train-00002-of-00004.parquet"
        damaged.write_bytes(damaged.read_bytes()[:-10])
        if layout == "data":
            p = G.prepare(cfg)
            assert p.action is G.FolderAction.REPAIR and p.todo == [2] and p.kept == [0, 1, 3]
            assert "  repair          data/train-00002-of-00004.parquet differs from the sha256" in "\n".join(G.describe(p))
        else:
            with pytest.raises(UsageError, match="train-00002-of-00004.parquet differs .* earlier layout, so pass --overwrite"):
                G.prepare(cfg)


def test_an_unfinished_folder_resumes_from_the_shards_that_verify(tmp_path):
    plan = _plan(counts=(12, 9), shard_rows=5)  # 5 shards, the last of 1 row
    images = np.random.default_rng(1).integers(0, 256, (plan.total, 28, 28, 1), dtype=np.uint8)
    out = tmp_path / "unfinished"
    assert G.write_folder(str(out), plan, images, G.latents(3, 0, plan.total, 4), manifest=False) is None
    (out / "data/train-00004-of-00005.parquet").unlink()
    (out / "data/train-00002-of-00005.parquet").write_bytes(b"PAR1 truncated")
    (out / "data/.train-00004-of-00005.parquet.0123abcd.tmp").write_bytes(b"half")
    fs, root, uri = G.resolve_out(str(out))
    state = G.inspect_output(fs, root, uri)
    assert sorted(state.parts) == [0, 1, 2, 3] and state.tmp == ["data/.train-00004-of-00005.parquet.0123abcd.tmp"]
    assert state.plan == plan.to_dict() and state.manifest is None and not state.foreign
    assert G.decide_action(state, plan, False, uri) is G.FolderAction.RESUME
    assert [i for i in sorted(state.parts) if G.verify_part(fs, root, plan, i)] == [0, 1, 3]
    with pytest.raises(UsageError, match="is a file, not a folder"):
        G.inspect_output(fs, str(out / "_plan.json"), "f")


# --------------------------------------------------------------------------------------------------
# The format: one writer, one reader, on tiny arrays


def test_png_encode_decode_is_lossless_grey_and_colour():
    rng = np.random.default_rng(2)
    for shape in ((5, 28, 28, 1), (70, 8, 8, 3)):  # 70: the threaded path
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        pngs = G.encode_pngs(images, threads=2)
        assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        np.testing.assert_array_equal(np.stack([G.decode_png(p) for p in pngs]), images)


@pytest.mark.parametrize("image_format", ["raw", "png"])
def test_format_writer_and_reader_round_trip(tmp_path, image_format):
    plan = dataclasses.replace(_plan(counts=(4, 0, 6, 1), shard_rows=4), image_format=image_format)
    images = np.random.default_rng(0).integers(0, 256, (plan.total, 28, 28, 1), dtype=np.uint8)
    z = G.latents(plan.seed, 0, plan.total, plan.latent_dim)
    info = {"name": "vaedist-mnist", "run_id": "r1"}
    manifest = G.write_folder(str(tmp_path / "gen"), plan, images, z, model_info=info, request={"total": 11})
    folder = tmp_path / "gen"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "_manifest.json", "_plan.json", *(G.part_name(i, 3) for i in range(3))
    ]  # fmt: skip
    assert G.part_name(2, 3) == "data/train-00002-of-00003.parquet"
    assert json.loads((folder / "_manifest.json").read_text()) == manifest
    assert manifest["format"] == G.MANIFEST_FORMAT and manifest["plan_hash"] == plan.hash
    assert manifest["model"] == {
        "uri": "m",
        "version": "",
        "name": "vaedist-mnist",
        "run_id": "r1",
        "sha256": "0" * 64,
    }
    assert manifest["request"] == {"total": 11} and manifest["plan"] == plan.to_dict()
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 3]
    for s in manifest["shards"]:
        assert hashlib.sha256((folder / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert json.loads((folder / "_plan.json").read_text()) == plan.to_dict()

    table = _by_id(folder)
    assert tuple(table.column_names) == G.COLUMNS and table["sample_id"].to_pylist() == list(range(11))
    assert table.schema.metadata[b"vaedist.plan_hash"] == plan.hash.encode()
    labels = np.asarray(plan.labels)[plan.label_index(0, plan.total)]
    assert table["label"].to_pylist() == labels.tolist()
    np.testing.assert_array_equal(G.read_images(table), images)
    np.testing.assert_array_equal(np.asarray(table["z"].to_pylist(), np.float32), z)

    gen = G.read_generated(str(folder))
    np.testing.assert_array_equal(gen.images, images)
    np.testing.assert_array_equal(gen.labels, labels)
    assert (gen.dataset, gen.model_uri, gen.model_version, gen.model_run_id) == ("mnist", "m", None, "r1")
    assert gen.image_format == image_format and gen.manifest == manifest
    assert gen.label_names == {0: ["0"], 2: ["2"], 3: ["3"]}


def test_reader_keeps_reading_manifests_in_other_shapes_and_refuses_unfinished_folders(tmp_path):
    plan = _plan(counts=(3, 3), shard_rows=4)
    images = np.zeros((6, 28, 28, 1), np.uint8)
    folder = tmp_path / "gen"
    G.write_folder(str(folder), plan, images, np.zeros((6, 4), np.float32))
    manifest = json.loads((folder / "_manifest.json").read_text())
    # Shards as bare names, the model at the top level: still read.
    manifest["shards"] = [s["file"] for s in manifest["shards"]]
    del manifest["model"]
    manifest["model_uri"], manifest["model_version"] = "models:/x/3", 3
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    gen = G.read_generated(str(folder))
    assert (gen.model_uri, gen.model_version, len(gen.labels)) == ("models:/x/3", "3", 6)

    (folder / "data/train-00001-of-00002.parquet").unlink()
    with pytest.raises(UsageError, match="lists data/train-00001-of-00002.parquet but the file is missing"):
        G.read_generated(str(folder))
    G.write_folder(str(tmp_path / "partial"), plan, images, np.zeros((6, 4), np.float32), manifest=False)
    with pytest.raises(UsageError, match=r"is incomplete: 2 shard\(s\) but no _manifest.json"):
        G.read_generated(str(tmp_path / "partial"))
    with pytest.raises(UsageError, match="does not exist"):
        G.read_generated(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------
# End to end in-process: determinism, formats, readers, manifest, MLflow


@pytest.mark.slow
def test_same_plan_gives_identical_images_and_files(generated):
    (a, ra), (b, rb) = generated["a"], generated["b"]
    assert ra.status == rb.status == "written" and ra.rows == 2000 and ra.plan_hash == rb.plan_hash
    ta, tb = _by_id(a), _by_id(b)
    assert ta["sample_id"].to_pylist() == list(range(2000))
    assert ta["image"].equals(tb["image"]) and ta["z"].equals(tb["z"]) and ta["label"].equals(tb["label"])
    parts = sorted(f"data/{p.name}" for p in a.glob(G.SHARD_GLOB))
    assert parts == [f"data/train-{i:05d}-of-00010.parquet" for i in range(10)]
    assert sorted(p.name for p in a.iterdir()) == ["README.md", "_manifest.json", "_plan.json", "data"]
    for name in parts:  # same model + seed + plan: byte-identical files
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert json.loads((a / "_manifest.json").read_text()) == json.loads((b / "_manifest.json").read_text())


@pytest.mark.slow
def test_schema_manifest_and_rows_per_label(generated, cvae_ckpt):
    folder, result = generated["a"]
    table = pq.read_table(folder / "data/train-00000-of-00010.parquet")
    schema = table.schema
    assert schema.field("sample_id").type == pa.int64() and schema.field("label").type == pa.int64()
    assert schema.field("label_name").type == pa.string()
    assert schema.field("image").type == pa.fixed_shape_tensor(pa.uint8(), (28, 28, 1))
    assert schema.field("z").type == pa.list_(pa.float32(), 4)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["vaedist.model_uri"] == str(cvae_ckpt) and meta["vaedist.dataset"] == "mnist"
    assert meta["vaedist.seed"] == "0" and meta["vaedist.version"] and meta["vaedist.image_format"] == "raw"
    assert "vaedist.model_version" in meta
    assert b"huggingface" not in schema.metadata  # datasets has no feature for a tensor
    assert pq.ParquetFile(folder / "data/train-00000-of-00010.parquet").metadata.row_group(0).column(3).compression == "ZSTD"

    full = _by_id(folder)
    labels = full["label"].to_numpy()
    assert np.bincount(labels).tolist() == [N_PER_LABEL] * 10
    assert [str(v) for v in labels[:50]] == full["label_name"].to_pylist()[:50]

    m = json.loads((folder / "_manifest.json").read_text())
    assert m["rows"] == 2000 and m["dataset"] == "mnist" and m["seed"] == 0
    assert m["model"]["uri"] == str(cvae_ckpt) and m["plan_hash"] == result.plan_hash
    assert [r["rows"] for r in m["rows_per_label"]] == [N_PER_LABEL] * 10
    assert [s["file"] for s in m["shards"]] == [f"data/train-{i:05d}-of-00010.parquet" for i in range(10)]
    for s in m["shards"]:
        data = (folder / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        assert sum(s["rows_per_label"]) == s["rows"] == SHARD_ROWS
    assert [f["name"] for f in m["schema"]] == ["sample_id", "label", "label_name", "image", "z"]
    assert json.loads((folder / "_plan.json").read_text()) == m["plan"]
    assert not list(folder.glob(".*")) and not list(folder.glob("data/.*"))  # no temporary files left


@pytest.mark.slow
def test_png_holds_the_same_images_and_pandas_and_ray_read_both(generated):
    raw_folder, png_folder = generated["a"][0], generated["png"][0]
    raw = G.read_images(_by_id(raw_folder))
    png_table = _by_id(png_folder)
    assert png_table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert png_table["image"][0].as_py()["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert png_table["image"][0].as_py()["path"] is None
    np.testing.assert_array_equal(G.read_images(png_table), raw)  # PNG is lossless: same pixels
    assert raw.shape == (2000, 28, 28, 1) and raw.dtype == np.uint8 and 0 < raw.mean() < 128

    for folder in (raw_folder, png_folder):
        df = pd.read_parquet(folder / "data").sort_values("sample_id")  # no options, as the card says
        assert df["sample_id"].tolist() == list(range(2000)) and df["label"].dtype == np.int64
        np.testing.assert_array_equal(G.read_images(df), raw)

    import ray

    for folder in (raw_folder, png_folder):
        batch = ray.data.read_parquet(str(folder / "data")).take_batch(2000)
        order = np.argsort(batch["sample_id"])
        assert batch["sample_id"][order].tolist() == list(range(2000))
        images = G.read_images(batch["image"])[order]
        assert images.shape == (2000, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, raw)


@pytest.mark.slow
def test_mlflow_run_links_the_model_and_has_metrics_and_picture(generated, store, cvae_ckpt):
    folder, result = generated["a"]
    run = store.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert store.get_experiment(run.info.experiment_id).name == "vaedist/mnist"
    assert run.data.tags["vaedist.kind"] == "generate" and run.data.tags["vaedist.model_uri"] == str(
        cvae_ckpt
    )
    assert run.data.tags["vaedist.plan_hash"] == result.plan_hash and "vaedist.model_version" in run.data.tags
    m = run.data.metrics
    assert m["rows"] == 2000 and all(m[f"rows_label_{k}"] == N_PER_LABEL for k in range(10))
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert m["images_per_s"] > 0 and m["bytes_per_image"] == pytest.approx(manifest["bytes"] / 2000)
    # start-up (until the first shard's work began, on the actor's clock) is part of the run, not all of it
    assert 0 < result.startup_seconds < result.seconds and m["startup_s"] == pytest.approx(result.startup_seconds)
    artifacts = [a.path for a in store.list_artifacts(result.run_id, "images")]
    assert any(p.startswith("images/generated_samples+step+0") for p in artifacts), artifacts
    assert generated["b"][1].run_id != result.run_id  # another folder: another run
    (dataset,) = run.inputs.dataset_inputs  # the folder, as the run's output: the runs table's Dataset column
    assert dataset.dataset.name == f"generated/{folder.name}" and dataset.dataset.source_type == "local"
    assert dataset.dataset.digest == G.dataset_digest((folder / "_manifest.json").read_bytes())[:36]
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "generated")]


@pytest.mark.slow
def test_every_tool_reads_the_default_format_with_the_pixels_of_raw(generated, tmp_path, monkeypatch):
    """datasets, polars and duckdb on a folder vaedist generate wrote with default flags."""
    import datasets
    import duckdb
    import polars as pl

    raw, folder = G.read_images(_by_id(generated["a"][0])), generated["png"][0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path))  # through the card
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 2000
    assert len(datasets.load_dataset("parquet", data_dir=str(folder / "data"), split="train", cache_dir=str(tmp_path))) == 2000
    assert ds.features["label"].names == list(map(str, range(10)))  # the checkpoint's dataset: mnist
    ds = ds.sort("sample_id")
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in ds[:50]["image"]])[..., None], raw[:50])
    frame = pl.read_parquet(f"{folder}/{G.SHARD_GLOB}").sort("sample_id")
    assert frame.height == 2000 and frame["label"].value_counts()["count"].to_list() == [N_PER_LABEL] * 10
    np.testing.assert_array_equal(G.read_images(frame.to_arrow()), raw)
    counts = duckdb.sql(f"SELECT label_name, count(*) AS n FROM '{folder}/{G.SHARD_GLOB}' GROUP BY ALL ORDER BY 1")
    assert counts.fetchall() == [(str(k), N_PER_LABEL) for k in range(10)]


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or removed


def _cli(*args: str):
    result = CliRunner().invoke(main, ["generate", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _assert_refused(args: list[str], folder: Path, match: str) -> None:
    before = _snapshot(folder)
    code, _, err = _cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert _snapshot(folder) == before


def test_a_model_uri_without_a_store_creates_none(tmp_path, monkeypatch):
    """Resolving models:/... where no MLflow store exists must not leave an empty mlflow.db behind."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    _assert_refused(
        ["--model", "models:/vaedist-mnist@champion", "--out", str(out), "--total", "5"], tmp_path,
        f"there is no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    code, _, err = _cli("--model", "models:/vaedist-mnist@champion", "--out", str(out), "--total", "5")
    assert code == 1 and err.strip().startswith(
        "error: MLflow tracking server http://127.0.0.1:9 is not reachable"
    )
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_refused_with_one_line(store, untrained_cvae_ckpt, vae_ckpt, tmp_path):
    """Every refusal comes before a shard is decoded, so an untrained model (no data, no Ray) serves."""
    cvae_ckpt = untrained_cvae_ckpt
    out = tmp_path / "out"
    base = ["--model", str(cvae_ckpt), "--out", str(out), "--per-label", "10"]
    _assert_refused([*base, "--labels", "3,12"], out, "label 12 is not a class of the model")
    _assert_refused([*base, "--labels", "three"], out, "--labels")
    _assert_refused(
        ["--model", str(vae_ckpt), "--out", str(out), "--per-label", "5", "--labels", "3"],
        out,
        "unconditional",
    )
    _assert_refused(
        ["--model", str(tmp_path / "nope.pt"), "--out", str(out), "--total", "5"], out, "neither a checkpoint"
    )
    _assert_refused(
        ["--model", "models:/vaedist-mnist@champion", "--out", str(out), "--total", "5"],
        out,
        "does not resolve",
    )
    _assert_refused(["--model", str(cvae_ckpt), "--out", str(out), "--per-label", "0"], out, "per_label")
    _assert_refused(["--model", str(cvae_ckpt), "--out", str(out), "--per-label", "-3"], out, "per_label")
    _assert_refused(["--model", str(cvae_ckpt), "--out", str(out)], out, "--per-label")
    _assert_refused([*base, "--class-balance", "as-train"], out, "--total only")
    assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "part-00000.parquet").write_bytes(b"not ours")
    _assert_refused(base, out, "not from vaedist generate (notes.txt)")

    # root writes through chmod 555, so as root use a path in a filesystem nobody can write (sysfs).
    readonly = Path("/sys/vaedist-generate-test") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        readonly.parent.mkdir()
        readonly.parent.chmod(0o555)
    _assert_refused(
        ["--model", str(cvae_ckpt), "--out", str(readonly), "--per-label", "10"], readonly, "not writable"
    )
    assert not readonly.exists()


@pytest.mark.slow
def test_overwrite_and_plan_guards(local_ray, store, cvae_ckpt, tmp_path):
    out = tmp_path / "small"
    args = ["--model", str(cvae_ckpt), "--out", str(out), "--per-label", "20", "--shard-rows", "50"]
    code, stdout, err = _cli(*args)
    assert code == 0, err
    first = _snapshot(out)
    assert len([n for n in first if n.startswith("data/train-")]) == 4 and "_manifest.json" in first
    assert "README.md" in first

    code, stdout, _ = _cli(*args)  # the same plan again: nothing to do, nothing touched
    assert code == 0 and "already complete" in stdout and _snapshot(out) == first
    _assert_refused(
        [*args, "--seed", "1"], out, "complete generation run of another plan (seed 0 there, 1 now)"
    )

    code, _, err = _cli(*args, "--seed", "1", "--overwrite")
    assert code == 0, err
    m = json.loads((out / "_manifest.json").read_text())
    assert m["seed"] == 1 and len(m["shards"]) == 4
    after = _snapshot(out)
    assert all(after[n][2] != first[n][2] for n in first if n.startswith("data/train-"))  # other z, other bytes

    # An unfinished folder (no manifest) of another plan is refused, not mixed.
    (out / "_manifest.json").unlink()
    (out / "data/train-00003-of-00004.parquet").unlink()
    _assert_refused([*args, "--labels", "0,1"], out, "unfinished run of another plan (labels")
    _assert_refused([*args, "--per-label", "21"], out, "unfinished run of another plan (counts")


@pytest.mark.slow
def test_a_damaged_complete_folder_is_repaired_by_a_rerun(local_ray, store, cvae_ckpt, tmp_path):
    out = tmp_path / "damaged"
    args = ["--model", str(cvae_ckpt), "--out", str(out), "--per-label", "20", "--shard-rows", "50"]
    code, _, err = _cli(*args)
    assert code == 0, err
    first = _snapshot(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    truncated, lost = out / "data/train-00001-of-00004.parquet", out / "data/train-00003-of-00004.parquet"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    # evaluate names the damaged shard in one line, before any work
    result = CliRunner().invoke(main, ["evaluate", "cas", "--generated", str(out), "--dataset", "mnist"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    assert f"{out}/data/train-00001-of-00004.parquet is not readable Parquet" in errors[0], errors
    lost.unlink()

    code, stdout, err = _cli(*args)  # the same command: verifies every shard, rewrites the two
    assert code == 0, err
    assert "complete, but 2 shard(s) damaged: rewriting them" in stdout
    repairs = [line for line in stdout.splitlines() if line.strip().startswith("repair")]
    assert repairs == [
        "  repair          data/train-00001-of-00004.parquet differs from the sha256 its manifest records: rewriting it",
        "  repair          data/train-00003-of-00004.parquet is missing: rewriting it",
    ], stdout
    after = _snapshot(out)
    for name in ("data/train-00000-of-00004.parquet", "data/train-00002-of-00004.parquet", "_plan.json"):
        assert after[name] == first[name], name  # untouched
    assert after[truncated.relative_to(out).as_posix()][2] == first[truncated.relative_to(out).as_posix()][2]
    assert after[lost.relative_to(out).as_posix()][2] == first[lost.relative_to(out).as_posix()][2]  # same bytes
    assert json.loads((out / "_manifest.json").read_text())["shards"] == manifest["shards"]
    assert len(G.read_generated(str(out)).labels) == 200
    code, stdout, _ = _cli(*args)
    assert code == 0 and "every shard verified, nothing to do" in stdout and _snapshot(out) == after


# --------------------------------------------------------------------------------------------------
# Faults: SIGKILL the driver's process group halfway, rerun, check the result


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.mark.slow
def test_killed_run_resumes_without_touching_finished_shards(cvae_ckpt, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "vaedist", "generate", "--model", str(cvae_ckpt), "--out", str(out),
            "--labels", "1,3,7", "--total", "1999", "--class-balance", "as-train", "--shard-rows", "100",
            "--seed", "5"]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        G.SHARD_DELAY_ENV: "0.4",
    }
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob(G.SHARD_GLOB))) < 3:
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no shards after 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    for pid in _session_pids(proc.pid):  # anything of that session that outlived the kill (Ray's own)
        os.kill(pid, signal.SIGKILL)

    assert not (out / "_manifest.json").exists() and (out / "_plan.json").exists()
    finished = {
        f"data/{p.name}": (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in out.glob("data/train-*")
    }
    assert 3 <= len(finished) < 20
    # A shard damaged after the kill must be rewritten; the others must stay as they are.
    damaged = sorted(finished)[-1]
    (out / damaged).write_bytes(b"PAR1 truncated")
    del finished[damaged]

    env.pop(G.SHARD_DELAY_ENV)
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"unfinished: {len(finished)} shard(s) verified" in rerun.stdout
    assert "Ray: a new local instance" in rerun.stdout  # what runs where
    # What a person sees is vaedist's lines: not Ray Data's INFO "execution finished", not the core
    # worker's error line about restartable actors (a local instance does not restart them), no warnings.
    internals = ("execution finished", "core_worker.cc", "max_restarts", "INFO", "Warning")
    shown = [needle for needle in internals if needle in rerun.stdout + rerun.stderr]
    assert not shown, f"{shown}:\n{rerun.stdout}{rerun.stderr}"

    for name, (mtime, digest) in finished.items():
        p = out / name
        assert p.stat().st_mtime_ns == mtime and hashlib.sha256(p.read_bytes()).hexdigest() == digest, name
    table = _by_id(out)
    assert table["sample_id"].to_pylist() == list(range(1999))  # every id exactly once
    _, y = load_split("mnist", "train_full", progress=False)
    freq = np.bincount(y)
    expected = G.split_rows(1999, [int(freq[k]) for k in (1, 3, 7)])
    labels = table["label"].to_numpy()
    assert [int((labels == k).sum()) for k in (1, 3, 7)] == expected and set(labels) == {1, 3, 7}

    m = json.loads((out / "_manifest.json").read_text())
    assert m["rows"] == 1999 and [r["rows"] for r in m["rows_per_label"]] == expected
    assert [r["label"] for r in m["rows_per_label"]] == [1, 3, 7] and m["seed"] == 5
    assert len(m["shards"]) == 20 and m["shards"][-1]["rows"] == 99
    for s in m["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["README.md", "_manifest.json", "_plan.json", *(s["file"] for s in m["shards"])]
    )
    assert pq.read_metadata(out / damaged).num_rows == 100


@pytest.mark.slow
def test_unconditional_model_rows_get_label_minus_one(local_ray, store, vae_ckpt, tmp_path):
    t0 = time.perf_counter()
    result = G.run_generate(
        _cfg(vae_ckpt, tmp_path / "vae", per_label=None, total=30, shard_rows=16), echo=_quiet
    )
    # where the call's seconds went (the benchmark prints them): every phase, adding up to the call
    assert list(result.phases) == ["prepare", "start", "pipeline", "finish"]
    assert all(s > 0 for s in result.phases.values()) and result.phases["pipeline"] == result.seconds
    assert sum(result.phases.values()) <= time.perf_counter() - t0
    table = _by_id(tmp_path / "vae")
    assert result.rows == 30 and table["sample_id"].to_pylist() == list(range(30))
    assert set(table["label"].to_pylist()) == {-1} and set(table["label_name"].to_pylist()) == {""}
    m = json.loads((tmp_path / "vae" / "_manifest.json").read_text())
    assert m["rows_per_label"] == [{"label": -1, "name": "", "rows": 30}]


@pytest.mark.parametrize("name", ["generate-mnist", "generate-fashion-mnist", "generate-cifar"])
def test_job_specs_parse(name):
    from vaedist.jobs import load_spec

    for preset in (None, "smoke"):
        spec = load_spec(name, preset=preset)
        cfg, resources = G.configs_from_spec(spec.sections)
        assert spec.kind == "generate" and cfg.model.startswith("models:/vaedist-") and cfg.labels is None
        assert resources.workers >= 1
