"""vaedist checkpoints: one ``model.pt`` holding hparams + weights, loadable with ``weights_only=True``.

Plain torch, no Ray or MLflow: training writes these, generate/evaluate read them, whether they come
from Ray's storage, an MLflow model (``tracking.resolve_checkpoint``) or a path the user gives, or as the
bytes a Ray worker received (:func:`load_model` takes either).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from vaedist.errors import UsageError, first_line
from vaedist.models import BaseVAE, build_model_from_hparams

CHECKPOINT_FILE = "model.pt"


def dataset_facts(dataset: str | None) -> dict[str, Any]:
    """What a model keeps of its data: name, fingerprint and class names, so that generation names its
    rows and evaluation checks its data even where the user's folder is gone. {} where unknown."""
    if not dataset:
        return {}
    from vaedist.data import get_spec

    try:
        spec = get_spec(dataset)
    except UsageError:
        return {}
    return {"name": spec.name, "fingerprint": spec.fingerprint, "class_names": list(spec.class_names)}


def save_checkpoint(path: Path, model: BaseVAE, optimizer, epoch: int, cfg_flat: dict, metrics: dict) -> None:
    torch.save(
        {
            "dataset": dataset_facts(cfg_flat.get("data.dataset")),
            "hparams": model.hparams,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "epoch": epoch,
            "config": dict(cfg_flat),
            "metrics": dict(metrics),
        },
        path,
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


def load_model(source: str | Path | bytes) -> tuple[BaseVAE, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a ``model.pt`` path or its bytes."""
    ckpt = load_checkpoint(source)
    if not isinstance(ckpt, dict) or "hparams" not in ckpt or "state_dict" not in ckpt:
        raise UsageError(f"{_where(source)} is not a vaedist checkpoint (no hparams/state_dict)")
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
