"""Models: plain PyTorch (no Ray, MLflow or vaedist.data imports).

Encoders/decoders (dense, conv, resnet) with size knobs, the likelihoods, and one interface for every
variant: ``BaseVAE`` with ``encode / reparameterize / decode / forward / loss / sample / generate /
iw_nll``. ``MODELS`` maps a config's ``model.variant`` to its class; ``HIERARCHICAL`` to its
hierarchical form (``stochastic_layers > 1``, ``ladder.py``).
"""

from vaedist.models.base import BaseVAE, LossOutput, count_parameters, gaussian_kl
from vaedist.models.ladder import LadderCVAE, LadderVAE
from vaedist.models.likelihoods import LIKELIHOODS, binarize, bits_per_dim, build_likelihood, to_model_input
from vaedist.models.vae import (
    CVAE,
    HIERARCHICAL,
    MODELS,
    VAE,
    AutoEncoder,
    build_model,
    build_model_from_hparams,
)

__all__ = [
    "CVAE",
    "HIERARCHICAL",
    "LIKELIHOODS",
    "MODELS",
    "VAE",
    "AutoEncoder",
    "BaseVAE",
    "LadderCVAE",
    "LadderVAE",
    "LossOutput",
    "binarize",
    "bits_per_dim",
    "build_likelihood",
    "build_model",
    "build_model_from_hparams",
    "count_parameters",
    "gaussian_kl",
    "to_model_input",
]
