"""One interface for every variant: :class:`BaseVAE`.

Vocabulary of pytorch/examples ``vae/main.py`` (encode / reparameterize / decode / forward / loss),
one class per variant and a registry as in AntixK/PyTorch-VAE. Shapes: images ``x`` ``(B, C, H, W)``
float in [0, 1]; labels ``y`` ``(B,)`` int64; latents ``(B, L)``; decoder output ``params``
``(B, P, H, W)`` with ``P = likelihood.param_channels(C)``.

The objective is the ELBO of Kingma & Welling (2014),
``log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z)) = -(recon + kl)``, with
``q(z|x) = N(mu, diag(exp(logvar)))`` and ``p(z) = N(0, I)``; a CVAE conditions q, p(x|z) on y
(Sohn et al. 2015) and keeps the prior ``N(0, I)``. The hierarchical variants (``models/ladder.py``) keep
this interface by working in the prior's noise space (see there).

Mixed precision: the networks may run under ``torch.autocast`` (bf16); the likelihood and the KL, and so
every sum over pixels and latent dims, are computed in float32 with autocast off (``float32_terms``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from vaedist.models.likelihoods import build_likelihood
from vaedist.models.nets import LabelCode, build_decoder, build_encoder

_LOG_2PI = math.log(2.0 * math.pi)


def chunk_sizes(k: int, chunk: int) -> list[int]:
    """``k`` importance samples drawn ``chunk`` at a time (the last chunk the rest): bounds memory."""
    return [min(chunk, k - start) for start in range(0, k, chunk)]


class LossOutput(NamedTuple):
    """What one training/eval step needs. Per-example terms are in nats, summed over pixels."""

    loss: Tensor  # () scalar to backprop: mean_B[recon] + beta * KL with free bits
    neg_elbo: Tensor  # (B,) recon + kl: the true negative ELBO (beta = 1, no free bits)
    recon: Tensor  # (B,) -log p(x|z), one z ~ q(z|x) per example
    kl: Tensor  # (B,) KL(q(z|x) || N(0, I)), closed form
    # (B, S) the KL of each stochastic layer, top first (sums to kl); S = 1 for the one-layer models
    kl_layers: Tensor | None = None


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-dimension ``KL(N(mu, exp(logvar)) || N(0, 1))`` ``(B, L)``, Kingma & Welling (2014),
    App. B: ``-KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)``."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


@contextmanager
def float32_terms(device: torch.device) -> Iterator[None]:
    """Autocast off: the ELBO's sums over thousands of pixels and latent dims stay float32 even when the
    networks ran in bf16 (8 mantissa bits would lose whole nats in a sum of ~3000 terms)."""
    with torch.autocast(device.type, enabled=False):
        yield


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the learned sigma of the Gaussian likelihood included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class BaseVAE(nn.Module):
    """Encoder q(z|x[, y]), decoder p(x|z[, y]) and a likelihood; subclasses fix the variant.

    Attributes: ``latent_dim``, ``num_classes``, ``conditional``, ``image_shape`` (H, W, C),
    ``likelihood`` (an ``nn.Module``: the Gaussian's log sigma is a parameter of the model) and
    ``hparams``: a flat JSON-able dict from which :func:`vaedist.models.build_model_from_hparams`
    rebuilds the same architecture (checkpoints are ``{"hparams": ..., "state_dict": ...}``).

    The likelihood does not binarize: when ``likelihood.binarized`` the caller passes binarized
    images (see :func:`vaedist.models.binarize`); otherwise 8-bit images ``k/255``.
    """

    variant: ClassVar[str] = ""
    conditional: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True  # q(z|x) has a learned variance (False: a plain autoencoder)
    stochastic_layers: int = 1  # latent layers (> 1: the hierarchical models of models/ladder.py)

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        likelihood: str,
        arch: str = "conv",
        latent_dim: int = 16,
        width: int = 512,
        base_channels: int = 32,
        depth: int = 2,
        activation: str = "relu",
        conditioning: str = "onehot",
        embedding_dim: int = 16,
        blocks_per_level: int = 2,
        mixtures: int = 10,
    ) -> None:
        super().__init__()
        h, w, c = (int(s) for s in image_shape)
        self.image_shape = (h, w, c)
        self.num_classes = int(num_classes)
        self.latent_dim = int(latent_dim)  # the size of z that decode / generate take
        self.top_latent_dim = self.latent_dim  # the size of the top (flat) latent: the latent scatter's
        self.likelihood = build_likelihood(likelihood, mixtures=mixtures)
        self.label_code = (
            LabelCode(self.num_classes, conditioning, embedding_dim) if self.conditional else None
        )
        cond_dim = self.label_code.dim if self.label_code is not None else 0
        sizes = {"width": width, "base_channels": base_channels, "depth": depth, "activation": activation,
                 "blocks_per_level": blocks_per_level}  # fmt: skip
        out_dim = 2 * latent_dim if self.stochastic else latent_dim  # (mu, logvar) or mu
        self.encoder = build_encoder(arch, self.image_shape, out_dim, cond_dim=cond_dim, **sizes)
        self.decoder = build_decoder(
            arch, self.image_shape, self.likelihood.param_channels(c), latent_dim + cond_dim, **sizes
        )
        self.hparams: dict[str, Any] = {
            "variant": self.variant,
            "arch": arch,
            "likelihood": likelihood,
            "image_height": h,
            "image_width": w,
            "image_channels": c,
            "num_classes": self.num_classes,
            "latent_dim": self.latent_dim,
            "width": int(width),
            "base_channels": int(base_channels),
            "depth": int(depth),
            "activation": activation,
        }
        if self.conditional:
            self.hparams["conditioning"] = conditioning
            self.hparams["embedding_dim"] = int(embedding_dim)
        # Knobs only some models have are recorded only there, so older checkpoints' hparams (which lack
        # them) and the hparams of models without them stay the same; a missing one takes its default.
        if arch == "resnet":
            self.hparams["blocks_per_level"] = int(blocks_per_level)
        if likelihood == "mol":
            self.hparams["mixtures"] = int(mixtures)

    # ----------------------------------------------------------------- checks
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_x(self, x: Tensor) -> None:
        h, w, c = self.image_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {c}, {h}, {w}) in [0, 1], "
                f"got {tuple(x.shape)} (use to_model_input for uint8 (B, H, W, C) images)"
            )

    def _label_code(self, y: Tensor | int | None, batch: int, dtype: torch.dtype) -> Tensor | None:
        """Validate ``y`` against the variant and return its code ``(B, k)`` (None if unconditional)."""
        name = type(self).__name__
        if not self.conditional:
            if y is not None:
                raise ValueError(f"{name} is unconditional: do not pass labels y (use variant 'cvae')")
            return None
        if y is None:
            raise ValueError(f"{name} is conditional: pass labels y, an int64 tensor of shape ({batch},)")
        if isinstance(y, int):
            y = torch.full((batch,), y, dtype=torch.long, device=self.device)
        if y.dim() != 1 or y.shape[0] != batch or y.dtype != torch.long:
            raise ValueError(
                f"{name}: labels y must be int64 of shape ({batch},), got {y.dtype} {tuple(y.shape)}"
            )
        return self.label_code(y, dtype)  # (B, k)

    # ----------------------------------------------------- the VAE vocabulary
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q(z|x[, y]): ``x`` (B, C, H, W) -> ``(mu, logvar)``, each (B, L)."""
        self._check_x(x)
        h = self.encoder(x, self._label_code(y, x.shape[0], x.dtype))  # (B, 2L)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z = mu + sigma * eps``, ``eps ~ N(0, I)``: a sample of q(z|x) differentiable in (mu, logvar)
        (Kingma & Welling 2014, sec. 2.4)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps  # (B, L)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """p(x|z[, y]): ``z`` (B, L) -> likelihood parameters (B, P, H, W)."""
        code = self._label_code(y, z.shape[0], z.dtype)
        h = z if code is None else torch.cat([z, code], dim=1)  # (B, L + k)
        return self.decoder(h)

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Encode, sample one z (from ``generator`` if given), decode: ``{"params", "mu", "logvar", "z"}``."""
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, generator=generator)
        return {"params": self.decode(z, y), "mu": mu, "logvar": logvar, "z": z}

    def loss(
        self, x: Tensor, y: Tensor | None = None, beta: float = 1.0, free_bits: float = 0.0
    ) -> LossOutput:
        """Single-sample ELBO estimate and the training objective; see :meth:`loss_from_forward`."""
        return self.loss_from_forward(x, self(x, y), beta=beta, free_bits=free_bits)

    def loss_from_forward(
        self, x: Tensor, out: dict[str, Tensor], beta: float = 1.0, free_bits: float = 0.0
    ) -> LossOutput:
        """The loss from an already computed :meth:`forward` output.

        Under DDP call the wrapped model's forward and then this on the inner module
        (``out = ddp(x, y); model.loss_from_forward(x, out, ...)``) so gradients are synchronised.

        ``loss = mean_B[recon] + beta * sum_j max(free_bits, mean_B[KL_j])``: free bits
        (Kingma et al. 2016) stop penalising a latent dim's KL, averaged over the batch, below
        ``free_bits`` nats. ``beta`` weighs the KL (Higgins et al. 2017; annealed by the trainer).
        ``neg_elbo = recon + kl`` is always the true bound (beta = 1, no free bits).
        """
        recon, kl_dims = self._recon_and_kl_dims(x, out)  # (B,), (B, L) float32
        kl = kl_dims.sum(dim=1)  # (B,)
        kl_penalty = kl_dims.mean(dim=0).clamp(min=free_bits).sum()  # ()
        loss = recon.mean() + beta * kl_penalty
        return LossOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl, kl_layers=kl[:, None])

    def _recon_and_kl_dims(self, x: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``-log p(x|z)`` (B,) and the per-dim ``KL(q || N(0, I))`` (B, L), both in float32."""
        with float32_terms(x.device):
            recon = -self.likelihood.log_prob(out["params"].float(), x.float())  # (B,)
            kl_dims = gaussian_kl(out["mu"].float(), out["logvar"].float())  # (B, L)
        return recon, kl_dims

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(self, z: Tensor, y: Tensor | int | None = None) -> Tensor:
        """Decode latents ``z`` (B, L) to mean images (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode(z, y))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: Tensor | int | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` mean images (n, C, H, W) in [0, 1] from ``z ~ N(0, temperature^2 I)``.

        A conditional model needs ``y``: int64 (n,), or one int for all n; an unconditional one
        refuses it."""
        self._label_code(y, n, torch.float32)  # fail before drawing when y is missing or extra
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device) * temperature
        return self.generate(z, y)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Mean image of ``p(x | z = mu(x))`` (B, C, H, W) in [0, 1]: the reconstruction grid's row."""
        mu, _ = self.encode(x, y)
        return self.generate(mu, y)

    @torch.no_grad()
    def iw_nll(
        self, x: Tensor, y: Tensor | None = None, k: int = 50, chunk: int = 10, generator: torch.Generator | None = None
    ) -> Tensor:
        """Importance-weighted estimate of ``-log p(x[|y])`` in nats (B,) (Burda et al. 2016, eq. 8):

        ``-log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)``, ``z_i ~ q(z|x)``.

        Its expectation decreases with k to the true NLL; ``k = 1`` is the single-sample ELBO
        estimator. The ``k`` samples are decoded ``chunk`` at a time (``chunk * B`` images per pass)
        to bound memory.
        """
        if not self.stochastic:
            raise NotImplementedError(
                "an autoencoder has no posterior q(z|x) and no likelihood bound: iw_nll needs variant 'vae' or 'cvae'"
            )
        if k < 1 or chunk < 1:
            raise ValueError(f"iw_nll needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}")
        posterior = self.iw_posterior(x, y)  # the encoder runs once, for every chunk
        log_w = [self.log_weights(x, y, posterior, s, generator) for s in chunk_sizes(k, chunk)]
        return -(torch.logsumexp(torch.cat(log_w, dim=0), dim=0) - math.log(k))  # over the (k, B) weights

    def iw_posterior(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        """What :meth:`log_weights` draws from: here q(z|x)'s ``(mu, logvar)``, (B, L) each."""
        return self.encode(x, y)

    def log_weights(
        self, x: Tensor, y: Tensor | None, posterior: tuple[Tensor, ...], s: int, generator: torch.Generator | None
    ) -> Tensor:
        """``log w = log p(x|z) + log p(z) - log q(z|x)`` (s, B) for ``s`` draws ``z ~ q(z|x)`` per image."""
        b = x.shape[0]
        mu, logvar = posterior  # (B, L) each
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((s, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps  # (s, B, L)
        y_rep = None if y is None else (y.repeat(s) if isinstance(y, Tensor) else y)
        params = self.decode(z.flatten(0, 1), y_rep)  # (s*B, P, H, W)
        x_rep = x.expand(s, *x.shape).flatten(0, 1)  # (s*B, C, H, W)
        log_px = self.likelihood.log_prob(params, x_rep).view(s, b)  # (s, B)
        log_pz = -0.5 * (z.square().sum(-1) + self.latent_dim * _LOG_2PI)  # (s, B)
        log_qz = -0.5 * ((eps.square() + logvar).sum(-1) + self.latent_dim * _LOG_2PI)  # (s, B)
        return log_px + log_pz - log_qz
