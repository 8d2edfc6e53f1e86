"""Checkpoint loading: one ``load_model`` for a path or the bytes a Ray worker receives, weights only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vaedist.checkpoint import (
    dataset_facts,
    header,
    load_checkpoint,
    load_model,
    load_worker_model,
    save_checkpoint,
    trained_dataset,
)
from vaedist.config import ModelConfig
from vaedist.errors import UsageError
from vaedist.models import build_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="cvae", arch="dense", width=32, depth=1, latent_dim=3), (28, 28, 1), 10,
                        "bernoulli")  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model.eval(), None, 2, {"data.dataset": "fashion-mnist"}, {"val_neg_elbo": 1.0})
    return path


def test_a_path_and_its_bytes_give_the_same_model(ckpt):
    from_path, meta = load_model(ckpt)
    from_bytes, meta_b = load_model(ckpt.read_bytes())
    assert not from_path.training and not from_bytes.training
    assert meta["epoch"] == meta_b["epoch"] == 2 and meta["metrics"] == {"val_neg_elbo": 1.0}
    z, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    with torch.no_grad():
        assert torch.equal(from_path.generate(z, y), from_bytes.generate(z, y))  # (4, 1, 28, 28)
    threads = torch.get_num_threads()
    try:
        model, device = load_worker_model(ckpt.read_bytes(), threads=1, use_gpu=False)
        assert device == torch.device("cpu") and torch.get_num_threads() == 1  # the worker's CPUs
    finally:
        torch.set_num_threads(threads)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_the_dataset_a_model_was_trained_on(ckpt):
    _, meta = load_model(ckpt)
    assert trained_dataset(meta) == "fashion-mnist"
    assert trained_dataset({"config": {}, "hparams": {"dataset": "mnist"}}) == "mnist"
    assert trained_dataset({"config": {"data.dataset": ""}, "hparams": {}}) is None
    assert trained_dataset({}) is None


def test_a_checkpoint_carries_its_model_and_data_facts(tmp_path):
    """The one source of a model's facts: read from the header, without the data and without the model."""
    torch.manual_seed(0)
    ladder = build_model(ModelConfig(variant="vae", arch="conv", base_channels=8, latent_dim=3, depth=2,
                                     stochastic_layers=2), (28, 28, 1), 10, "bernoulli")  # fmt: skip
    labels = np.array([0, 0, 2, 1, 2, 2, -1])  # -1: an unlabelled row, counted nowhere
    facts = dataset_facts("pets", "f1ng3r", ("cat", "dog", "eel"), labels, 500)
    assert facts == {"name": "pets", "fingerprint": "f1ng3r", "class_names": ["cat", "dog", "eel"],
                     "class_counts": [2, 1, 3], "validation": {"val_size": 500}}  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", ladder.eval(), None, 1, {"data.dataset": "/data/pets"}, {}, facts)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    del ckpt["hparams"], ckpt["state_dict"]  # no model to build: the header alone answers
    head = header(ckpt)
    assert head.latent_dim == ladder.latent_dim != ladder.hparams["latent_dim"]  # a ladder's z is all its layers'
    assert (head.conditional, head.num_classes, head.image_shape, head.variant) == (False, 10, (28, 28, 1), "vae")
    assert (head.dataset, head.fingerprint, head.class_names) == ("/data/pets", "f1ng3r", ("cat", "dog", "eel"))
    assert head.class_counts == (2, 1, 3) and head.validation == {"val_size": 500}


def test_a_checkpoint_without_the_facts_still_gives_its_header(ckpt):
    """Checkpoints written before models kept their facts: the model's are rebuilt, the data's are empty."""
    old = load_checkpoint(ckpt)
    del old["model"]
    old["dataset"] = {}
    head = header(old)
    assert (head.latent_dim, head.conditional, head.num_classes, head.image_shape) == (3, True, 10, (28, 28, 1))
    assert head.dataset == "fashion-mnist" and head.class_names == () and head.class_counts == () and not head.fingerprint


class _Payload:
    """A pickled object: loading it would run code, so weights-only loading must refuse it."""


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=r"junk.pt is not a readable vaedist checkpoint"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match=r"checkpoint data \(9 bytes\) is not a readable vaedist checkpoint"):
        load_model(b"not a zip")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match=r"other.pt is not a vaedist checkpoint \(no hparams/state_dict\)"):
        load_model(tmp_path / "other.pt")
    torch.save({"hparams": _Payload(), "state_dict": {}}, tmp_path / "code.pt")
    with pytest.raises(
        UsageError, match=r"code.pt is not a readable vaedist checkpoint \(Weights only load failed"
    ):
        load_model(tmp_path / "code.pt")
