"""Hierarchical VAEs (``stochastic_layers`` > 1): a flat top latent and latent maps below it, inferred top-down.

Generative model, ``S`` stochastic layers, layer 1 on top (Sønderby et al. 2016; NVAE, Vahdat & Kautz 2020;
VDVAE, Child 2021)::

    z_1 ~ N(0, I) (latent_dim),   h = decoder input [z_1, code(y)]
    at level l_s = depth + 2 - s (s = 2..S: the coarsest resolution first, one layer per level):
        p(z_s | z_<s, y) = N(mu_p(h), diag exp(logvar_p(h))),   z_s (latent_channels, h_l, w_l)
        h <- h + proj(z_s)
    the rest of the decoder maps h to the likelihood's parameters: p(x | z_1..S, y)

Inference shares the generative path (top-down inference): the encoder's bottom-up pass gives
``q(z_1 | x, y)`` and features ``f_l`` per level; going down the same decoder,
``q(z_s | x, z_<s, y) = N(mu_p + sigma_p mu_e, (sigma_p sigma_e)^2)`` with ``(mu_e, logvar_e)`` from
``[h, f_l]``: a posterior relative to the prior, NVAE's residual normal (their eq. 2).

Noise space. Write ``z_s = mu_p + sigma_p eps_s``: under the prior ``eps_s ~ N(0, I)``, under q
``eps_s ~ N(mu_e, sigma_e^2)``. Given ``z_<s`` the map eps -> z is one affine map for both, so

    KL(q(z_s | .) || p(z_s | z_<s)) = KL(N(mu_e, sigma_e^2) || N(0, I))        (NVAE eq. 2)
    log p(z_s | z_<s) - log q(z_s | .) = log N(eps_s; 0, I) - log N(eps_s; mu_e, sigma_e^2)

(the Jacobians cancel). The model is therefore a VAE in ``eps = [z_1, eps_2, ..., eps_S]`` (B, D) with
prior N(0, I): ``decode(eps)`` is the generative path, so ``generate`` / ``sample`` / serving / the
generated Parquet's ``z`` take eps (D = ``latent_dim`` attribute; temperature scales every layer, as
VDVAE's), and the ELBO is ``BaseVAE``'s with the KL summed per layer. Unlike the one-layer VAE,
``q(eps_s)`` depends on the sampled ``z_<s``: ``forward`` samples layer by layer, and ``encode`` gives the
posterior means along the mean path (each layer at its mean given the means above), which ``decode``
turns into the reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vaedist.models.base import BaseVAE, LossOutput

_LOG_2PI = math.log(2.0 * math.pi)
# (i, level, decoder state h (B, c, h, w)) -> the noise (B, latent_channels, h, w) of latents[i], layer s = i + 2
Pick = Callable[[int, int, Tensor], Tensor]


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z; mu, diag exp(logvar))`` summed over dims: (B, D) -> (B,)."""
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=1)


