"""The vocabularies of vaedist, defined once: the allowed values of every named choice (model variants,
architectures, likelihoods, ...). The CLI's choices, the configs' checks and the models' registries
(``models.vae.MODELS``, ``models.likelihoods.LIKELIHOOD_CLASSES``, ``models.nets.ACTIVATIONS``: keyed by
the same names, kept equal by tests/test_models.py) all derive from them.

The bottom of the package: this imports nothing of vaedist (nor torch), so the plain model code and
``vaedist --help`` can read it without the configs or the data layer.
"""

from __future__ import annotations

VARIANTS = ("ae", "vae", "cvae")
ARCHS = ("dense", "conv", "resnet")
LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "mol")
CONDITIONINGS = ("onehot", "embedding")
ACTIVATIONS = ("relu", "silu")
# Mixed precision of training: auto = bf16 autocast on a CUDA device that has it, else float32.
PRECISIONS = ("auto", "bf16", "fp32")
# Generated image columns: png = the Hugging Face datasets Image struct {bytes: PNG, path: null} (every tool
# reads it), raw = a uint8 (H, W, C) Arrow fixed-shape tensor (faster; pyarrow, Ray Data and vaedist read it).
IMAGE_FORMATS = ("png", "raw")
