"""The audit's feature space: a domain classifier's pooled convolutional features, trained once, kept in MLflow.

There are no Inception weights on these machines, so the audit's Fréchet distance is *not* FID: it is
the Fréchet distance in the features of :class:`vaedist.evaluate.CASClassifier` (the CAS classifier,
with the CAS recipe: epochs, batch size, lr, seed) trained on the dataset's real training images: the
global average pool of its last convolutional block, 64-d, the place FID takes Inception's features
from (pool3), rather than its 128-unit hidden layer (:class:`ClassifierFeatures` says why). The
classifier trains through Ray Train (DDP, like CAS) once per dataset fingerprint and recipe; its weights
go into an MLflow run of the dataset's experiment named by both (:func:`extractor_run_name`), and every
later audit with the same recipe loads them from there.

The extractor is pluggable: ``--features FILE`` takes any module saved with ``torch.export.save`` (a
``.pt2`` program) or ``torch.jit.save`` (TorchScript) that maps float images (B, C, H, W) in [0, 1] to
features (B, D), e.g. an InceptionV3 pool3 wrapper that resizes to 299 x 299 (then the distance *is* an
FID). Neither format unpickles code.

Features are computed by Ray tasks over contiguous image shards (:func:`extract_on_ray`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedist import console, tracking
from vaedist.config import EvaluateConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.evaluate import spread
from vaedist.evaluate.cas import (
    CLASSIFIER_VERSION,
    CASClassifier,
    accuracy_of,
    classifier_config,
    fit_in_task,
    fit_on_worker,
)
from vaedist.models import to_model_input
from vaedist.names import EVALUATE_TAG, FEATURES_TAG

FEATURES_VERSION = 1  # bump when the layer taken or the extractor's training changes: numbers move with it
EXTRACTOR_ARTIFACT = "feature_extractor/classifier.json"  # the weights (torch.save, base64) and their facts
EXTRACT_BATCH = 128  # images per forward pass: small batches stay in cache (~2x the images/s of 1000 here)


class ClassifierFeatures(nn.Module):
    """CASClassifier's last convolutional block, averaged over space: images (B, C, H, W) in [0, 1] ->
    (B, 64, H/4, W/4) -> (B, 64), like Inception's pool3 for FID. Built in eval mode (dropout off).

    Why not the 128-unit hidden layer (the classifier's penultimate): there, uniform noise lands in one
    tight cluster that the k-NN balls of a few outlying real digits happen to reach or not, so its precision
    depends on which training images the reference sample holds. Measured on MNIST (1-epoch classifier,
    5,000 noise images against seeded samples of 5,000 training images): noise precision 0.02 to 0.88 over
    4 samples in the hidden layer (before or after its ReLU), 0.000 in each of 10 in the pooled features;
    real test images 0.96 and 0.97. The pooled features also keep more of the style within a class (stroke,
    slant), which the hidden layer, trained to tell classes apart, discards.
    """

    num_features = 64  # torchmetrics reads this instead of running a dummy image

    def __init__(self, classifier: CASClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x).mean(dim=(2, 3))  # (B, 64, H/4, W/4) -> (B, 64)


@dataclass(frozen=True)
class Extractor:
    """A feature extractor as it travels to Ray tasks: bytes, and what they are."""

    kind: str  # "classifier" (ClassifierFeatures weights), "export" (torch.export .pt2) or "torchscript"
    blob: bytes
    description: str  # said in the output: what the distance is measured in
    digest: str  # names the feature space: part of every audit's run name

    def build(self) -> nn.Module:
        """The module, in eval mode (in the process that computes features)."""
        if self.kind == "classifier":
            saved = torch.load(io.BytesIO(self.blob), weights_only=True)
            net = CASClassifier(tuple(saved["image_shape"]), int(saved["num_classes"]))
            net.load_state_dict(saved["state_dict"])
            return ClassifierFeatures(net).to(memory_format=torch.channels_last)  # ~25% faster convs on CPU
        if self.kind == "export":
            return torch.export.load(io.BytesIO(self.blob)).module()
        with warnings.catch_warnings():  # deprecated in torch 2.13, but FID's Inception weights ship this way
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(io.BytesIO(self.blob)).eval()


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def recipe(cfg: EvaluateConfig) -> dict[str, Any]:
    """The CAS recipe the extractor is trained with: it, the dataset's fingerprint and the versions name it."""
    return {"epochs": cfg.classifier_epochs, "batch_size": cfg.classifier_batch_size, "lr": cfg.classifier_lr,
            "seed": cfg.seed, "classifier_version": CLASSIFIER_VERSION, "features_version": FEATURES_VERSION}  # fmt: skip


def extractor_run_name(dataset: str, cfg: EvaluateConfig) -> str:
    return (
        f"audit-features-{dataset}-{_digest({'fingerprint': get_spec(dataset).fingerprint, **recipe(cfg)})}"
    )


def classifier_digest(dataset: str, cfg: EvaluateConfig) -> str:
    """Names the classifier's feature space before it exists (audit run names are known before Ray starts)."""
    return extractor_run_name(dataset, cfg).rsplit("-", 1)[-1]


def describe_classifier(dataset: str, cfg: EvaluateConfig) -> str:
    return (f"pooled last conv block (64-d) of CASClassifier v{CLASSIFIER_VERSION} trained on real {dataset} "
            f"({cfg.classifier_epochs} epoch(s), batch {cfg.classifier_batch_size}, lr {cfg.classifier_lr:g}, "
            f"seed {cfg.seed}): a Fréchet distance in a domain classifier's features, not Inception FID")  # fmt: skip


def custom_extractor(path: str) -> Extractor:
    """A user's extractor file (torch.export ``.pt2`` or TorchScript), checked loadable; UsageError if not."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"feature extractor {path} does not exist (a torch.export .pt2 or TorchScript file)")
    blob = file.read_bytes()
    for kind in ("export", "torchscript"):
        candidate = Extractor(kind, blob, f"{file.name} (user-supplied feature extractor)",
                              hashlib.sha1(blob).hexdigest()[:10])  # fmt: skip
        try:
            candidate.build()
            return candidate
        except (
            Exception
        ):  # either loader refuses the other's format (each raises its own types): try the next
            continue
    raise UsageError(f"feature extractor {path} is neither a torch.export program nor TorchScript")


# --------------------------------------------------------------------------------------------------
# Training the classifier (one Ray task, or Ray Train on several workers) and keeping it in MLflow


def _weights(net: nn.Module, config: dict[str, Any]) -> bytes:
    """The trained extractor as ``torch.save`` bytes: state dict, image shape, classes."""
    plain = getattr(net, "module", net)  # DDP wraps the model when world > 1
    state = {k: v.cpu() for k, v in plain.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "image_shape": list(config["image_shape"]),
                "num_classes": config["num_classes"]}, buf)  # fmt: skip
    return buf.getvalue()


def extractor_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the CAS classifier's training (its own epoch loop, DDP) on the real
    training split; rank 0 reports test accuracy and the weights (state dict) as the checkpoint."""
    import ray.train

    from vaedist.worker import is_rank_zero

    if ray.train.get_checkpoint() is not None:
        return  # finished before under this name: Ray Train hands back the reported result
    fit = fit_on_worker(config)  # the CAS recipe, shared
    metrics = {"accuracy": accuracy_of(fit.confusion)}
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if is_rank_zero():
            (Path(d) / "classifier.pt").write_bytes(_weights(fit.net, config))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=spread.RESULT_DIR)


