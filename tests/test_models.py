"""vaedist.models: shapes for every variant x arch x likelihood, the ELBO's terms against closed
forms, likelihoods that are normalised distributions, the importance-weighted bound on a trained toy
model, a CVAE that learns real MNIST, checkpoints that round-trip, and the errors users see."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from vaedist.config import ModelConfig
from vaedist.models import (
    CVAE,
    LIKELIHOODS,
    MODELS,
    VAE,
    AutoEncoder,
    BaseVAE,
    LossOutput,
    binarize,
    bits_per_dim,
    build_likelihood,
    build_model,
    build_model_from_hparams,
    count_parameters,
    gaussian_kl,
    to_model_input,
)
from vaedist.models.nets import ConvEncoder, LabelCode

torch.set_num_threads(2)

SHAPES = [(28, 28, 1), (32, 32, 3)]
SMALL = {"latent_dim": 4, "width": 32, "base_channels": 8, "depth": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """Every test here runs on one thread (the 2 above is the cap). On a busy host, 2 OpenMP threads
    that spin at every barrier run ~10x slower than one (measured: 70 vs 800 img/s for the conv
    CVAE); on a quiet one, one thread costs the MNIST test a few seconds and the small models none."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(variant: str, arch: str, likelihood: str, shape=(28, 28, 1), **overrides) -> BaseVAE:
    cfg = ModelConfig(variant=variant, arch=arch, **{**SMALL, **overrides})
    return build_model(cfg, shape, 10, likelihood)


