"""The variants (AE, VAE, CVAE), their registry and the builders.

``stochastic_layers > 1`` makes a VAE or CVAE hierarchical (``models/ladder.py``): the variant names the
family (conditional or not), the knob the depth of the latent hierarchy.

``build_model(cfg.model, image_shape, num_classes, likelihood)`` is how training builds a model;
``build_model_from_hparams(ckpt["hparams"])`` is how everything else rebuilds it from a checkpoint
(``{"hparams": model.hparams, "state_dict": model.state_dict()}``, loaded with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from vaedist.models.base import BaseVAE, LossOutput, float32_terms
from vaedist.models.ladder import LadderCVAE, LadderVAE


class VAE(BaseVAE):
    """Variational autoencoder (Kingma & Welling 2014): Gaussian q(z|x), N(0, I) prior."""

    variant = "vae"


class CVAE(BaseVAE):
    """Conditional VAE (Sohn et al. 2015): the label enters encoder and decoder, the prior stays
    N(0, I); ``sample(n, y)`` draws images of class ``y``. ``conditioning`` is ``'onehot'`` or
    ``'embedding'`` (a learned ``nn.Embedding(num_classes, embedding_dim)``)."""

    variant = "cvae"
    conditional = True


class AutoEncoder(BaseVAE):
    """Plain autoencoder with a deterministic encoder: the baseline showing why a VAE is needed.

    ``z = mu(x)``, plus ``N(0, latent_noise^2)`` noise in training mode only (a mild regulariser);
    the loss is the reconstruction term alone. An AE has no ELBO: ``kl`` is zeros and ``neg_elbo``
    is reported as ``recon`` so the metrics line up, but it is not a bound on ``-log p(x)``.
    Nothing ties its codes to N(0, I), so ``sample`` (which decodes ``z ~ N(0, I)`` anyway) shows
    what a plain autoencoder's latent space gives as a generator: mostly not digits.
    """

    variant = "ae"
    stochastic = False

    def __init__(self, *, latent_noise: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latent_noise = float(latent_noise)
        self.hparams["latent_noise"] = self.latent_noise

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` with ``logvar`` zeros (ignored): the code is deterministic."""
        self._check_x(x)
        mu = self.encoder(x, self._label_code(y, x.shape[0], x.dtype))  # (B, L)
        return mu, torch.zeros_like(mu)

    def reparameterize(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``mu + latent_noise * eps`` in training mode, ``mu`` in eval mode (``logvar`` is ignored)."""
        if not self.training or self.latent_noise == 0.0:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + self.latent_noise * eps

    def loss_from_forward(
        self, x: Tensor, out: dict[str, Tensor], beta: float = 1.0, free_bits: float = 0.0
    ) -> LossOutput:
        """Reconstruction only; ``beta`` and ``free_bits`` are accepted and ignored."""
        with float32_terms(x.device):
            recon = -self.likelihood.log_prob(out["params"].float(), x.float())  # (B,)
        kl = torch.zeros_like(recon)
        return LossOutput(loss=recon.mean(), neg_elbo=recon, recon=recon, kl=kl, kl_layers=kl[:, None])



MODELS: dict[str, type[BaseVAE]] = {cls.variant: cls for cls in (AutoEncoder, VAE, CVAE)}  # = config.VARIANTS
HIERARCHICAL: dict[str, type[BaseVAE]] = {cls.variant: cls for cls in (LadderVAE, LadderCVAE)}


def _model_class(variant: str, hierarchical: bool = False) -> type[BaseVAE]:
    if variant not in MODELS:
        raise ValueError(f"unknown model variant {variant!r} (allowed: {', '.join(MODELS)})")
    if not hierarchical:
        return MODELS[variant]
    if variant not in HIERARCHICAL:
        raise ValueError(
            f"stochastic_layers > 1 needs variant {' or '.join(HIERARCHICAL)}: "
            f"a {variant!r} has no posterior to stack"
        )
    return HIERARCHICAL[variant]


def build_model(
    cfg: Any, image_shape: tuple[int, int, int], num_classes: int, likelihood: str
) -> BaseVAE:
    """A fresh model from the model config section (a ``vaedist.config.ModelConfig``, or anything with its
    fields: models/ imports no config).

    ``image_shape`` is (H, W, C); ``likelihood`` is the resolved one (``ExperimentConfig.likelihood``),
    which wins over ``cfg.likelihood`` (None there means the dataset default).
    """
    cls = _model_class(cfg.variant, hierarchical=cfg.stochastic_layers > 1)
    kwargs: dict[str, Any] = {
        "image_shape": tuple(image_shape),
        "num_classes": num_classes,
        "likelihood": likelihood,
        "arch": cfg.arch,
        "latent_dim": cfg.latent_dim,
        "width": cfg.width,
        "base_channels": cfg.base_channels,
        "depth": cfg.depth,
        "activation": cfg.activation,
        "blocks_per_level": cfg.blocks_per_level,
        "mixtures": cfg.mixtures,
    }
    if cls is AutoEncoder:
        kwargs["latent_noise"] = cfg.latent_noise
    if cls.conditional:
        kwargs["conditioning"] = cfg.conditioning
    if issubclass(cls, LadderVAE):
        kwargs["stochastic_layers"] = cfg.stochastic_layers
        kwargs["latent_channels"] = cfg.latent_channels
    return cls(**kwargs)


def build_model_from_hparams(hparams: dict[str, Any]) -> BaseVAE:
    """Rebuild the architecture recorded in ``model.hparams`` (weights not included).

    A knob the hparams do not record (a checkpoint older than it) takes its default, which is what such a
    model was built with; ``stochastic_layers`` present means a hierarchical model (``models/ladder.py``).
    """
    hp = dict(hparams)
    cls = _model_class(hp.pop("variant", None), hierarchical="stochastic_layers" in hp)
    shape_keys = ("image_height", "image_width", "image_channels")
    accepted = {
        name
        for klass in (cls, BaseVAE)
        for name in inspect.signature(klass.__init__).parameters
        if name not in ("self", "kwargs", "image_shape")
    }
    missing = [key for key in (*shape_keys, "num_classes", "likelihood") if key not in hp]
    unknown = sorted(set(hp) - accepted - set(shape_keys))
    if missing or unknown:
        raise ValueError(
            f"hparams do not describe a {cls.__name__}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}"
        )
    shape = tuple(hp.pop(key) for key in shape_keys)
    return cls(image_shape=shape, **hp)