def extractor_task(config: dict[str, Any]) -> tuple[bytes, float]:
    """The extractor trained on one worker, as a Ray task: (weights, test accuracy)."""
    fit = fit_in_task(config)
    return _weights(fit.net, config), accuracy_of(fit.confusion)


def train_extractor(name: str, dataset: str, cfg: EvaluateConfig, plan, storage: str) -> tuple[bytes, float]:
    """(classifier weights as torch.save bytes, its real test accuracy): CASClassifier trained on every
    real training image of ``dataset``, in one Ray task on one worker, by a TorchTrainer on several."""
    spec = get_spec(dataset)
    config = classifier_config(load_split(dataset, "train_full"), load_split(dataset, "test"), spec.image_shape,
                               spec.num_classes, cfg, plan)  # fmt: skip
    if plan.workers == 1:  # the weights come back as the task's value; MLflow keeps them (no storage)
        return spread.on_one_worker(extractor_task, config, plan, f"feature classifier {name} failed")
    import ray.train.torch

    trainer = ray.train.torch.TorchTrainer(
        extractor_loop_per_worker,
        train_loop_config=config,
        scaling_config=plan.scaling_config(),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, logging_config=console.train_logging_config()),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise VaedistError(
            f"feature classifier {name} failed: {first_line(exc)} (logs under {storage}/{name})"
        ) from None
    if result.checkpoint is None or "accuracy" not in (result.metrics or {}):
        raise VaedistError(f"feature classifier {name} reported no weights (see {storage}/{name})")
    with result.checkpoint.as_directory() as d:
        return (Path(d) / "classifier.pt").read_bytes(), float(result.metrics["accuracy"])


