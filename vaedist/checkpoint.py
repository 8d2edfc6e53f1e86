"""vaedist checkpoints: one ``model.pt`` holding hparams + weights, loadable with ``weights_only=True``.

Plain torch, no Ray or MLflow: training writes these, generate/evaluate read them, whether they come
from Ray's storage, an MLflow model (``tracking.resolve_checkpoint``) or a path the user gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaedist.errors import UsageError, first_line
from vaedist.models import BaseVAE, build_model_from_hparams

CHECKPOINT_FILE = "model.pt"


def save_checkpoint(path: Path, model: BaseVAE, optimizer, epoch: int, cfg_flat: dict, metrics: dict) -> None:
    torch.save(
        {
            "hparams": model.hparams,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "epoch": epoch,
            "config": dict(cfg_flat),
            "metrics": dict(metrics),
        },
        path,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; weights only, so a checkpoint from elsewhere cannot run code on load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        first = first_line(exc)
        raise UsageError(f"{path} is not a readable vaedist checkpoint ({first})") from None


def load_model(path: str | Path) -> tuple[BaseVAE, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a ``model.pt``."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "hparams" not in ckpt or "state_dict" not in ckpt:
        raise UsageError(f"{path} is not a vaedist checkpoint (no hparams/state_dict)")
    model = build_model_from_hparams(ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
