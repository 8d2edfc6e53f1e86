"""The hierarchical VAE (models/ladder.py): one layer agrees exactly with the plain VAE given the same weights;
per-layer KLs are the closed form in noise space and sum to the KL; the importance-weighted bound sits
above the ELBO and tightens with k; inference runs down the generative path; every command's interface
(loss, sample, generate, reconstruct, encode, iw_nll, checkpoints, torch.export) works; old checkpoints load."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaedist.checkpoint import load_model, save_checkpoint
from vaedist.config import ConfigError, ModelConfig
from vaedist.models import (
    CVAE,
    VAE,
    LadderCVAE,
    LadderVAE,
    binarize,
    build_model,
    build_model_from_hparams,
    gaussian_kl,
    to_model_input,
)

SMALL = {
    "latent_dim": 3,
    "width": 24,
    "base_channels": 4,
    "depth": 2,
    "blocks_per_level": 1,
    "latent_channels": 2,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models run faster on one


def ladder(variant: str = "vae", arch: str = "conv", likelihood: str = "bernoulli", shape=(8, 8, 1), layers: int = 3,
           seed: int = 0, **overrides):  # fmt: skip
    """A small hierarchical model with every weight moved off its init (the zero-initialised heads too, so
    priors, posteriors and their KLs are not trivially N(0, I))."""
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, arch=arch, stochastic_layers=layers, **{**SMALL, **overrides})
    model = build_model(cfg, shape, 10, likelihood)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    return model


def batch(model, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w, c = model.image_shape
    x = to_model_input(torch.randint(0, 256, (b, h, w, c), generator=g, dtype=torch.uint8))
    if model.likelihood.binarized:
        x = binarize(x, g)
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.conditional else None
    return x, y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- one layer = the VAE


@pytest.mark.parametrize("variant,arch", [("vae", "conv"), ("cvae", "resnet"), ("cvae", "dense")])
def test_one_stochastic_layer_is_the_plain_vae_given_the_same_weights(variant, arch):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, arch=arch, **SMALL)
    plain = build_model(cfg, (8, 8, 1), 10, "bernoulli")
    hier = (LadderCVAE if variant == "cvae" else LadderVAE)(
        stochastic_layers=1, latent_channels=2, **_kwargs(plain)
    )
    hier.load_state_dict(plain.state_dict())  # strict: the same parameters, no others
    assert type(plain) is (CVAE if variant == "cvae" else VAE) and hier.latent_dim == plain.latent_dim == 3
    x, y = batch(plain, 16)

    a = plain.loss_from_forward(x, plain(x, y, generator=gen(1)), beta=0.7)
    b = hier.loss_from_forward(x, hier(x, y, generator=gen(1)), beta=0.7)
    for name in ("neg_elbo", "recon", "kl", "kl_layers"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5), name
    assert torch.allclose(a.loss, b.loss, rtol=1e-5) and b.kl_layers.shape == (16, 1)
    for pa, pb in zip(plain.encode(x, y), hier.encode(x, y), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    z = torch.randn(16, 3)
    assert torch.allclose(plain.generate(z, y), hier.generate(z, y), atol=1e-6)
    iw_a = plain.iw_nll(x, y, k=7, chunk=3, generator=gen(2))
    iw_b = hier.iw_nll(x, y, k=7, chunk=3, generator=gen(2))
    assert torch.allclose(iw_a, iw_b, rtol=1e-5, atol=1e-4)


def _kwargs(model) -> dict:
    hp = dict(model.hparams)
    hp.pop("variant")
    shape = tuple(hp.pop(k) for k in ("image_height", "image_width", "image_channels"))
    return {"image_shape": shape, **hp}


# -------------------------------------------------------------------- the ELBO, per layer


def test_noise_space_kl_is_the_kl_between_the_layer_posterior_and_prior():
    """NVAE eq. 2: with q = N(mu_p + sigma_p mu_e, (sigma_p sigma_e)^2) and p = N(mu_p, sigma_p^2),
    KL(q || p) = KL(N(mu_e, sigma_e^2) || N(0, 1)): what the model computes per layer."""
    g = gen(0)
    mu_p, logvar_p, mu_e, logvar_e = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    sig_p, sig_e = torch.exp(0.5 * logvar_p), torch.exp(0.5 * logvar_e)
    direct = kl_divergence(Normal(mu_p + sig_p * mu_e, sig_p * sig_e), Normal(mu_p, sig_p))
    assert torch.allclose(gaussian_kl(mu_e, logvar_e), direct, atol=1e-10)


@pytest.mark.parametrize("arch", ["dense", "conv", "resnet"])
def test_kl_per_layer_is_non_negative_sums_to_the_kl_and_free_bits_work_per_layer(arch):
    model = ladder("cvae", arch, layers=3)
    x, y = batch(model, 12)
    out = model.loss(x, y)
    assert out.kl_layers.shape == (12, 3) and (out.kl_layers >= 0).all()
    assert (out.kl_layers > 0).all()  # every layer carries information at these weights
    assert torch.allclose(out.kl_layers.sum(1), out.kl) and torch.allclose(out.neg_elbo, out.recon + out.kl)
    assert model.layer_dims[0] == 3 and sum(model.layer_dims) == model.latent_dim

    fwd = model(x, y, generator=gen(3))
    beta, free_bits = 0.5, 0.3
    res = model.loss_from_forward(x, fwd, beta=beta, free_bits=free_bits)
    floors = torch.tensor(model.layer_dims, dtype=torch.float32) * free_bits
    expected = res.recon.mean() + beta * torch.maximum(res.kl_layers.mean(0), floors).sum()
    assert torch.allclose(res.loss, expected)
    assert torch.equal(
        res.neg_elbo, model.loss_from_forward(x, fwd).neg_elbo
    )  # the bound ignores beta, free bits


def test_inference_runs_down_the_generative_path():
    """forward's params are decode(forward's noise): q's samples and p's decoder are one path (top-down
    inference); encode's means decode to reconstruct's images."""
    for model in (ladder("vae", "conv"), ladder("cvae", "resnet", "mol", (8, 8, 3), mixtures=2)):
        x, y = batch(model, 6)
        out = model(x, y, generator=gen(4))
        assert out["z"].shape == out["mu"].shape == out["logvar"].shape == (6, model.latent_dim)
        assert torch.allclose(model.decode(out["z"], y), out["params"], atol=1e-5)
        mu, _ = model.encode(x, y)
        assert torch.allclose(model.reconstruct(x, y), model.generate(mu, y))
        top_mu = model.encoder(x, model._label_code(y, 6, x.dtype)).chunk(2, 1)[0]
        assert torch.allclose(mu[:, :3], top_mu, atol=1e-6)  # the top layer's posterior is the encoder's


def test_importance_weighted_bound_is_above_the_elbo_and_tightens_with_k():
    """Burda et al. 2016, theorem 1: E[-iw_nll(k)] = E[log mean_k w] increases with k and equals the ELBO at
    k = 1. Checked on 64 images of a 3-layer model, averaged over images."""
    model = ladder("vae", "conv", layers=3).eval()
    with torch.no_grad():  # posteriors of the lower layers far from the true one: a wide gap to close
        for layer in model.latents:
            layer.posterior.weight.add_(0.3 * torch.randn(layer.posterior.weight.shape, generator=gen(9)))
    x, _ = batch(model, 64)
    neg_elbo = torch.stack(
        [model.loss_from_forward(x, model(x, generator=gen(s))).neg_elbo for s in range(20)]
    ).mean(0)
    iw = {k: model.iw_nll(x, k=k, chunk=25, generator=gen(100 + k)) for k in (1, 10, 100)}  # (64,) each
    # k = 1 is the ELBO with the log-density ratio in place of the closed-form KL: equal in expectation
    k1 = torch.stack([iw[1], *(model.iw_nll(x, k=1, generator=gen(200 + s)) for s in range(3))]).mean(0)
    diff = k1 - neg_elbo  # (64,)
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(64)
    mean = {k: v.mean() for k, v in iw.items()}
    assert mean[100] < mean[10] - 1.0 < mean[1] - 2.0  # a real gap at these weights, closing with k
    assert mean[10] < neg_elbo.mean()  # the IW bound on log p(x) is above the ELBO
    assert torch.isfinite(torch.stack(list(iw.values()))).all()


# ---------------------------------------------------------------- generation, interface


@pytest.mark.parametrize(
    "variant,arch,likelihood,shape",
    [
        ("vae", "dense", "gaussian", (8, 8, 1)),
        ("cvae", "conv", "logistic", (8, 8, 3)),
        ("cvae", "resnet", "mol", (8, 8, 1)),
        ("vae", "resnet", "bernoulli", (8, 8, 1)),
    ],  # fmt: skip
)
def test_every_hierarchical_variant_speaks_the_basevae_interface(variant, arch, likelihood, shape):
    model = ladder(variant, arch, likelihood, shape, layers=2, mixtures=2)
    h, w, c = shape
    assert isinstance(model, LadderCVAE if variant == "cvae" else LadderVAE) and model.stochastic_layers == 2
    assert model.conditional == (variant == "cvae") and model.top_latent_dim == 3
    x, y = batch(model, 4)
    losses = model.loss(x, y, beta=0.5, free_bits=0.05)
    losses.loss.backward()
    # DDP without find_unused_parameters: every parameter takes part in the loss
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    labels = torch.tensor([0, 3, 9]) if model.conditional else None
    samples = model.sample(3, labels, generator=gen(0))
    assert samples.shape == (3, c, h, w) and samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, model.sample(3, labels, generator=gen(0)))
    cold = model.sample(3, labels, temperature=0.0)  # every layer at its prior mean
    assert torch.allclose(cold, model.generate(torch.zeros(3, model.latent_dim), labels))
    assert model.reconstruct(x, y).shape == (4, c, h, w)
    nll = model.iw_nll(x, y, k=3, chunk=2)
    assert nll.shape == (4,) and torch.isfinite(nll).all() and (nll > 0).all()
    with pytest.raises(ValueError, match=rf"decodes z of shape \(B, {model.latent_dim}\)"):
        model.decode(torch.zeros(2, 3), labels[:2] if labels is not None else None)


def test_the_label_steers_a_hierarchical_cvae_and_is_required():
    model = ladder("cvae", "conv", layers=3)
    z = torch.randn(2, model.latent_dim, generator=gen(0))
    assert not torch.allclose(model.generate(z, 1), model.generate(z, 7))
    x, y = batch(model, 2)
    with pytest.raises(ValueError, match="conditional: pass labels y"):
        model.loss(x)
    with pytest.raises(ValueError, match="unconditional"):
        ladder("vae", "conv").sample(2, 3)


def test_the_hierarchical_generator_exports_as_champion_logs_it():
    """champion.py logs generate(z, label) as a torch.export graph: the top-down path must trace."""

    class Generator(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, z, label):
            return self.model.generate(z, label)

    model = ladder("cvae", "resnet", "mol", (8, 8, 3), layers=3, mixtures=2).eval()
    z, y = torch.randn(2, model.latent_dim, generator=gen(0)), torch.arange(2)
    program = torch.export.export(Generator(model), (z, y))
    assert torch.allclose(program.module()(z, y), model.generate(z, y))


def test_pictures_and_test_set_scoring_take_a_hierarchical_model():
    """What training's pictures and ``evaluate likelihood`` call: every picture renders (the scatter on the
    top latent), and a shard's scores equal the unsplit pass's (the layer-by-layer draws come from the
    batch's own generator)."""
    import numpy as np

    from vaedist.evaluate.likelihood import score_images
    from vaedist.pictures import EpochPictures

    model = ladder("cvae", "resnet", "mol", (8, 8, 3), layers=3, mixtures=2)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 10
    pictures = EpochPictures(model, images, labels, tuple(str(i) for i in range(10)), n_scatter=40).render()
    assert set(pictures) == {"samples", "reconstructions", "latent_scatter", "interpolation", "class_by_z"}
    assert all(v.dtype == np.uint8 and v.ndim == 3 for v in pictures.values())
    whole = score_images(model, images, labels, 0, 40, k=5, k_batch=2, batch_size=16, seed=0)
    part = score_images(model, images, labels, 16, 40, k=5, k_batch=2, batch_size=16, seed=0)
    for key in ("neg_elbo", "recon", "kl", "iw_nll"):
        assert np.allclose(whole[key][16:], part[key]) and np.isfinite(whole[key]).all()
    assert np.allclose(whole["neg_elbo"], whole["recon"] + whole["kl"])


# ------------------------------------------------------------------ config, checkpoints


def test_config_refuses_hierarchies_that_cannot_be_built():
    assert ModelConfig(variant="vae", stochastic_layers=3, depth=2).stochastic_layers == 3
    with pytest.raises(ConfigError, match=r"model.stochastic_layers: 4 layers need depth >= 3.*got depth 2"):
        ModelConfig(variant="vae", stochastic_layers=4, depth=2)
    with pytest.raises(
        ConfigError, match="model.stochastic_layers: a hierarchy of latents needs variant vae or cvae"
    ):
        ModelConfig(variant="ae", stochastic_layers=2)
    with pytest.raises(ConfigError, match="model.stochastic_layers: must be an integer >= 1"):
        ModelConfig(stochastic_layers=0)
    with pytest.raises(ConfigError, match="model.latent_channels"):
        ModelConfig(latent_channels=0)
    with pytest.raises(ValueError, match="need depth >= 2"):
        LadderVAE(image_shape=(8, 8, 1), num_classes=10, likelihood="bernoulli", depth=1, stochastic_layers=3)


@pytest.mark.parametrize("variant,arch,likelihood", [("vae", "conv", "bernoulli"), ("cvae", "resnet", "mol"),
                                                     ("cvae", "dense", "logistic")])  # fmt: skip
def test_hierarchical_checkpoints_round_trip(tmp_path, variant, arch, likelihood):
    model = ladder(
        variant, arch, likelihood, (8, 8, 3) if likelihood != "bernoulli" else (8, 8, 1), mixtures=3
    )
    path = tmp_path / "model.pt"
    save_checkpoint(path, model.eval(), None, 1, {}, {})
    clone, ckpt = load_model(path)
    assert type(clone) is type(model) and clone.hparams == model.hparams
    assert ckpt["hparams"]["stochastic_layers"] == 3 and ckpt["hparams"]["latent_channels"] == 2
    z = torch.randn(3, model.latent_dim, generator=gen(0))
    y = torch.arange(3) if model.conditional else None
    assert torch.equal(clone.generate(z, y), model.generate(z, y))
    assert build_model_from_hparams(model.hparams).latent_dim == model.latent_dim


def test_training_sums_carry_the_kl_of_every_layer_for_the_epoch_metrics():
    """loop.Sums keeps per-layer KL sums (all-reduced with the rest): the worker logs val_kl_layer{i}."""
    from vaedist import loop

    model = ladder(layers=3)
    x, y = batch(model, 6)
    sums = loop.Sums()
    for _ in range(2):
        sums.add(model.loss(x, y), len(x))
    means = loop.Sums.means(sums.as_tensor(), num_dims=64)
    layers = [means[f"kl_layer{i}"] for i in range(3)]
    assert all(v >= 0 for v in layers) and math.isclose(sum(layers), means["kl"], rel_tol=1e-5)
    flat = loop.Sums()
    flat.add(ladder(layers=1).loss(x, y), len(x))
    assert not any(k.startswith("kl_layer") for k in loop.Sums.means(flat.as_tensor(), 64))
