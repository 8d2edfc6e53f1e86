"""The plain-PyTorch core of training: no Ray, no MLflow.

``train.py`` runs these functions inside Ray Train workers; tests and benchmarks run them directly.
Data are uint8 NHWC arrays held in memory (MNIST train is 43 MB): each worker indexes its own
disjoint slice of a per-epoch permutation, the DistributedSampler scheme, which measured faster than
a Ray Data iterator for data this small (see benchmarks/train_throughput.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vaedist import hardware
from vaedist.models import BaseVAE, binarize, to_model_input


class ElboObjective(torch.nn.Module):
    """``forward`` = the model's loss, so DistributedDataParallel (which only hooks ``forward``) can wrap it."""

    def __init__(self, model: BaseVAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, beta: float = 1.0, free_bits: float = 0.0):
        return self.model.loss(x, y, beta=beta, free_bits=free_bits)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank, ...), the same in every process."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's sample indices for one epoch: a seeded permutation, dealt round-robin.

    Every rank gets the same count (floor(n / world_size)) so DDP ranks run the same number of steps.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return perm[rank : per_rank * world_size : world_size]


def shard_range(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, disjoint evaluation shard of ``range(n)`` for ``rank`` (sizes differ by at most one)."""
    return np.array_split(np.arange(n), world_size)[rank]


def kl_weight(epoch: int, step_in_epoch: int, steps_per_epoch: int, beta: float, warmup_epochs: int) -> float:
    """beta, ramped linearly from 0 over the first ``warmup_epochs`` (KL annealing, Bowman et al. 2016)."""
    if warmup_epochs <= 0:
        return beta
    progress = (epoch + step_in_epoch / max(steps_per_epoch, 1)) / warmup_epochs
    return beta * min(1.0, progress)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train_epoch`` runs the networks in, from ``train.precision``; None = float32.

    ``auto``: bf16 on a CUDA device with native bf16 (Ampere and newer), else float32 (CPU autocast is
    slower than float32 on most CPUs); ``bf16``: bf16 wherever autocast has it (CUDA with native bf16,
    CPU; on a CPU without native bf16 matmul, :data:`vaedist.hardware.NATIVE_BF16_FLAGS`, with a warning:
    there it runs several times slower than float32); ``fp32``: float32. bf16 keeps float32's exponent
    range, so no loss scaling is needed (unlike fp16).
    """
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if native else None
    if precision == "bf16":
        if device.type == "cuda" and not native:
            raise ValueError(f"train.precision bf16: {device} has no native bf16 (use fp32 or auto)")
        if device.type == "cpu" and not hardware.native_bf16_matmul():
            warnings.warn(f"train.precision bf16 on a CPU without native bf16 matmul ({hardware.cpu_model()}, "
                          f"{hardware.torch_cpu_capability()}): expect it slower than fp32 (auto picks fp32 here)",
                          stacklevel=2)  # fmt: skip
        return torch.bfloat16
    raise ValueError(f"train.precision: {precision!r} is not one of auto, bf16, fp32")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def make_input(images: torch.Tensor, binarized: bool, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 (B,H,W,C) -> float (B,C,H,W) in [0,1]; a fresh Bernoulli draw for binarized likelihoods."""
    x = to_model_input(images)
    return binarize(x, generator=generator) if binarized else x


@dataclass
class Sums:
    """Running per-sample sums, so ranks can all-reduce them and divide once.

    As a tensor: [neg_elbo, recon, kl, loss, count, kl_layer0, kl_layer1, ...], float64; the per-layer KL
    slots (top layer first) only for a model with several stochastic layers, so collapse shows per layer.
    """

    neg_elbo: float = 0.0
    recon: float = 0.0
    kl: float = 0.0
    loss: float = 0.0
    count: int = 0
    kl_layers: torch.Tensor | None = None  # (S,) float64 sums

    def add(self, out, batch: int) -> None:
        self.neg_elbo += float(out.neg_elbo.detach().sum())
        self.recon += float(out.recon.detach().sum())
        self.kl += float(out.kl.detach().sum())
        self.loss += float(out.loss.detach()) * batch
        self.count += batch
        layers = getattr(out, "kl_layers", None)
        if layers is not None and layers.shape[-1] > 1:
            part = layers.detach().sum(0).double().cpu()
            self.kl_layers = part if self.kl_layers is None else self.kl_layers + part

    def as_tensor(self) -> torch.Tensor:
        head = torch.tensor([self.neg_elbo, self.recon, self.kl, self.loss, self.count], dtype=torch.float64)
        return head if self.kl_layers is None else torch.cat([head, self.kl_layers])

    @staticmethod
    def means(t: torch.Tensor, num_dims: int) -> dict[str, float]:
        neg_elbo, recon, kl, loss, count, *layers = t.tolist()
        count = max(count, 1.0)
        return {
            "neg_elbo": neg_elbo / count,
            "recon": recon / count,
            "kl": kl / count,
            "loss": loss / count,
            "bits_per_dim": neg_elbo / count / (num_dims * math.log(2)),
            **{f"kl_layer{i}": v / count for i, v in enumerate(layers)},
        }


def index_batches(
    images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory minibatches: (uint8 (B,H,W,C), int64 (B,)) at ``indices``, the last partial batch dropped
    so every DDP rank runs the same number of steps (``len(indices) // batch_size``)."""
    for step in range(len(indices) // batch_size):
        idx = torch.from_numpy(indices[step * batch_size : (step + 1) * batch_size])
        yield images[idx], labels[idx]


def train_epoch(
    model: torch.nn.Module,
    core: BaseVAE,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    beta_at: Callable[[int], float],
    free_bits: float,
    generator: torch.Generator,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Sums:
    """One pass over ``batches`` (at most ``steps`` of them); returns per-sample sums of the losses.

    ``batches`` yields (uint8 (B,H,W,C), int64 (B,)) on CPU: ``index_batches`` over arrays in memory, or a
    Ray Data shard's stream (``streaming.py``). ``steps`` is the same on every DDP rank (the caller's
    promise), and ``on_step(step, steps)`` is called before each step (a progress display, a test's fault
    hook). ``model`` is the ElboObjective that gets called (DDP-wrapped under Ray Train), ``core`` the bare
    BaseVAE (for ``conditional``/``likelihood``). ``autocast_dtype`` (see :func:`autocast_dtype`): the forward
    pass runs under ``torch.autocast`` in that dtype; the model keeps the likelihood and KL sums in float32,
    and the backward pass runs outside autocast, as torch's AMP recipe has it.
    """
    model.train()
    sums = Sums()
    binarized = core.likelihood.binarized
    for step, (images, labels) in enumerate(batches):
        if step >= steps:
            break
        if on_step is not None:
            on_step(step, steps)
        x = make_input(images, binarized, generator).to(device, non_blocking=True)  # (B, C, H, W)
        y = labels.to(device, non_blocking=True) if core.conditional else None
        with _autocast(device, autocast_dtype):
            out = model(x, y, beta=beta_at(step), free_bits=free_bits)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sums.add(out, len(images))
    return sums


@torch.no_grad()
def evaluate(
    core: BaseVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> Sums:
    """Negative ELBO, reconstruction and KL sums over ``indices``; binarization draws fixed by ``seed``."""
    core.eval()
    sums = Sums()
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(indices), batch_size):
        idx = torch.from_numpy(indices[start : start + batch_size])
        x = make_input(images[idx], core.likelihood.binarized, generator).to(device)
        y = labels[idx].to(device) if core.conditional else None
        sums.add(core.loss(x, y), len(idx))
    return sums
