"""The model registry: log a finished run's best checkpoint as an MLflow model, register it, and decide
whether it becomes the ``champion`` of its dataset (re-scoring both models side by side when their
validation numbers were measured on different data)."""

from __future__ import annotations

import contextlib
import logging
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedist import loop, model_registry, tracking
from vaedist.checkpoint import load_model
from vaedist.data import get_spec, load_split
from vaedist.data.spec import DEFAULT_VAL_SIZE, split_digest
from vaedist.models import BaseVAE
from vaedist.names import CHECKPOINT_FILE, MODEL_TAG, VAL_METRIC, VERSION_TAG

log = logging.getLogger("vaedist.champion")


class Verdict(Enum):
    """What to do with a newly registered version, given the current champion."""

    PROMOTE = "promote"  # no champion yet, or the new version is better on the same validation set
    KEEP = "keep"  # the champion is at least as good (or already this version)
    RESCORE = "rescore"  # measured on different validation sets: score both on the new one, then compare


def judge(
    new_metric: float, new_val_set: str, champion: tuple[str, float, str] | None, version: str
) -> Verdict:
    """The champion decision on plain values. ``champion``: (version, -ELBO, validation set) or None.

    Lower -ELBO is better; only numbers measured on the same validation set (the split's identity: the
    data's fingerprint with the split rule; binarized or 8-bit, :func:`validation_set`) compare directly.
    """
    if champion is None:
        return Verdict.PROMOTE
    champ_version, champ_metric, champ_val_set = champion
    if champ_version == str(version):
        return Verdict.KEEP
    if champ_val_set != new_val_set:
        return Verdict.RESCORE
    return Verdict.PROMOTE if new_metric < champ_metric else Verdict.KEEP


def promote_if_better(dataset: str, version: str, val_metric: float, val_set: str, rescore) -> bool:
    """Move ``champion`` to ``version`` if it beats the current one; True if it moved.

    ``rescore(champion model URI)`` scores both models on this version's validation set and returns
    (this one's, the champion's), or None when they cannot be compared at all: then the champion stays.
    """
    champion = model_registry.current_champion(dataset)
    verdict = judge(val_metric, val_set, champion, version)
    if verdict is Verdict.RESCORE:
        scores = rescore(f"models:/{tracking.registered_model_name(dataset)}/{champion[0]}")
        if scores is None:
            return False
        verdict = Verdict.PROMOTE if scores[0] < scores[1] else Verdict.KEEP
    if verdict is Verdict.PROMOTE:
        model_registry.set_champion(dataset, version)
    return verdict is Verdict.PROMOTE



class Generator(torch.nn.Module):
    """(z, label) -> images (B, C, H, W) in [0, 1]: the part of a VAE that MLflow serves."""

    def __init__(self, model: BaseVAE):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.generate(z, label if self.model.conditional else None)


def register_checkpoint(checkpoint: Any, run_id: str, dataset: str) -> tuple[str, str, bool, float]:
    """Log a checkpoint's generator to ``run_id``, register it, move ``champion`` if it is better.

    Once per run: a run that already registered its model (a rerun of a finished search, a search resumed
    after its registration) gets that version back, so reruns never pile up duplicate versions (and a
    pipeline's generate step, keyed on the version, finds its finished output).
    ``checkpoint``: a local checkpoint folder, or anything with ``as_directory()`` (a Ray Train Checkpoint,
    possibly in s3://), so this module needs no Ray. Returns (model URI, version, became champion,
    validation -ELBO).
    """
    registered = model_registry.registered_model_of_run(run_id, MODEL_TAG, VERSION_TAG)
    if registered is not None:
        model_uri, version, val_metric, val_set = registered
        rescore = champion_rescorer(lambda: tracking.resolve_checkpoint(model_uri))
        moved = promote_if_better(dataset, version, val_metric, val_set, rescore)
        return model_uri, version, moved, val_metric
    local = (
        checkpoint.as_directory()
        if hasattr(checkpoint, "as_directory")
        else contextlib.nullcontext(checkpoint)
    )
    with local as d:
        ckpt_file = Path(d) / CHECKPOINT_FILE
        model, state = load_model(ckpt_file)
        val_metric = float(state["metrics"][VAL_METRIC])
        val_set = validation_set(state, model)
        # Batch of 2: torch.export specialises a batch dimension of size 1 to a constant.
        z = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(0))
        example = (z, torch.arange(2, dtype=torch.int64)) if model.conditional else (z,)
        model_uri, version = model_registry.log_model(
            run_id, dataset, ckpt_file, Generator(model), example, val_metric, val_set
        )
        tracking.set_run_tags(run_id, {MODEL_TAG: model_uri, VERSION_TAG: version})
        moved = promote_if_better(dataset, version, val_metric, val_set, champion_rescorer(lambda: ckpt_file))
    return model_uri, version, moved, val_metric


