"""Test-set likelihood of a model (``vaedist evaluate likelihood``): -ELBO, IW-NLL(k), bits/dim.

Negative ELBO (one z per image) and the importance-weighted NLL (Burda et al. 2016, eq. 8, ``k`` samples)
on the real test set, in nats per image and in bits per dimension (``nats / (D ln 2)``). The protocol
follows the likelihood, so the numbers compare with the literature:
- Bernoulli models see the test set *dynamically binarized once with a fixed seed* (each pixel a
  Bernoulli(intensity) draw), the protocol of the MNIST numbers of Burda et al. 2016 (VAE 86.76 nats,
  IWAE k=50 84.78);
- discretized logistic/Gaussian models see the 8-bit images as they are: bits/dim compare with the
  CIFAR-10 literature.
A conditional model is scored as ``-log p(x | y)`` with the true test label: label-conditioned, lower than
an unconditional ``-log p(x)`` by at most ``log K`` nats.

The test set is split into contiguous, batch-aligned shards, one Ray task per worker (why tasks:
:mod:`vaedist.evaluate.spread`); each task loads the model once. Every batch draws its z from a generator
seeded by (seed, first row of the batch), so the split evaluation gives exactly the numbers of one
unsplit pass (:func:`score_images`). :mod:`vaedist.evaluate.entry` logs the figures on the model's
own MLflow run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedist import loop, tracking
from vaedist.checkpoint import load_model, load_worker_model, trained_dataset
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError
from vaedist.evaluate import spread
from vaedist.generate.format import shape_text
from vaedist.models import BaseVAE, binarize, bits_per_dim, to_model_input


def prepare_test_images(images: np.ndarray, binarized: bool, seed: int) -> np.ndarray:
    """Test images in the model's protocol, still uint8 (N, H, W, C).

    Bernoulli models: one dynamic binarization of the whole set, drawn with ``seed`` (the same seed
    gives the same set, whatever the number of workers), stored as {0, 255} so that
    ``to_model_input`` yields exactly {0., 1.}. Other likelihoods: the 8-bit images unchanged.
    """
    if not binarized:
        return images
    x = to_model_input(torch.from_numpy(np.array(images)))  # (N, C, H, W) in [0, 1]
    xb = binarize(x, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W) in {0, 1}
    return (xb * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)


def batch_aligned_shards(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) covering ``range(n)``, one per worker, each starting on a
    multiple of ``batch_size`` so every shard forms the same batches as one unsplit pass."""
    n_batches = math.ceil(n / batch_size)
    parts = np.array_split(np.arange(n_batches), max(1, min(workers, n_batches)))
    return [(int(p[0]) * batch_size, min(n, (int(p[-1]) + 1) * batch_size)) for p in parts if len(p)]


