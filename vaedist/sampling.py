"""How to draw images from a model: the one sampler that generate, serve and the epoch pictures share.

    (seed, sample ids) --prior_latents--> z (N, L) --decode--> (N, C, H, W) in [0, 1] --to_uint8_hwc--> uint8 (N, H, W, C)

A sample is named by ``(seed, sample_id)``: its z is a pure function of the two (:func:`prior_latents`), so
the image ``vaedist generate --seed S`` writes for row ``sample_id = i`` is the one the served model returns
for a request row ``seed = S, sample_id = i`` with the same label and temperature, and the one
:func:`sample` gives for the same arguments. Where the latents come from is the seam: :func:`prior_latents`
draws z ~ N(0, T^2 I); a learned prior replaces that one function and nothing downstream changes.

Plain numpy + torch, no Ray or MLflow; the model is any :class:`vaedist.models.BaseVAE` (``generate(z, y)``).
"""

from __future__ import annotations

import numpy as np
import torch

DECODE_BATCH = 1024  # rows per decoder call where the caller does not choose

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014) on uint64 arrays: a bijective, well-mixed hash."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def prior_latents(seed: int | np.ndarray, sample_ids: np.ndarray, dim: int, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """z ~ N(0, T^2 I) for the samples ``sample_ids`` (int (N,)) of ``seed``: float32 (N, dim).

    Counter-based, as in Salmon et al. (2011), "Parallel random numbers: as easy as 1, 2, 3": the
    counter (sample_id, dim, k) is hashed with the seed into uniform bits, and Box-Muller turns the
    pair k = 0, 1 into one normal. No generator state: any worker computes any sample's z alone.
    ``seed`` and ``temperature``: one for every sample, or one per sample ((N,)); seeds are >= 0.
    """
    key = splitmix64(np.asarray(seed, dtype=np.uint64).reshape(-1, 1))  # (1 or N, 1)
    ids = np.asarray(sample_ids, dtype=np.uint64).reshape(-1, 1)  # (N, 1)
    counter = (ids * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) * np.uint64(2)  # (N, dim)
    h1 = splitmix64(splitmix64(counter) ^ key)
    h2 = splitmix64(splitmix64(counter + np.uint64(1)) ^ key)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1): log is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    t = np.asarray(temperature, dtype=np.float64).reshape(-1, 1) if np.ndim(temperature) else float(temperature)
    return (z * t).astype(np.float32)


def latents(seed: int, start: int, rows: int, dim: int, temperature: float = 1.0) -> np.ndarray:
    """:func:`prior_latents` of the contiguous samples ``start..start+rows-1`` (a shard): float32 (rows, dim)."""
    return prior_latents(seed, np.arange(start, start + rows, dtype=np.uint64), dim, temperature)


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 (rounded, not truncated)."""
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def decode(model, z: np.ndarray, labels: np.ndarray | None, batch_size: int = DECODE_BATCH, device="cpu") -> np.ndarray:
    """The decoder's mean images for latents ``z`` (N, L) [and labels (N,)]: uint8 (N, H, W, C)."""
    h, w, c = model.image_shape
    out = np.empty((len(z), h, w, c), dtype=np.uint8)
    with torch.inference_mode():
        for s in range(0, len(z), batch_size):
            zb = torch.from_numpy(np.ascontiguousarray(z[s : s + batch_size])).to(device)
            yb = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels[s : s + batch_size])).to(device)
            out[s : s + len(zb)] = to_uint8_hwc(model.generate(zb, yb))  # (B, C, H, W) -> (B, H, W, C)
    return out


def sample(model, labels: np.ndarray | None, seed: int, temperature: float = 1.0, sample_ids: np.ndarray | None = None,
           batch_size: int = DECODE_BATCH, device="cpu") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(images uint8 (N, H, W, C), z float32 (N, L)) of samples ``sample_ids`` (default ``0..N-1``) of
    ``seed`` with ``labels`` (int64 (N,); None for an unconditional model, then N = len(sample_ids))."""
    if sample_ids is None:
        sample_ids = np.arange(len(labels), dtype=np.int64)
    z = prior_latents(seed, sample_ids, model.latent_dim, temperature)
    return decode(model, z, labels, batch_size, device), z
