"""The registered model as MLflow users serve it: pyfunc in a fresh process and a real `mlflow models serve`.

The model is registered the way training registers it (champion.register_checkpoint), from a checkpoint
of a conditional VAE; every served image is checked pixel for pixel against the decoder run here with the
same label and seed, so a label that were dropped or mixed up on the way would fail.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from raycluster import free_port

from vaedist import tracking
from vaedist.config import experiment_from_dict
from vaedist.serve import GeneratorModel, generate_images

CVAE = {"data": {"dataset": "mnist", "val_size": 1000},
        "model": {"variant": "cvae", "arch": "conv", "base_channels": 8, "latent_dim": 4}}  # fmt: skip
REQUEST = pd.DataFrame({"label": [3, 7, 0], "seed": [5, 6, 5], "temperature": [1.0, 0.5, 1.0]})


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking URI, local model): a CVAE checkpoint registered as vaedist-mnist, champion."""
    from vaedist.champion import register_checkpoint
    from vaedist.checkpoint import save_checkpoint
    from vaedist.models import build_model

    folder = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = experiment_from_dict(CVAE)
        torch.manual_seed(0)
        model = build_model(cfg.model, (28, 28, 1), 10, cfg.likelihood).eval()
        (folder / "ckpt").mkdir()
        save_checkpoint(folder / "ckpt" / "model.pt", model, None, 1, cfg.flatten(), {"val_neg_elbo": 500.0})
        run_id = tracking.find_or_create_run("mnist", "served", {}, kind="train")
        model_uri, version, champion, _ = register_checkpoint(str(folder / "ckpt"), run_id, "mnist")
        assert (model_uri, version, champion) == ("models:/vaedist-mnist/1", "1", True)
        yield uri, model, folder
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def test_requests_decode_to_the_same_pixels_whatever_rows_they_come_with():
    """The sampling core, without MLflow: a row's image depends on its own label, seed and temperature."""
    cfg = experiment_from_dict(CVAE)
    torch.manual_seed(0)
    from vaedist.models import build_model

    model = build_model(cfg.model, (28, 28, 1), 10, cfg.likelihood).eval()
    pixels, labels, seeds = generate_images(model, REQUEST)
    assert pixels.shape == (3, 28, 28, 1) and pixels.dtype == np.uint8
    assert labels.tolist() == [3, 7, 0] and seeds.tolist() == [5, 6, 5]
    alone, _, _ = generate_images(model, REQUEST.iloc[[1]])
    assert np.array_equal(alone[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])  # same seed and z, another label: another image
    with pytest.raises(ValueError, match="label 10 is out of range"):
        generate_images(model, pd.DataFrame({"label": [10]}))
    with pytest.raises(ValueError, match="needs a 'label' column"):
        generate_images(model, pd.DataFrame({"seed": [1]}))
    assert isinstance(GeneratorModel(), mlflow.pyfunc.PythonModel)


def test_the_same_seed_gives_the_same_image_in_generate_serve_and_the_pictures(tmp_path):
    """One sampler: generate's image for sample_id i of seed S is the served image of the row (seed S,
    sample_id i, the same label and temperature), and the epoch picture's sample j of its seed."""
    from vaedist import generate as G
    from vaedist import sampling
    from vaedist.models import build_model
    from vaedist.pictures import SAMPLES_SEED, EpochPictures

    cfg = experiment_from_dict(CVAE)
    torch.manual_seed(0)
    model = build_model(cfg.model, (28, 28, 1), 10, cfg.likelihood).eval()
    plan = G.Plan("m", "", "0" * 64, "mnist", tuple(range(10)), tuple(map(str, range(10))), (3,) * 10, 11, 0.7,
                  16, "raw", (28, 28, 1), model.latent_dim, tuple(map(str, range(10))))  # fmt: skip
    fs, root, _ = G.resolve_out(str(tmp_path / "gen"))
    fs.create_dir(root + "/data", recursive=True)
    G.write_shard(model, plan, 1, fs, root, batch_size=sampling.DECODE_BATCH)  # sample ids 16..29
    table = pq.read_table(tmp_path / "gen" / G.part_name(1, plan.num_shards))
    request = pd.DataFrame({"label": table["label"].to_numpy(), "seed": 11, "sample_id": table["sample_id"].to_numpy(),
                            "temperature": 0.7})  # fmt: skip
    pixels, labels, _ = generate_images(model, request)
    np.testing.assert_array_equal(pixels, G.read_images(table))
    np.testing.assert_array_equal(np.stack(table["z"].to_numpy(zero_copy_only=False)),
                                  sampling.prior_latents(11, request["sample_id"].to_numpy(), model.latent_dim, 0.7))  # fmt: skip
    # the sampler's own entry point, and a request's row alone, agree
    alone, _ = sampling.sample(model, labels[3:4], 11, 0.7, request["sample_id"].to_numpy()[3:4])
    np.testing.assert_array_equal(alone, pixels[3:4])
    # the epoch picture of samples: sample j of SAMPLES_SEED at temperature 1, row r of class r
    pictures = EpochPictures(model, G.read_images(table), labels, tuple(map(str, range(10))))
    y = np.repeat(np.arange(10), 8)
    served, _, _ = generate_images(model, pd.DataFrame({"label": y, "seed": SAMPLES_SEED, "sample_id": np.arange(80)}))
    np.testing.assert_array_equal(pictures.sample_images(y, 80), served)
    with pytest.raises(ValueError, match="seed -1 is negative"):
        generate_images(model, pd.DataFrame({"label": [1], "seed": [-1]}))