def validation_set(ckpt: dict[str, Any], model: BaseVAE) -> str:
    """What a validation -ELBO was measured on: the validation split's identity (the training data's
    fingerprint with the split rule, the digest its run logged the split under) and the pixel coding (a
    Bernoulli model's nats on binarized pixels say nothing against a logistic model's on 8-bit ones).

    The checkpoint's own facts where it keeps them; a checkpoint from before them names its dataset in its
    config, whose spec gives the fingerprint. A version registered with the older "dataset/valN/coding"
    tag never equals this, so the champion verdict re-scores it (RESCORE), as for any other set."""
    facts, cfg = ckpt.get("dataset") or {}, ckpt.get("config") or {}
    fingerprint = facts.get("fingerprint") or get_spec(cfg["data.dataset"]).fingerprint
    val_size = (facts.get("validation") or {}).get("val_size", cfg.get("data.val_size", DEFAULT_VAL_SIZE))
    coding = "binarized" if model.likelihood.binarized else "8-bit"
    return f"{split_digest(fingerprint, 'validation', val_size)}/{coding}"


def champion_rescorer(new_checkpoint):
    """``rescore`` for ``promote_if_better``: both models' -ELBO on the new model's validation set.

    Run on the driver, one process and one set of random draws for both, so the two numbers compare;
    None (no comparison, the champion stays) when they code pixels differently.
    """

    def rescore(champion_uri: str) -> tuple[float, float] | None:
        new_model, state = load_model(new_checkpoint())
        champion, _ = load_model(tracking.resolve_checkpoint(champion_uri))
        if (champion.likelihood.binarized, champion.image_shape) != (
            new_model.likelihood.binarized,
            new_model.image_shape,
        ):
            log.warning(
                f"[vaedist] not compared with the champion ({champion_uri}): it models "
                f"{'binarized' if champion.likelihood.binarized else '8-bit'} pixels, this model "
                f"{'binarized' if new_model.likelihood.binarized else '8-bit'} ones, so their -ELBOs do not compare; "
                "the champion stays (move the alias in the MLflow UI if you mean to)"
            )
            return None
        cfg = state["config"]
        seed = int(cfg.get("train.seed", 0))
        x, y = (torch.from_numpy(np.array(a)) for a in load_split(
            cfg["data.dataset"], "val", val_size=int(cfg["data.val_size"]), progress=False
        ))  # fmt: skip
        scores = []
        for model in (new_model, champion):
            torch.manual_seed(seed)  # the same eps draws for both
            sums = loop.evaluate(model, x, y, np.arange(len(x)), 512, seed, torch.device("cpu"))
            scores.append(loop.Sums.means(sums.as_tensor(), int(np.prod(model.image_shape)))["neg_elbo"])
        log.info(f"[vaedist] champion {champion_uri} re-scored on this model's validation set: "
                 f"{scores[1]:.2f} vs {scores[0]:.2f} nats")  # fmt: skip
        return scores[0], scores[1]

    return rescore