def log_std_normal(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over dims: (B, D) -> (B,)."""
    return -0.5 * (z.square() + _LOG_2PI).sum(dim=1)


class LatentLayer(nn.Module):
    """One stochastic layer at a level whose decoder state is ``(c, h, w)`` and encoder features ``(c_e, h, w)``:
    ``prior(h) -> (mu_p, logvar_p)``, ``posterior([h, f]) -> (mu_e, logvar_e)`` in noise space, and
    ``proj(z)`` into the state. 3x3 convolutions on maps, 1x1 on a ``1 x 1`` state (dense, or a coarsest level
    of one pixel). Prior and posterior heads start at zero: ``p = q = N(0, I)`` (KL 0) at the first step."""

    def __init__(self, state: tuple[int, int, int], enc_channels: int, latent_channels: int) -> None:
        super().__init__()
        c, h, w = state
        k = 1 if h == w == 1 else 3

        def conv(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, k, padding=k // 2)

        self.prior = conv(c, 2 * latent_channels)
        self.posterior = conv(c + enc_channels, 2 * latent_channels)
        self.proj = nn.Conv2d(latent_channels, c, 1)
        for head in (self.prior, self.posterior):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def enter(self, h: Tensor, eps: Tensor) -> Tensor:
        """``h + proj(mu_p + sigma_p eps)``: the layer's ``z`` from its noise, into the state."""
        mu_p, logvar_p = self.prior(h).chunk(2, dim=1)  # (B, zc, h, w) each
        return h + self.proj(mu_p + torch.exp(0.5 * logvar_p) * eps)


class LadderVAE(BaseVAE):
    """Hierarchical VAE: ``stochastic_layers`` latent layers, the top one flat (``latent_dim``) and the others
    ``latent_channels`` maps at the decoder's coarsest levels (any arch: a dense level is a hidden layer).

    ``latent_dim`` (attribute) is the noise size D that ``decode`` takes; ``top_latent_dim`` and
    ``hparams["latent_dim"]`` the top layer's. ``layer_dims`` are the layers' sizes, top first.
    """

    variant = "vae"

    def __init__(self, *, stochastic_layers: int = 2, latent_channels: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        depth = len(self.decoder.level_shapes)
        if not 1 <= stochastic_layers <= depth + 1:
            raise ValueError(
                f"{stochastic_layers} stochastic layers need depth >= {stochastic_layers - 1} "
                f"(one layer per level below the top one), got depth {depth}"
            )
        self.stochastic_layers = int(stochastic_layers)
        self.latent_levels = list(range(depth, depth + 1 - self.stochastic_layers, -1))  # coarsest first
        self.latents = nn.ModuleList(
            LatentLayer(self.decoder.level_shapes[lv], self.encoder.level_shapes[lv][0], latent_channels)
            for lv in self.latent_levels
        )
        self.latent_shapes = [
            (latent_channels, *self.decoder.level_shapes[lv][1:]) for lv in self.latent_levels
        ]
        self.layer_dims = (self.top_latent_dim, *(math.prod(shape) for shape in self.latent_shapes))
        self.latent_dim = sum(self.layer_dims)
        self.hparams["stochastic_layers"] = self.stochastic_layers
        self.hparams["latent_channels"] = int(latent_channels)

    # ---------------------------------------------------------------- the path
    def _descend(self, z_top: Tensor, code: Tensor | None, pick: Pick) -> Tensor:
        """Decode from ``z_1`` (B, L_1); the noise of ``latents[i]`` is ``pick(i, level, h)``. -> params (B, P, H, W)."""
        index_at = {level: i for i, level in enumerate(self.latent_levels)}

        def inject(level: int, h: Tensor) -> Tensor:
            i = index_at.get(level)
            return h if i is None else self.latents[i].enter(h, pick(i, level, h))

        h0 = z_top if code is None else torch.cat([z_top, code.to(z_top.dtype)], dim=1)  # (B, L_1 + k)
        return self.decoder(h0, inject=inject)

    def _infer(
        self,
        feats: dict[int, Tensor],
        mu: Tensor,
        logvar: Tensor,
        code: Tensor | None,
        generator: torch.Generator | None,
        at_mean: bool,
    ) -> dict[str, Tensor]:
        """Top-down inference from the encoder's ``q(z_1)`` ``(mu, logvar)`` (B, L_1) and features per level:
        one draw of every layer (or every layer at its mean). -> ``{"params", "mu", "logvar", "z"}`` with the
        noise-space posterior ``(mu, logvar)`` and the noise ``z`` (B, D), layers in order."""
        z_top = mu if at_mean else self.reparameterize(mu, logvar, generator=generator)
        mus, logvars, noises = [mu], [logvar], [z_top]

        def pick(i: int, level: int, h: Tensor) -> Tensor:
            mu_e, logvar_e = self.latents[i].posterior(torch.cat([h, feats[level]], dim=1)).chunk(2, dim=1)
            eps = mu_e if at_mean else self.reparameterize(mu_e, logvar_e, generator=generator)
            mus.append(mu_e.flatten(1))
            logvars.append(logvar_e.flatten(1))
            noises.append(eps.flatten(1))
            return eps  # (B, zc, h, w)

        params = self._descend(z_top, code, pick)
        return {
            "params": params,
            "mu": torch.cat(mus, 1),
            "logvar": torch.cat(logvars, 1),
            "z": torch.cat(noises, 1),
        }

    def _bottom_up(
        self, x: Tensor, y: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[int, Tensor], Tensor | None]:
        """``(mu_1, logvar_1, features per level, label code)`` from the encoder's pass over ``x``."""
        self._check_x(x)
        code = self._label_code(y, x.shape[0], x.dtype)
        out, feats = self.encoder.pyramid(x, code)  # (B, 2 L_1), {level: (B, c_e, h, w)}
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar, feats, code

    # ----------------------------------------------------- the VAE vocabulary
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The noise-space posterior along the mean path: ``(mu, logvar)``, each (B, D)."""
        mu, logvar, feats, code = self._bottom_up(x, y)
        out = self._infer(feats, mu, logvar, code, None, at_mean=True)
        return out["mu"], out["logvar"]

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """The generative path from the noise ``z`` (B, D) = ``[z_1, eps_2, ...]`` -> params (B, P, H, W)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} decodes z of shape (B, {self.latent_dim}), got {tuple(z.shape)}"
            )
        parts = z.split(self.layer_dims, dim=1)
        eps = [part.unflatten(1, shape) for part, shape in zip(parts[1:], self.latent_shapes, strict=True)]
        return self._descend(parts[0], self._label_code(y, z.shape[0], z.dtype), lambda i, _, __: eps[i])

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        mu, logvar, feats, code = self._bottom_up(x, y)
        return self._infer(feats, mu, logvar, code, generator, at_mean=False)

    def loss_from_forward(
        self, x: Tensor, out: dict[str, Tensor], beta: float = 1.0, free_bits: float = 0.0
    ) -> LossOutput:
        """``loss = mean_B[recon] + beta * sum_s max(free_bits * D_s, mean_B[KL_s])``: free bits per layer
        (Kingma et al. 2016's groups are the layers, each allowed ``free_bits`` nats per dim of its ``D_s``),
        so a layer's KL is not pushed below its allowance (against a collapsed layer, Sønderby et al. 2016).
        ``kl_layers`` (B, S) holds each layer's KL (top first); ``neg_elbo = recon + kl`` the true bound."""
        recon, kl_dims = self._recon_and_kl_dims(x, out)  # (B,), (B, D) float32
        kl_layers = torch.stack([part.sum(dim=1) for part in kl_dims.split(self.layer_dims, dim=1)], dim=1)
        kl = kl_layers.sum(dim=1)  # (B,)
        floors = free_bits * torch.tensor(self.layer_dims, dtype=kl.dtype, device=kl.device)  # (S,)
        kl_penalty = torch.maximum(kl_layers.mean(dim=0), floors).sum()
        loss = recon.mean() + beta * kl_penalty
        return LossOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl, kl_layers=kl_layers)

    def iw_posterior(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        """The bottom-up pass, once for every chunk of draws: ``(mu, logvar, features, label code)``."""
        return self._bottom_up(x, y)

    def log_weights(
        self, x: Tensor, y: Tensor | None, posterior: tuple[Tensor, ...], s: int, generator: torch.Generator | None
    ) -> Tensor:
        """``log w`` (s, B) of ``s`` top-down draws (Burda et al. 2016, eq. 8):
        ``log w = log p(x|z) + sum_s [log N(eps_s; 0, I) - log N(eps_s; mu_e, sigma_e^2)]``, the noise-space
        form of ``log p(x, z) - log q(z|x)`` (module docstring); the top-down pass runs on ``s * B`` rows."""
        b = x.shape[0]
        mu, logvar, feats, code = posterior

        def rep(t: Tensor) -> Tensor:
            return t.repeat(s, *([1] * (t.dim() - 1)))  # (s*B, ...): sample-major, as y.repeat(s)

        feats_s = {level: rep(f) for level, f in feats.items()}
        out = self._infer(feats_s, rep(mu), rep(logvar), None if code is None else rep(code), generator, False)
        log_px = self.likelihood.log_prob(out["params"].float(), rep(x))  # (s*B,)
        z, q_mu, q_logvar = out["z"].float(), out["mu"].float(), out["logvar"].float()
        return (log_px + log_std_normal(z) - log_normal(z, q_mu, q_logvar)).view(s, b)


class LadderCVAE(LadderVAE):
    """The hierarchical VAE conditioned on the label: ``y`` enters the encoder and the top of the decoder,
    so every prior below the top, ``p(z_s | z_<s, y)``, and the likelihood depend on it; ``z_1 ~ N(0, I)``."""

    variant = "cvae"
    conditional = True