@torch.no_grad()
def score_images(
    model: BaseVAE,
    images: np.ndarray,
    labels: np.ndarray,
    start: int,
    stop: int,
    *,
    k: int,
    k_batch: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Per-image ``neg_elbo``, ``recon``, ``kl`` and ``iw_nll`` (nats, float64 (stop - start,)) of rows
    [start, stop) of prepared test images (:func:`prepare_test_images`); ``labels`` int64 (N,).

    Plain PyTorch: the Ray tasks call this on their shard, tests on the whole set. Batch ``b`` covers
    rows [b, b + batch_size) and draws its z (the ELBO's one sample, then the k importance samples)
    from a generator seeded by (seed, b): results do not depend on how rows are sharded.
    """
    if start % batch_size:
        raise ValueError(f"start {start} is not a multiple of batch_size {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {"neg_elbo": [], "recon": [], "kl": [], "iw_nll": []}
    for b0 in range(start, stop, batch_size):
        b1 = min(b0 + batch_size, stop)
        x = to_model_input(torch.from_numpy(np.array(images[b0:b1]))).to(device)  # (B, C, H, W)
        y = (
            torch.from_numpy(np.array(labels[b0:b1], dtype=np.int64)).to(device)
            if model.conditional
            else None
        )
        g = torch.Generator(device=device).manual_seed(loop.derive_seed(seed, b0))
        # forward draws z layer by layer where the model is hierarchical (q(z_2) depends on z_1)
        out = model.loss_from_forward(x, model(x, y, generator=g))
        iw = model.iw_nll(x, y, k=k, chunk=k_batch, generator=g)  # (B,)
        for key, value in (("neg_elbo", out.neg_elbo), ("recon", out.recon), ("kl", out.kl), ("iw_nll", iw)):
            parts[key].append(value.double().cpu().numpy())
    return {key: np.concatenate(v) if v else np.zeros(0) for key, v in parts.items()}


def score_shard(
    checkpoint: bytes, images: np.ndarray, labels: np.ndarray, start: int, stop: int, options: dict
) -> dict[str, Any]:
    """One worker: load the model once, score rows [start, stop). Runs as a Ray task."""
    t0 = time.perf_counter()
    model, device = load_worker_model(checkpoint, options["threads"], options["use_gpu"])
    scores = score_images(
        model, images, labels, start, stop,
        k=options["k"], k_batch=options["k_batch"], batch_size=options["batch_size"], seed=options["seed"],
        device=device,
    )  # fmt: skip
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - t0, "scores": scores}


def load_for_likelihood(uri: str, dataset: str | None, allow_other_data: bool = False) -> tuple[Path, BaseVAE, dict, str]:
    """(checkpoint path, model, checkpoint dict, dataset) after checking the model can be scored on it: its
    shape, its classes, and (unless allowed) that the data is the data it was trained on, by fingerprint."""
    path = tracking.resolve_checkpoint(uri)
    model, ckpt = load_model(path)
    variant = getattr(model, "variant", "?")
    if not model.stochastic:
        raise UsageError(
            f"model {uri} is a plain autoencoder (variant {variant!r}): it has no posterior and no likelihood "
            "bound, so there is no ELBO or IW-NLL to report; evaluate a 'vae' or 'cvae'"
        )
    dataset = dataset or trained_dataset(ckpt)
    if dataset is None:
        raise UsageError(f"model {uri} does not record the dataset it was trained on: pass --dataset")
    spec = get_spec(dataset)
    if tuple(model.image_shape) != tuple(spec.image_shape):
        raise UsageError(
            f"model {uri} takes {shape_text(model.image_shape)} images but {dataset} images are "
            f"{shape_text(spec.image_shape)}"
        )
    if model.conditional and model.num_classes != spec.num_classes:
        raise UsageError(
            f"model {uri} is conditioned on {model.num_classes} classes but {dataset} has {spec.num_classes}"
        )
    trained_on = (ckpt.get("dataset") or {}).get("fingerprint")  # recorded since 0.5
    if trained_on and trained_on != spec.fingerprint and not allow_other_data:
        raise UsageError(
            f"model {uri} was trained on data with fingerprint {trained_on}, but {spec.name} is now {spec.fingerprint} "
            "(other files, classes or options): pass --allow-other-data to score it anyway"
        )
    return path, model, ckpt, dataset


def likelihood_metrics(scores: dict[str, np.ndarray], k: int, num_dims: int) -> dict[str, float]:
    """Means over images of per-image scores; bits/dim = nats / (D ln 2). ``test_bits_per_dim`` is the
    IW-NLL's (the tighter estimate), ``test_elbo_bits_per_dim`` the bound's."""
    n = len(scores["iw_nll"])
    iw, neg_elbo = float(scores["iw_nll"].mean()), float(scores["neg_elbo"].mean())
    stderr = float(scores["iw_nll"].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "test_neg_elbo": neg_elbo,
        "test_recon": float(scores["recon"].mean()),
        "test_kl": float(scores["kl"].mean()),
        "test_elbo_bits_per_dim": float(bits_per_dim(torch.tensor(neg_elbo, dtype=torch.float64), num_dims)),
        f"test_iw_nll_k{k}": iw,
        f"test_iw_nll_k{k}_stderr": stderr,
        "test_bits_per_dim": float(bits_per_dim(torch.tensor(iw, dtype=torch.float64), num_dims)),
    }


def logged_names(
    metrics: dict[str, float], dataset: str, trained_on: str | None, n: int, n_test: int
) -> dict:
    """The metrics under their MLflow names. Numbers on another dataset than the training one, or on part
    of the test set, must not pose as the model's test numbers: their names say what they are
    (test_fashion_mnist_..., test_first500_...)."""
    prefix = "test_" if dataset == trained_on else f"test_{dataset.replace('-', '_')}_"
    prefix += f"first{n}_" if n < n_test else ""
    return {prefix + key[len("test_") :]: value for key, value in metrics.items()}


# --------------------------------------------------------------------------------------------------
# The measure: set up (checks, data), then score on Ray; vaedist.evaluate.entry records it


@dataclass
class LikelihoodSetup:
    """One likelihood evaluation, checked and with its data ready; nothing started yet."""

    uri: str
    path: Path
    model: BaseVAE
    dataset: str
    trained_on: str | None
    images: np.ndarray  # prepared test images, uint8 (n, H, W, C)
    labels: np.ndarray  # int (n,)
    n_test: int  # the whole test split's size
    protocol: str
    likelihood: str
    conditioning: str
    artifact: str  # where the result goes on the model's run (and is found by a reuse)

    @property
    def n(self) -> int:
        return len(self.labels)


def set_up(cfg: EvaluateConfig, limit: int | None) -> LikelihoodSetup:
    """Load and check the model, load the test split and prepare it in the model's protocol."""
    uri = cfg.model
    path, model, ckpt, dataset = load_for_likelihood(uri, cfg.dataset, cfg.allow_other_data)
    images, labels = load_split(dataset, "test")
    binarized = bool(model.likelihood.binarized)
    prepared = prepare_test_images(images, binarized, cfg.seed)
    n = len(labels) if limit is None else min(limit, len(labels))
    return LikelihoodSetup(
        uri=uri, path=path, model=model, dataset=dataset, trained_on=trained_dataset(ckpt),
        images=prepared[:n], labels=np.asarray(labels[:n]), n_test=len(labels),
        protocol=f"dynamically binarized with seed {cfg.seed}" if binarized else "8-bit discretized (images as stored)",
        likelihood=model.hparams.get("likelihood", type(model.likelihood).__name__),
        conditioning="label-conditioned: -log p(x|y) with the true test label" if model.conditional else "-log p(x)",
        artifact=f"evaluation/likelihood-{dataset}-k{cfg.k}-seed{cfg.seed}-n{n}.json",
    )  # fmt: skip


def _score_on_ray(
    s: LikelihoodSetup, cfg: EvaluateConfig, resources: ResourcesConfig, echo
) -> tuple[dict, float]:
    """(per-image scores of every row, seconds from handing out the data to the last shard), from one
    Ray task per batch-aligned shard."""
    import ray

    plan = spread.start(resources)
    shards = batch_aligned_shards(s.n, cfg.batch_size, plan.workers)
    hp = s.model.hparams
    echo(f"likelihood of {s.uri} ({hp.get('variant')} {hp.get('arch')}, {s.likelihood}) on {s.dataset} test: "
         f"{s.n} images, {s.protocol}; {s.conditioning}")  # fmt: skip
    echo(f"  k={cfg.k} importance samples ({cfg.k_batch} per pass), batch {cfg.batch_size}, seed {cfg.seed}; "
         f"{len(shards)} Ray task(s) x {plan.cpus_per_worker:g} CPU"
         f"{f' x {plan.gpus_per_worker:g} GPU' if plan.use_gpu else ''}")  # fmt: skip
    options = {
        "k": cfg.k, "k_batch": cfg.k_batch, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "threads": plan.torch_threads, "use_gpu": plan.use_gpu,
    }  # fmt: skip
    t0 = time.perf_counter()
    blob, x_ref, y_ref = spread.share(s.path.read_bytes(), s.images, s.labels)
    task = ray.remote(score_shard).options(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)
    pending = [task.remote(blob, x_ref, y_ref, start, stop, options) for start, stop in shards]
    done: list[dict] = []
    for part in spread.as_done(pending, f"likelihood evaluation of {s.uri} failed in a Ray task"):
        done.append(part)
        echo(f"  rows {part['start']}-{part['stop'] - 1} scored in {part['seconds']:.1f}s ({len(done)}/{len(shards)})")  # fmt: skip
    done.sort(key=lambda p: p["start"])
    scores = {key: np.concatenate([p["scores"][key] for p in done]) for key in done[0]["scores"]}
    return scores, time.perf_counter() - t0


def measure(s: LikelihoodSetup, cfg: EvaluateConfig, resources: ResourcesConfig, echo) -> dict[str, Any]:
    """Score the prepared test set on Ray and print the figures: the result, not yet recorded (run_id None)."""
    scores, seconds = _score_on_ray(s, cfg, resources, echo)
    metrics = likelihood_metrics(scores, cfg.k, int(np.prod(s.model.image_shape)))
    iw_key = f"test_iw_nll_k{cfg.k}"
    echo(f"  -ELBO        {metrics['test_neg_elbo']:9.2f} nats   {metrics['test_elbo_bits_per_dim']:.4f} bits/dim"
         f"   (recon {metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f})")  # fmt: skip
    echo(f"  IW-NLL k={cfg.k:<4d}{metrics[iw_key]:9.2f} nats   {metrics['test_bits_per_dim']:.4f} bits/dim"
         f"   (+/- {metrics[iw_key + '_stderr']:.2f} std. error over images)   [{seconds:.1f}s]")  # fmt: skip
    logged = logged_names(metrics, s.dataset, s.trained_on, s.n, s.n_test)
    return {
        "model": s.uri,
        "checkpoint": str(s.path),
        "dataset": s.dataset,
        "trained_on": s.trained_on,
        "images": s.n,
        "k": cfg.k,
        "seed": cfg.seed,
        "protocol": s.protocol,
        "likelihood": s.likelihood,
        "conditional": bool(s.model.conditional),
        "conditioning": s.conditioning,
        "metrics": metrics,  # test_neg_elbo, test_iw_nll_k<k>, test_bits_per_dim, ...
        "logged_metrics": logged,  # the same under the names logged to MLflow
        "seconds": seconds,
        "run_id": None,
    }