def fake_batch(model: BaseVAE, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Data of the kind the model's likelihood expects: binarized, or 8-bit k/255."""
    g = torch.Generator().manual_seed(seed)
    h, w, c = model.image_shape
    images = torch.randint(0, 256, (b, h, w, c), generator=g, dtype=torch.uint8)
    x = to_model_input(images)
    if model.likelihood.binarized:
        x = binarize(x, g)
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.conditional else None
    return x, y


CASES = [
    (variant, arch, likelihood, shape)
    for variant in MODELS
    for arch in ("dense", "conv")
    for likelihood in LIKELIHOODS
    for shape in SHAPES
    if not (likelihood == "bernoulli" and shape[2] == 3)
]


@pytest.mark.parametrize("variant,arch,likelihood,shape", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_every_variant_has_the_interface_shapes_and_backprops(variant, arch, likelihood, shape):
    torch.manual_seed(0)
    model = small_model(variant, arch, likelihood, shape)
    h, w, c = shape
    b, latent = 5, SMALL["latent_dim"]
    p = model.likelihood.param_channels(c)
    x, y = fake_batch(model, b)

    assert isinstance(model, MODELS[variant]) and model.variant == variant
    assert model.image_shape == shape and model.latent_dim == latent and model.num_classes == 10
    assert model.conditional == (variant == "cvae")

    mu, logvar = model.encode(x, y)
    assert mu.shape == logvar.shape == (b, latent)
    z = model.reparameterize(mu, logvar)
    assert z.shape == (b, latent)
    params = model.decode(z, y)
    assert params.shape == (b, p, h, w)
    out = model(x, y)
    assert set(out) == {"params", "mu", "logvar", "z"} and out["params"].shape == (b, p, h, w)

    losses = model.loss(x, y, beta=0.5, free_bits=0.1)
    assert isinstance(losses, LossOutput) and losses.loss.shape == ()
    for term in (losses.neg_elbo, losses.recon, losses.kl):
        assert term.shape == (b,) and torch.isfinite(term).all()
    assert torch.allclose(losses.neg_elbo, losses.recon + losses.kl)
    assert (losses.recon > 0).all()  # -log of a probability mass
    losses.loss.backward()
    grads = [prm.grad for prm in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    samples = model.sample(3, torch.tensor([0, 4, 9]) if model.conditional else None)
    assert samples.shape == (3, c, h, w)
    assert samples.min() >= 0 and samples.max() <= 1
    images = model.generate(torch.randn(b, latent), y)
    assert images.shape == (b, c, h, w) and images.min() >= 0 and images.max() <= 1
    assert model.reconstruct(x, y).shape == (b, c, h, w)

    if variant == "ae":
        with pytest.raises(NotImplementedError, match="autoencoder"):
            model.iw_nll(x, y)
    else:
        nll = model.iw_nll(x, y, k=3, chunk=2)
        assert nll.shape == (b,) and torch.isfinite(nll).all() and (nll > 0).all()


# ---------------------------------------------------------------- the ELBO's terms


def test_kl_is_the_closed_form_of_kingma_welling_appendix_b():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 8, generator=g) * 2
    logvar = torch.randn(64, 8, generator=g) * 1.5
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar).sum(-1), expected, rtol=1e-5, atol=1e-5)

    model = small_model("vae", "dense", "bernoulli")
    x, _ = fake_batch(model, 16)
    out = model(x)
    losses = model.loss_from_forward(x, out)
    std = torch.exp(0.5 * out["logvar"])
    expected = kl_divergence(Normal(out["mu"], std), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(losses.kl, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(losses.recon, -model.likelihood.log_prob(out["params"], x))


def test_loss_applies_beta_and_free_bits_but_neg_elbo_stays_the_true_bound():
    model = small_model("vae", "dense", "bernoulli")
    x, _ = fake_batch(model, 32)
    torch.manual_seed(0)
    out = model(x)
    kl_dims = gaussian_kl(out["mu"], out["logvar"]).detach()  # (B, L)
    plain = model.loss_from_forward(x, out)
    assert torch.allclose(plain.loss, plain.neg_elbo.mean())

    free_bits = kl_dims.mean(0).median().item()  # some dims are below it, some above
    shaped = model.loss_from_forward(x, out, beta=0.25, free_bits=free_bits)
    penalty = torch.clamp(kl_dims.mean(0), min=free_bits).sum()
    assert torch.allclose(shaped.loss, shaped.recon.mean() + 0.25 * penalty)
    assert shaped.loss > plain.recon.mean() + 0.25 * plain.kl.mean()  # clamping only adds
    for a, b in zip(plain[1:], shaped[1:], strict=True):  # neg_elbo, recon, kl ignore beta/free bits
        assert torch.equal(a, b)


# -------------------------------------------------------------------- likelihoods


def _all_values_of_one_pixel(likelihood: str, params_per_value: torch.Tensor) -> torch.Tensor:
    """log p of every value of one pixel under the same parameters -> (num_values,)."""
    lik = build_likelihood(likelihood)
    values = torch.tensor([0.0, 1.0]) if lik.binarized else torch.arange(256) / 255.0
    x = values.view(-1, 1, 1, 1)  # (V, 1, 1, 1)
    params = params_per_value.view(1, -1, 1, 1).expand(len(values), -1, 1, 1)
    return lik, lik.log_prob(params, x)


@pytest.mark.parametrize("logit", [-30.0, -3.0, 0.0, 0.7, 12.0])
def test_bernoulli_is_a_distribution_over_0_and_1(logit):
    _, log_p = _all_values_of_one_pixel("bernoulli", torch.tensor([logit]))
    assert torch.isclose(log_p.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)
    assert torch.isclose(log_p[1], F.logsigmoid(torch.tensor(logit)))


@pytest.mark.parametrize("mean", [-1.7, -1.0, -0.3, 0.0, 0.55, 1.0, 2.5])
@pytest.mark.parametrize("log_scale", [-9.0, -5.0, -2.0, 0.0, 3.0])
def test_discretized_logistic_sums_to_one_over_256_values(mean, log_scale):
    lik, log_p = _all_values_of_one_pixel("logistic", torch.tensor([mean, log_scale]))
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert abs(log_p.double().exp().sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("mean", [-1.7, -1.0, -0.3, 0.0, 0.55, 1.0, 2.5])
@pytest.mark.parametrize("log_sigma", [-7.0, -5.0, -2.0, 0.0, 2.0])
def test_discretized_gaussian_sums_to_one_over_256_values(mean, log_sigma):
    lik = build_likelihood("gaussian")
    with torch.no_grad():
        lik.log_sigma.fill_(log_sigma)
    x = (torch.arange(256) / 255.0).view(-1, 1, 1, 1)
    log_p = lik.log_prob(torch.full_like(x, mean), x)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert abs(log_p.double().exp().sum().item() - 1.0) < 1e-5


def _reference_bins(cdf, mean: float, scale: float) -> torch.Tensor:
    """log P(bin k) by float64 CDF differences, edges at +-inf (fine where nothing underflows)."""
    k = torch.arange(256, dtype=torch.float64)
    upper = torch.where(
        k == 255, torch.tensor(1.0, dtype=torch.float64), cdf(((2 * k + 1) / 255 - 1 - mean) / scale)
    )
    lower = torch.where(
        k == 0, torch.tensor(0.0, dtype=torch.float64), cdf(((2 * k - 1) / 255 - 1 - mean) / scale)
    )
    return torch.log(upper - lower)


@pytest.mark.parametrize("mean,log_scale", [(-0.4, -2.5), (0.3, -1.0), (0.9, 0.5)])
def test_discretized_likelihoods_match_float64_cdf_differences(mean, log_scale):
    x = (torch.arange(256) / 255.0).view(-1, 1, 1, 1)
    logistic = build_likelihood("logistic")
    params = torch.tensor([mean, log_scale]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
    expected = _reference_bins(torch.sigmoid, mean, math.exp(log_scale))
    ok = expected > -18  # where float64 differences of CDFs near 1 are still accurate
    assert ok.sum() > 100
    got = logistic.log_prob(params, x).double()
    assert torch.allclose(got[ok], expected[ok], rtol=1e-4, atol=1e-4)

    gaussian = build_likelihood("gaussian")
    with torch.no_grad():
        gaussian.log_sigma.fill_(log_scale)
    expected = _reference_bins(Normal(0.0, 1.0).cdf, mean, math.exp(log_scale))
    ok = expected > -18
    assert ok.sum() > 100
    got = gaussian.log_prob(torch.full_like(x, mean), x).double()
    assert torch.allclose(got[ok], expected[ok], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_likelihood_gradients_stay_finite_at_extreme_parameters(likelihood):
    lik = build_likelihood(likelihood)
    g = torch.Generator().manual_seed(0)
    p = lik.param_channels(3)
    params = (torch.randn(4, p, 6, 6, generator=g) * 40).requires_grad_(True)  # far tails, tiny/huge scales
    x = torch.randint(0, 256, (4, 3, 6, 6), generator=g) / 255.0
    x[0] = 0.0  # edge bins
    x[1] = 1.0
    if lik.binarized:
        x = x.round()
    log_p = lik.log_prob(params, x)
    assert log_p.shape == (4,) and torch.isfinite(log_p).all()
    log_p.sum().backward()
    assert torch.isfinite(params.grad).all()
    for prm in lik.parameters():  # the Gaussian's shared log sigma
        assert torch.isfinite(prm.grad).all()
    mean = lik.mean(params.detach())
    assert mean.shape == (4, 3, 6, 6) and mean.min() >= 0 and mean.max() <= 1


def test_gaussian_log_sigma_is_one_learned_parameter_of_the_model():
    model = small_model("vae", "conv", "gaussian")
    log_sigmas = [name for name, _ in model.named_parameters() if "log_sigma" in name]
    assert log_sigmas == ["likelihood.log_sigma"] and model.likelihood.log_sigma.shape == ()
    assert model.likelihood.param_channels(1) == 1
    assert build_likelihood("logistic").param_channels(3) == 6 and not list(
        build_likelihood("logistic").parameters()
    )
    assert [build_likelihood(name).binarized for name in LIKELIHOODS] == [
        n == "bernoulli" for n in LIKELIHOODS
    ]


def test_conversions_and_bits_per_dim():
    images = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # (1, 1, 1, 3) NHWC
    x = to_model_input(images)
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 128 / 255]))
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(images.float())

    g = torch.Generator().manual_seed(0)
    draws = binarize(torch.full((20000,), 0.3), g)
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and abs(draws.mean().item() - 0.3) < 0.02
    assert torch.equal(binarize(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))

    nll = torch.tensor([784 * math.log(2.0), 0.0])
    assert torch.allclose(bits_per_dim(nll, 784), torch.tensor([1.0, 0.0]))
    uniform = 3 * 32 * 32 * math.log(256.0)  # a uniform 8-bit model: 8 bits/dim
    assert math.isclose(bits_per_dim(torch.tensor(uniform), 3 * 32 * 32).item(), 8.0, rel_tol=1e-6)


# ------------------------------------------------------------------------ networks


@pytest.mark.parametrize("conditioning", ["onehot", "embedding"])
def test_conv_encoder_label_maps_equal_explicit_concatenation(conditioning):
    torch.manual_seed(0)
    code = LabelCode(10, conditioning, embedding_dim=6)
    enc = ConvEncoder((16, 12, 3), 8, base_channels=4, depth=2, cond_dim=code.dim)
    x = torch.rand(7, 3, 16, 12)
    cond = code(torch.randint(0, 10, (7,)))
    maps = cond[:, :, None, None].expand(-1, -1, 16, 12)
    explicit = enc.first(torch.cat([x, maps], dim=1))
    assert torch.allclose(enc.first_conv(x, cond), explicit, atol=1e-5)


def test_size_knobs_shape_the_networks():
    dense = small_model("vae", "dense", "bernoulli", width=16, depth=3)
    linears = [m for m in dense.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 16, 2 * SMALL["latent_dim"]]

    conv = small_model("vae", "conv", "logistic", (32, 32, 3), base_channels=4, depth=5)
    convs = [m for m in conv.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [4, 8, 16, 32, 32]  # doubled per block, capped at 8x
    assert conv.decoder(torch.zeros(2, SMALL["latent_dim"])).shape == (2, 6, 32, 32)
    assert count_parameters(conv) > count_parameters(small_model("vae", "conv", "logistic", (32, 32, 3)))

    cvae = small_model("cvae", "conv", "bernoulli", conditioning="embedding")
    assert isinstance(cvae.label_code.embedding, torch.nn.Embedding)
    assert cvae.hparams["conditioning"] == "embedding"
    with pytest.raises(ValueError, match="divisible by 8"):
        small_model("vae", "conv", "bernoulli", depth=3)  # 28 is not divisible by 8


# ------------------------------------------------------------------------- variants


def test_autoencoder_is_deterministic_in_eval_and_noisy_in_training():
    model = small_model("ae", "dense", "bernoulli", latent_noise=0.5)
    x, _ = fake_batch(model, 8)
    mu, logvar = model.encode(x)
    assert torch.equal(logvar, torch.zeros_like(mu))
    model.eval()
    assert torch.equal(model(x)["z"], mu)
    first = model.loss(x)
    assert torch.equal(first.loss, model.loss(x).loss)  # deterministic
    assert torch.equal(first.kl, torch.zeros(8)) and torch.equal(first.neg_elbo, first.recon)
    model.train()
    noise = model(x)["z"] - mu
    assert 0.3 < noise.std().item() < 0.7
    assert model.hparams["latent_noise"] == 0.5


def test_sampling_is_reproducible_and_temperature_scales_z():
    model = small_model("cvae", "dense", "logistic")
    y = torch.arange(6) % 10
    a = model.sample(6, y, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    cold = model.sample(6, 4, temperature=0.0)  # one int label for all rows; z = 0
    assert torch.allclose(cold, model.generate(torch.zeros(6, SMALL["latent_dim"]), torch.full((6,), 4)))
    assert torch.allclose(cold, cold[:1].expand_as(cold))


def test_build_model_follows_the_config_and_the_resolved_likelihood():
    cfg = ModelConfig(variant="cvae", arch="dense", latent_dim=3, width=24, depth=1, likelihood="gaussian")
    model = build_model(cfg, (28, 28, 1), 10, "bernoulli")  # the resolved likelihood wins
    assert type(model) is CVAE and model.likelihood.name == "bernoulli" and model.latent_dim == 3
    assert model.hparams["conditioning"] == "onehot" and model.hparams["width"] == 24
    assert type(build_model(ModelConfig(variant="vae"), (28, 28, 1), 10, "bernoulli")) is VAE
    assert type(build_model(ModelConfig(variant="ae"), (28, 28, 1), 10, "bernoulli")) is AutoEncoder


@pytest.mark.parametrize(
    "variant,arch,likelihood,extra",
    [
        ("cvae", "conv", "gaussian", {"conditioning": "embedding"}),
        ("vae", "dense", "logistic", {}),
        ("ae", "conv", "bernoulli", {"latent_noise": 0.3}),
    ],
)
def test_hparams_round_trip_through_a_weights_only_checkpoint(tmp_path, variant, arch, likelihood, extra):
    torch.manual_seed(0)
    model = small_model(
        variant, arch, likelihood, (32, 32, 3) if likelihood != "bernoulli" else (28, 28, 1), **extra
    )
    with torch.no_grad():  # move every parameter away from its init, log sigma included
        for prm in model.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    assert all(isinstance(v, str | int | float) for v in model.hparams.values())
    path = tmp_path / "model.pt"
    torch.save({"hparams": model.hparams, "state_dict": model.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    clone = build_model_from_hparams(ckpt["hparams"])
    clone.load_state_dict(ckpt["state_dict"])
    assert type(clone) is type(model) and clone.hparams == model.hparams
    z = torch.randn(4, SMALL["latent_dim"])
    y = torch.tensor([0, 1, 2, 3]) if model.conditional else None
    assert torch.equal(clone.generate(z, y), model.generate(z, y))


# --------------------------------------------------------------------------- errors


def test_labels_are_required_exactly_when_the_model_is_conditional():
    cvae = small_model("cvae", "conv", "bernoulli")
    x, y = fake_batch(cvae, 4)
    for call in (
        lambda: cvae.encode(x),
        lambda: cvae.loss(x),
        lambda: cvae.sample(4),
        lambda: cvae.iw_nll(x),
    ):
        with pytest.raises(ValueError, match="conditional: pass labels y"):
            call()
    with pytest.raises(ValueError, match=r"int64 of shape \(4,\)"):
        cvae.loss(x, y[:3])
    with pytest.raises(ValueError, match="int64"):
        cvae.sample(4, y.float())

    for variant in ("vae", "ae"):
        model = small_model(variant, "dense", "bernoulli")
        for call in (
            lambda m=model: m.loss(x, y),
            lambda m=model: m.sample(4, y),
            lambda m=model: m.generate(torch.zeros(4, 4), y),
        ):
            with pytest.raises(ValueError, match="unconditional"):
                call()


def test_unknown_names_and_wrong_shapes_fail_clearly():
    good = ModelConfig(variant="vae", arch="dense", **SMALL)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        build_model(good, (28, 28, 1), 10, "poisson")
    fields = {**vars(good), "variant": "gan"}
    with pytest.raises(ValueError, match="unknown model variant 'gan'.*ae, vae, cvae"):
        build_model(SimpleNamespace(**fields), (28, 28, 1), 10, "bernoulli")
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        build_model(SimpleNamespace(**{**vars(good), "arch": "rnn"}), (28, 28, 1), 10, "bernoulli")
    with pytest.raises(ValueError, match="unknown conditioning 'film'"):
        build_model(
            SimpleNamespace(**{**vars(good), "variant": "cvae", "conditioning": "film"}),
            (28, 28, 1),
            10,
            "bernoulli",
        )

    hparams = small_model("vae", "dense", "bernoulli").hparams
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model_from_hparams({**hparams, "variant": "flow"})
    with pytest.raises(ValueError, match="unknown likelihood"):
        build_model_from_hparams({**hparams, "likelihood": "cauchy"})
    with pytest.raises(ValueError, match=r"unknown \['dropout'\]"):
        build_model_from_hparams({**hparams, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"missing \['image_width'\]"):
        build_model_from_hparams({k: v for k, v in hparams.items() if k != "image_width"})

    model = small_model("vae", "conv", "bernoulli")
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*to_model_input"):
        model.loss(torch.zeros(2, 28, 28, 1))


# ------------------------------------------------------------- the bound, trained


def _toy_binary_images(n: int, g: torch.Generator) -> torch.Tensor:
    """8x8 binary images: one of 6 fixed random patterns with 8% of pixels flipped."""
    protos = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(123)) < 0.4).float()
    idx = torch.randint(0, 6, (n,), generator=g)
    flip = torch.rand(n, 1, 8, 8, generator=g) < 0.08
    return torch.where(flip, 1 - protos[idx], protos[idx])


def test_importance_weighted_bound_tightens_with_k_on_a_trained_model():
    g = torch.Generator().manual_seed(0)
    train, test = _toy_binary_images(2048, g), _toy_binary_images(512, g)
    torch.manual_seed(0)
    model = VAE(
        image_shape=(8, 8, 1),
        num_classes=6,
        likelihood="bernoulli",
        arch="dense",
        latent_dim=2,
        width=64,
        depth=1,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(test).neg_elbo.mean().item()
    for _ in range(400):
        loss = model.loss(train[torch.randint(0, 2048, (64,), generator=g)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        neg_elbo = torch.stack([model.loss(test).neg_elbo for _ in range(20)]).mean().item()
        # Each estimate averaged over 512 images and 4 seeds: std ~0.03 (k=1), ~0.01 (k=5, 50) nats.
        nll = {
            k: sum(
                model.iw_nll(test, k=k, generator=torch.Generator().manual_seed(s)).mean().item()
                for s in range(4)
            )
            / 4
            for k in (1, 5, 50)
        }
    assert neg_elbo < first - 10  # it trained (about 45 -> 22 nats)
    # k = 1 is the ELBO estimator: equal in expectation.
    assert abs(nll[1] - neg_elbo) < 0.2
    # Burda et al. 2016, Thm. 1: log p(x) >= L_k+1 >= L_k >= L_1 = ELBO. Gaps here ~0.3 and ~0.1 nats.
    assert nll[1] - nll[5] > 0.1
    assert nll[5] - nll[50] > 0.04
    assert nll[50] < neg_elbo - 0.25


# ------------------------------------------------------------------- real MNIST


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(os.environ.get("VAEDIST_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    assert (root / "mnist").is_dir(), f"real MNIST is missing under {root} (set VAEDIST_DATA_DIR)"
    from vaedist.data import load_split

    return load_split("mnist", split, root=root)


@pytest.mark.slow
def test_cvae_learns_real_mnist_and_its_samples_follow_the_label():
    images, labels = _mnist("train")
    u8_train, y_train = torch.tensor(images), torch.tensor(labels)  # (N, 28, 28, 1) uint8, (N,)
    test_images, test_labels = _mnist("test")
    g = torch.Generator().manual_seed(0)
    x_test = binarize(to_model_input(torch.tensor(test_images[:512])), g)
    y_test = torch.tensor(test_labels[:512])

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="cvae", arch="conv"), (28, 28, 1), 10, "bernoulli")

    def held_out_recon() -> float:
        model.eval()
        with torch.no_grad():
            recon = model.loss(x_test, y_test).recon.mean().item()
        model.train()
        return recon

    before = held_out_recon()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(400):
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        loss = model.loss(binarize(to_model_input(u8_train[idx]), g), y_train[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_recon()
    assert after < 0.3 * before  # ~550 -> ~105 nats
    assert after < 140

    # Samples of label c look like class c: mean images differ across labels far more than two
    # independent draws of the same label do, and real class means classify them well above chance.
    per_label = 400
    y = torch.arange(10).repeat_interleave(per_label)
    draws = [model.sample(len(y), y, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    means = [torch.stack([d[y == c].mean(0) for c in range(10)]).flatten(1) for d in draws]  # (10, 784)
    within = (means[0] - means[1]).norm(dim=1).max()
    between = torch.cdist(means[0], means[0])[~torch.eye(10, dtype=torch.bool)].min()
    assert between > 2 * within
    class_means = torch.stack([to_model_input(u8_train[y_train == c][:2000]).mean(0) for c in range(10)])
    class_means = class_means.flatten(1)  # (10, 784)
    nearest = torch.cdist(draws[0].flatten(1), class_means).argmin(1)
    assert (nearest == y).float().mean() > 0.25  # chance: 0.1


def test_model_registries_speak_the_config_vocabulary():
    """choices.py holds the names (torch-free, for the CLI and validation); models/ keys its classes by them,
    and config.py names the same tuples."""
    from vaedist import choices, config
    from vaedist.models.likelihoods import LIKELIHOOD_CLASSES
    from vaedist.models.vae import MODELS

    assert tuple(MODELS) == choices.VARIANTS == config.VARIANTS
    assert tuple(LIKELIHOOD_CLASSES) == choices.LIKELIHOODS == config.LIKELIHOODS


def test_the_models_import_neither_the_configs_nor_the_data_layer():
    """models/ is plain PyTorch: importing it (every family built) loads no vaedist.config and no vaedist.data."""
    import subprocess
    import sys

    code = ("import sys, vaedist.models, vaedist.models.blocks; "
            "print(sorted(m for m in sys.modules if m.startswith(('vaedist.config', 'vaedist.data'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_arch_activation_and_hierarchy_in_the_vocabulary_builds():
    """The new names (resnet, mol, silu, stochastic_layers) are config vocabulary that models/ builds."""
    from vaedist import config
    from vaedist.models.layers import ACTIVATIONS
    from vaedist.models.vae import HIERARCHICAL

    assert tuple(ACTIVATIONS) == config.ACTIVATIONS
    assert set(HIERARCHICAL) == {"vae", "cvae"} <= set(config.VARIANTS)
    for arch in config.ARCHS:
        for layers in (1, 2):
            cfg = ModelConfig(variant="cvae", arch=arch, stochastic_layers=layers, activation="silu", **SMALL)
            model = build_model(cfg, (8, 8, 1), 10, "mol")
            assert model.stochastic_layers == layers and model.hparams["arch"] == arch
            x, y = fake_batch(model, 2)
            assert model.loss(x, y).kl_layers.shape == (2, layers)


# Exactly what a checkpoint written before resnet / mol / hierarchies held: no key for the new knobs.
OLD_HPARAMS = {
    "variant": "cvae", "arch": "conv", "likelihood": "bernoulli", "image_height": 28, "image_width": 28,
    "image_channels": 1, "num_classes": 10, "latent_dim": 4, "width": 32, "base_channels": 8, "depth": 2,
    "activation": "relu", "conditioning": "onehot", "embedding_dim": 16,
}  # fmt: skip
OLD_KEYS = {
    "encoder.first.weight", "encoder.first.bias", "encoder.blocks.1.weight", "encoder.blocks.1.bias",
    "encoder.head.weight", "encoder.head.bias", "decoder.fc.0.weight", "decoder.fc.0.bias",
    "decoder.blocks.0.weight", "decoder.blocks.0.bias", "decoder.blocks.2.weight", "decoder.blocks.2.bias",
}  # fmt: skip


def test_a_checkpoint_from_before_the_new_knobs_still_loads(tmp_path):
    from vaedist.checkpoint import load_model

    torch.manual_seed(0)
    old = small_model("cvae", "conv", "bernoulli")
    assert set(old.state_dict()) == OLD_KEYS and old.hparams == OLD_HPARAMS  # layout and record unchanged
    path = tmp_path / "model.pt"
    torch.save({"dataset": {}, "hparams": OLD_HPARAMS, "state_dict": old.state_dict(), "optimizer": {},
                "epoch": 3, "config": {"model.variant": "cvae"}, "metrics": {}}, path)  # fmt: skip
    model, _ = load_model(path)
    assert type(model) is CVAE and model.stochastic_layers == 1 and model.hparams == OLD_HPARAMS
    z, y = torch.randn(2, 4), torch.tensor([3, 4])
    assert torch.equal(model.generate(z, y), old.eval().generate(z, y))