def classifier_extractor(dataset: str, cfg: EvaluateConfig, plan, storage: str, echo) -> Extractor:
    """The dataset's extractor for this recipe: read from its MLflow run, or trained now and kept there."""
    name = extractor_run_name(dataset, cfg)
    extractor = Extractor(
        "classifier", b"", describe_classifier(dataset, cfg), classifier_digest(dataset, cfg)
    )
    found = tracking.finished_result(dataset, name, EXTRACTOR_ARTIFACT)
    if found is not None:
        run_id, kept = found
        echo(f"  feature extractor: {name} from MLflow run {run_id} (test accuracy {kept['accuracy']:.4f})")
        return Extractor(**{**extractor.__dict__, "blob": base64.b64decode(kept["weights"])})
    if plan.workers > 1:
        from vaedist.cluster import check_storage_shared

        check_storage_shared(storage)  # rank 0's report carries the weights, written where every node sees it
    echo(f"  feature extractor: training {name} on every real {dataset} training image (once per recipe)")
    t0 = time.perf_counter()
    params = {f"features.{k}": v for k, v in recipe(cfg).items()} | {
        "features.dataset": dataset,
        "features.fingerprint": get_spec(dataset).fingerprint,
    }
    run_id = tracking.find_or_create_run(dataset, name, params, kind="evaluate")
    try:
        blob, accuracy = train_extractor(name, dataset, cfg, plan, storage)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    logger = tracking.RunLogger(run_id, tracking.tracking_uri())
    logger.set_tags({EVALUATE_TAG: "audit-features", FEATURES_TAG: extractor.description})
    logger.log_metrics({"features_test_accuracy": accuracy}, step=0)
    # As JSON through tracking's log_dict/load_dict: tracking.py has no binary-artifact helper (yet).
    logger.log_dict({"accuracy": accuracy, "recipe": recipe(cfg), "dataset": dataset,
                     "weights": base64.b64encode(blob).decode()}, EXTRACTOR_ARTIFACT)  # fmt: skip
    tracking.end_run(run_id, "FINISHED")
    echo(f"  feature extractor trained: test accuracy {accuracy:.4f}  [{time.perf_counter() - t0:.0f}s]; "
         f"MLflow run {run_id}")  # fmt: skip
    return Extractor(**{**extractor.__dict__, "blob": blob})


# --------------------------------------------------------------------------------------------------
# Computing features (Ray tasks over image shards)


@torch.inference_mode()
def features_of(
    module: nn.Module, images: np.ndarray, batch: int = EXTRACT_BATCH, device: str = "cpu"
) -> np.ndarray:
    """float32 (N, D) features of uint8 images (N, H, W, C), ``batch`` images per forward pass."""
    module, parts = module.to(device), []
    for start in range(0, len(images), batch):
        x = to_model_input(
            torch.from_numpy(np.array(images[start : start + batch]))
        )  # (B, C, H, W) in [0, 1]
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        parts.append(module(x).flatten(1).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _extract_shard(extractor: Extractor, images: np.ndarray, which: int, start: int, stop: int, threads: int,
                   use_gpu: bool):  # fmt: skip
    """One Ray task: (which image set, first row, features of rows [start, stop))."""
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return which, start, features_of(extractor.build(), images[start:stop], device=device)


def extract_on_ray(extractor: Extractor, image_sets: list[np.ndarray], plan) -> list[np.ndarray]:
    """Features float32 (N_i, D) of every uint8 image set (N_i, H, W, C): each set split into one
    contiguous shard per worker, every shard a Ray task, the parts put back in row order."""
    import ray

    shared = ray.put(extractor)
    task = ray.remote(_extract_shard).options(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)
    pending = []
    for which, images in enumerate(image_sets):
        ref = ray.put(np.ascontiguousarray(images))
        for rows in np.array_split(np.arange(len(images)), max(1, min(plan.workers, len(images)))):
            if len(rows):
                pending.append(task.remote(shared, ref, which, int(rows[0]), int(rows[-1]) + 1, plan.torch_threads,
                                           plan.use_gpu))  # fmt: skip
    parts: list[list[tuple[int, np.ndarray]]] = [[] for _ in image_sets]
    for which, start, feats in spread.as_done(pending, "feature extraction failed in a Ray task"):
        parts[which].append((start, feats))
    return [np.concatenate([f for _, f in sorted(p, key=lambda item: item[0])]) for p in parts]
