"""The pictures logged every epoch: model in, RGB arrays out (drawing itself is in vaedist.figures and vaedist.charts).

Samples are drawn with the one sampler (:mod:`vaedist.sampling`): the picture's sample ``j`` of seed
``SAMPLES_SEED`` is the image ``vaedist generate --seed 1 --temperature 1`` writes for ``sample_id = j``
with the same label."""

from __future__ import annotations

import numpy as np
import torch

from vaedist import charts, figures
from vaedist.models import BaseVAE, to_model_input
from vaedist.sampling import decode, prior_latents, to_uint8_hwc

SAMPLES_SEED = 1  # the seed of the "samples" picture


class EpochPictures:
    """Fixed inputs chosen once (validation images, z's), rendered after each epoch so frames compare.

    ``val_images`` uint8 (N, H, W, C), ``val_labels`` int64 (N,).
    """

    def __init__(
        self,
        model: BaseVAE,
        val_images: np.ndarray,
        val_labels: np.ndarray,
        class_names: tuple[str, ...],
        seed: int = 0,
        n_recon: int = 12,
        n_scatter: int = 2000,
        n_cols: int = 8,
        n_steps: int = 10,
    ):
        self.model = model
        self.class_names = list(class_names)
        rng = np.random.default_rng(seed)
        recon_idx = rng.choice(len(val_images), size=min(n_recon, len(val_images)), replace=False)
        self.recon_x = val_images[recon_idx]
        self.recon_y = val_labels[recon_idx]
        scatter_idx = rng.choice(len(val_images), size=min(n_scatter, len(val_images)), replace=False)
        self.scatter_x, self.scatter_y = val_images[scatter_idx], val_labels[scatter_idx]
        # Two validation images of different classes for the interpolation strip.
        a = int(recon_idx[0])
        others = np.flatnonzero(val_labels != val_labels[a])
        b = int(others[0]) if len(others) else (a + 1) % len(val_images)
        self.pair_x = val_images[[a, b]]
        self.pair_y = val_labels[[a, b]]
        # one fixed z per column: samples 0..n_cols-1 of the run's seed
        self.z_cols = torch.from_numpy(prior_latents(seed, np.arange(n_cols), model.latent_dim))
        self.n_steps = n_steps

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _labels(self, y: np.ndarray) -> torch.Tensor | None:
        return torch.as_tensor(y, dtype=torch.int64, device=self._device()) if self.model.conditional else None

    def _x(self, images: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.from_numpy(np.ascontiguousarray(images))).to(self._device())

    @torch.no_grad()
    def render(self) -> dict[str, np.ndarray]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            out = {
                "samples": self.samples(),
                "reconstructions": self.reconstructions(),
                "latent_scatter": self.latent_scatter(),
                "interpolation": self.interpolation(),
            }
            if model.conditional:
                out["class_by_z"] = self.class_by_z()
            return out
        finally:
            model.train(was_training)

    def samples(self) -> np.ndarray:
        """Conditional: one row per class; otherwise an 8x8 grid of z ~ N(0, I) (samples 0..63 of
        ``SAMPLES_SEED``)."""
        if self.model.conditional:
            k, m = len(self.class_names), self.z_cols.shape[0]
            y = np.repeat(np.arange(k, dtype=np.int64), m)  # (K*M,): row r holds class r
            imgs = self.sample_images(y, len(y)).reshape(k, m, *self._hwc())
            return figures.labelled_rows(imgs, self.class_names, title="samples per class")
        return figures.image_grid(self.sample_images(None, 64), ncol=8)

    def sample_images(self, labels: np.ndarray | None, n: int) -> np.ndarray:
        """Samples 0..n-1 of ``SAMPLES_SEED`` with ``labels`` (int64 (n,); None unconditional): uint8 (n, H, W, C)."""
        z = prior_latents(SAMPLES_SEED, np.arange(n), self.model.latent_dim)
        return decode(self.model, z, labels, device=self._device())

    def _hwc(self) -> tuple[int, int, int]:
        return tuple(self.model.image_shape)

    def reconstructions(self) -> np.ndarray:
        x, y = self._x(self.recon_x), self._labels(self.recon_y)
        mu, logvar = self.model.encode(x, y)
        recon = to_uint8_hwc(self.model.generate(mu, y))
        extra = None
        if self.model.hparams.get("variant") == "ae":
            # What the decoder sees in training: the code plus N(0, latent_noise^2).
            g = torch.Generator().manual_seed(2)
            noise = torch.randn(mu.shape, generator=g).to(mu.device) * float(self.model.hparams.get("latent_noise", 0))
            extra = {"with latent noise": to_uint8_hwc(self.model.generate(mu + noise, y))}
        return figures.reconstruction_grid(self.recon_x, recon, extra=extra)

    def latent_scatter(self) -> np.ndarray:
        mus = []
        for start in range(0, len(self.scatter_x), 512):
            xb = self._x(self.scatter_x[start : start + 512])
            mus.append(self.model.encode(xb, self._labels(self.scatter_y[start : start + 512]))[0].cpu())
        z = torch.cat(mus)[:, : self.model.top_latent_dim].numpy()  # a hierarchical model's top latent
        return charts.latent_scatter(z, self.scatter_y, self.class_names, title="validation codes (posterior means)")

    def interpolation(self) -> np.ndarray:
        """Linear path between the posterior means of two images of different classes."""
        x, y = self._x(self.pair_x), self._labels(self.pair_y)
        mu, _ = self.model.encode(x, y)
        t = torch.linspace(0, 1, self.n_steps, device=mu.device)[:, None]
        z = (1 - t) * mu[0] + t * mu[1]  # (S, latent)
        start, end = self.class_names[int(self.pair_y[0])], self.class_names[int(self.pair_y[1])]
        if not self.model.conditional:
            frames = to_uint8_hwc(self.model.generate(z))
            return figures.interpolation_strip(frames, start, end)
        # A conditional decoder also needs a label: show the path decoded as each end's class.
        rows = [to_uint8_hwc(self.model.generate(z, torch.full((len(z),), int(c), device=z.device)))
                for c in self.pair_y]  # fmt: skip
        return figures.labelled_rows(np.stack(rows), [f"as {start}", f"as {end}"], title=f"{start} -> {end}")

    def class_by_z(self) -> np.ndarray:
        """Rows = classes, columns = the same fixed z: what the label controls vs what z controls."""
        k, m = len(self.class_names), self.z_cols.shape[0]
        z = self.z_cols.to(self._device()).repeat(k, 1)  # (K*M, latent)
        y = torch.arange(k, device=self._device()).repeat_interleave(m)
        imgs = to_uint8_hwc(self.model.generate(z, y)).reshape(k, m, *self._hwc())
        return figures.labelled_rows(imgs, self.class_names, title="class x z", col_labels=[f"z{i}" for i in range(m)])
