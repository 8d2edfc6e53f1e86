"""vaedist checkpoints: one ``model.pt`` holding hparams + weights, loadable with ``weights_only=True``.

A checkpoint is its model's one source of facts (docs/ARCHITECTURE.md, "A model's facts"): the training
data's (:func:`dataset_facts`, computed once by the training worker's set-up) and the sampler's
(:func:`sampling_facts`); :func:`header` reads them without the data, and without building the model.

Plain torch, no Ray or MLflow, nothing of ``vaedist.data``: training writes these, generate/evaluate read them, whether they come
from Ray's storage, an MLflow model (``tracking.resolve_checkpoint``) or a path the user gives, or as the
bytes a Ray worker received (:func:`load_model` takes either).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedist.errors import UsageError, first_line
from vaedist.models import BaseVAE, build_model_from_hparams


def dataset_facts(
    name: str, fingerprint: str, class_names, train_labels=None, val_size: int | None = None
) -> dict[str, Any]:
    """What a model keeps of its data, computed once by training's set-up: name, fingerprint, class names,
    ``class_counts`` (rows per class of the official training set, train and validation rows together:
    the frequencies ``--class-balance as-train`` follows; from ``train_labels``, int (N,), where given) and
    the validation rule (``{"val_size": N}``: the seeded hold-out ``data.val_size`` of the train config).
    Generation, serving and evaluation read these instead of reopening the data, so a model keeps working
    with its training folder gone."""
    facts: dict[str, Any] = {"name": name, "fingerprint": fingerprint, "class_names": list(class_names)}
    if train_labels is not None:
        labels = np.asarray(train_labels, dtype=np.int64)
        facts["class_counts"] = np.bincount(labels[labels >= 0], minlength=len(facts["class_names"])).tolist()
    if val_size is not None:
        facts["validation"] = {"val_size": int(val_size)}
    return facts


def sampling_facts(model: BaseVAE) -> dict[str, Any]:
    """What sampling needs to know of a model without building it: the decoder's z size (a hierarchical
    model's is not in its hparams), whether it takes labels, its classes and image shape."""
    return {
        "latent_dim": int(model.latent_dim),
        "conditional": bool(model.conditional),
        "num_classes": int(model.num_classes),
        "image_shape": [int(d) for d in model.image_shape],
        "variant": str(model.hparams.get("variant")),
    }


def save_checkpoint(
    path: Path, model: BaseVAE, optimizer, epoch: int, cfg_flat: dict, metrics: dict, facts: dict | None = None
) -> None:
    """``facts``: :func:`dataset_facts` of the training data ({} where unknown)."""
    torch.save(
        {
            "dataset": dict(facts or {}),
            "model": sampling_facts(model),
            "hparams": model.hparams,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "epoch": epoch,
            "config": dict(cfg_flat),
            "metrics": dict(metrics),
        },
        path,
    )


@dataclass(frozen=True)
class ModelHeader:
    """A checkpoint's facts, read without the weights mattering: the model's shape and its data's."""

    latent_dim: int
    conditional: bool
    num_classes: int
    image_shape: tuple[int, int, int]
    variant: str
    dataset: str | None  # the training config's data.dataset
    fingerprint: str = ""  # "" for checkpoints that do not keep it
    class_names: tuple[str, ...] = ()  # () for checkpoints that do not keep them
    class_counts: tuple[int, ...] = ()  # rows per class of the training set; () where not kept
    validation: dict[str, Any] = field(default_factory=dict)


def header(ckpt: dict[str, Any]) -> ModelHeader:
    """The facts of a checkpoint dict (:func:`load_checkpoint`). Checkpoints written before the model's
    facts were kept are rebuilt once (without their weights) to learn them."""
    model = ckpt.get("model")
    if not isinstance(model, dict) or "latent_dim" not in model:
        model = sampling_facts(build_model_from_hparams(ckpt["hparams"]))
    data = ckpt.get("dataset") or {}
    return ModelHeader(
        latent_dim=int(model["latent_dim"]),
        conditional=bool(model["conditional"]),
        num_classes=int(model["num_classes"]),
        image_shape=tuple(int(d) for d in model["image_shape"]),
        variant=str(model["variant"]),
        dataset=trained_dataset(ckpt),
        fingerprint=str(data.get("fingerprint", "")),
        class_names=tuple(data.get("class_names") or ()),
        class_counts=tuple(int(c) for c in data.get("class_counts") or ()),
        validation=dict(data.get("validation") or {}),
    )


def _where(source: str | Path | bytes) -> str:
    return f"checkpoint data ({len(source)} bytes)" if isinstance(source, bytes | bytearray) else str(source)


def load_checkpoint(source: str | Path | bytes) -> dict[str, Any]:
    """The checkpoint dict from a path or a ``model.pt``'s bytes; weights only, so a checkpoint from
    elsewhere cannot run code on load."""
    f = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # not a torch file; code inside
        first = first_line(exc)
        raise UsageError(f"{_where(source)} is not a readable vaedist checkpoint ({first})") from None


def load_vaedist_checkpoint(source: str | Path | bytes) -> dict[str, Any]:
    """:func:`load_checkpoint`, checked to be vaedist's (hparams and weights)."""
    ckpt = load_checkpoint(source)
    if not isinstance(ckpt, dict) or "hparams" not in ckpt or "state_dict" not in ckpt:
        raise UsageError(f"{_where(source)} is not a vaedist checkpoint (no hparams/state_dict)")
    return ckpt


def load_model(source: str | Path | bytes) -> tuple[BaseVAE, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a ``model.pt`` path or its bytes."""
    ckpt = load_vaedist_checkpoint(source)
    model = build_model_from_hparams(ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def load_worker_model(
    source: str | Path | bytes, threads: int, use_gpu: bool
) -> tuple[BaseVAE, torch.device]:
    """A Ray worker's copy of the model and its device: torch runs as many threads as the CPUs the worker
    holds (``threads``), on CUDA where the worker was given a GPU and one is visible, else on the CPU."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model, _ = load_model(source)
    return model.to(device), device


def trained_dataset(ckpt: dict[str, Any]) -> str | None:
    """The dataset a checkpoint's model was trained on (its config's ``data.dataset``, else the hparams'),
    or None where it does not say."""
    cfg = ckpt.get("config") or {}
    hparams = ckpt.get("hparams") or {}
    dataset = cfg.get("data.dataset") or hparams.get("dataset")
    return str(dataset) if dataset else None