@pytest.mark.slow
def test_pyfunc_loads_in_a_fresh_process_and_predicts_the_requested_labels(registered):
    uri, model, _ = registered
    script = (
        "import json, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/vaedist-mnist@champion')\n"
        f"out = m.predict(pd.DataFrame({REQUEST.to_dict('list')!r}))\n"
        "print(json.dumps({'labels': out['label'].tolist(), 'names': out['label_name'].tolist(),\n"
        "                  'pixels': [img.tolist() for img in out['image']]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected, _, _ = generate_images(model, REQUEST)
    assert got["labels"] == [3, 7, 0] and got["names"] == ["3", "7", "0"]
    assert np.array_equal(np.array(got["pixels"], dtype=np.uint8), expected)
    # The torch.export graph is logged beside it, for torch-only consumers: the same decoder.
    mlflow.set_tracking_uri(uri)
    run_id = mlflow.MlflowClient(uri).get_model_version("vaedist-mnist", "1").run_id
    graph = mlflow.pytorch.load_model(f"runs:/{run_id}/generator_graph")
    z, y = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 9])
    with torch.no_grad():
        assert torch.allclose(graph(z, y), model.generate(z, y), atol=1e-6)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_images_of_the_requested_labels(registered, tmp_path):
    uri, model, folder = registered
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/vaedist-mnist@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )  # fmt: skip  (the venv on PATH, as when it is activated: MLflow execs uvicorn from there)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not come up in 180 s"
            time.sleep(1)
        body = {"dataframe_records": REQUEST.to_dict("records"), "params": {"image_format": "png"}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
    finally:
        server.terminate()
        server.wait(30)
    expected, _, _ = generate_images(model, REQUEST)
    assert [p["label"] for p in predictions] == [3, 7, 0]
    for row, want in zip(predictions, expected, strict=True):
        png = base64.b64decode(row["image"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(np.array(Image.open(io.BytesIO(png)))[..., None], want)


@pytest.mark.slow
def test_experiments_open_as_model_training_and_runs_record_their_data(registered):
    """MLflow's UI opens an experiment by its kind; the Dataset column lists a run's dataset inputs."""
    from vaedist.data import get_spec
    from vaedist.train import log_training_data

    uri, _, _ = registered
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("vaedist/mnist")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run_id = tracking.find_run("mnist", "served")
    log_training_data(run_id, experiment_from_dict(CVAE))
    inputs = client.get_run(run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in inputs}
    assert sorted(contexts) == ["train", "validation"]
    assert [contexts[c][0] for c in ("train", "validation")] == ["mnist-train", "mnist-validation"]
    assert len({digest for _, digest in contexts.values()}) == 2  # two splits, two digests
    assert all(i.dataset.source_type == "http" and "ossci" in i.dataset.source for i in inputs)
    # The digest follows the data and the split rule: another validation size is another dataset.
    log_training_data(run_id, experiment_from_dict({**CVAE, "data": {"dataset": "mnist", "val_size": 2000}}))
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 4
    assert len(get_spec("mnist").fingerprint) == 16 and get_spec("mnist").fingerprint != get_spec("fashion-mnist").fingerprint


@pytest.mark.slow
def test_registration_keeps_mlflow_prints_off_the_terminal(registered, capfd, monkeypatch):
    """MLflow prints "Successfully registered model" / "Created version" on every registration; vaedist
    says what it registered itself, so those lines are dropped unless verbose."""
    from vaedist.champion import register_checkpoint

    monkeypatch.delenv("VAEDIST_VERBOSE", raising=False)
    _, _, folder = registered
    run_id = tracking.find_or_create_run("mnist", "served again", {}, kind="train")
    capfd.readouterr()
    model_uri, version, _, _ = register_checkpoint(str(folder / "ckpt"), run_id, "mnist")
    err = capfd.readouterr().err
    assert version == "2" and model_uri == "models:/vaedist-mnist/2"  # it did register
    assert "registered model" not in err.lower() and "Created version" not in err, err
