"""The discretized mixture of logistics (Salimans et al. 2017): a normalised distribution over the 256 grey
levels and over the 256^3 colours of a pixel, PixelCNN++'s channel coupling, one component = the discretized
logistic, a sharp mean image, finite gradients, and its place in models and the config."""

from __future__ import annotations

import pytest
import torch

from vaedist.config import ConfigError, ModelConfig
from vaedist.models import build_model, to_model_input
from vaedist.models.likelihoods import DiscretizedLogistic, DiscretizedMixtureLogistic

VALUES = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit value, as the model sees it


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models run faster on one


def random_params(
    mol: DiscretizedMixtureLogistic, channels: int, seed: int, spread: float = 1.0
) -> torch.Tensor:
    """One pixel's parameters (1, P, 1, 1), float64; ``spread`` scales log-scales towards sharp or flat."""
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(1, mol.param_channels(channels), 1, 1, generator=g, dtype=torch.float64)
    m = mol.mixtures
    params[:, m + m * channels : m + 2 * m * channels] *= spread  # log-scales
    return params


def pixel_log_probs(mol, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log P of each single-pixel image in ``x`` (N, C, 1, 1) under one pixel's ``params`` (1, P, 1, 1)."""
    return mol.log_prob(params.expand(len(x), -1, -1, -1), x)


def test_parameter_channels_follow_pixelcnnpp():
    assert DiscretizedMixtureLogistic(10).param_channels(3) == 100  # PixelCNN++: 10 per component
    assert DiscretizedMixtureLogistic(5).param_channels(1) == 15  # logit, mean, log-scale
    assert DiscretizedMixtureLogistic(2).param_channels(2) == 2 * (1 + 4 + 1)
    with pytest.raises(ValueError, match="mixtures >= 1"):
        DiscretizedMixtureLogistic(0)


@pytest.mark.parametrize("mixtures,spread,seed", [(1, 1.0, 0), (5, 1.0, 1), (10, 3.0, 2), (3, -3.0, 3)])
def test_grey_levels_sum_to_one_over_256_values(mixtures, spread, seed):
    mol = DiscretizedMixtureLogistic(mixtures)
    params = random_params(mol, 1, seed, spread)
    log_p = pixel_log_probs(mol, params, VALUES.view(256, 1, 1, 1))
    assert torch.allclose(torch.logsumexp(log_p, 0).exp(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("mixtures,seed", [(2, 0), (5, 1)])
def test_colours_sum_to_one_over_all_256_cubed_values(mixtures, seed):
    """sum_{r,g,b} P(r, g, b) = 1, checked as: for a red level r, the sum over all 65536 (g, b) is the
    red marginal sum_i pi_i P_logistic(r | mu_ir, s_ir), a grey-level mixture with the red parameters,
    which sums to one over r (above). Red levels at both edges and inside."""
    mol = DiscretizedMixtureLogistic(mixtures)
    params = random_params(mol, 3, seed)
    m = mixtures
    flat = params.flatten()  # logits (m), means (m, 3), log-scales (m, 3), coefficients (m, 3)
    logits, means, log_scales = flat[:m], flat[m : 4 * m].view(m, 3), flat[4 * m : 7 * m].view(m, 3)
    red = torch.cat([logits, means[:, 0], log_scales[:, 0]]).view(1, 3 * m, 1, 1)
    grey = DiscretizedMixtureLogistic(mixtures)
    g_, b_ = torch.meshgrid(VALUES, VALUES, indexing="ij")
    for r in (0, 1, 128, 254, 255):
        rgb = (
            torch.stack([torch.full_like(g_, r / 255), g_, b_]).flatten(1).T.reshape(-1, 3, 1, 1)
        )  # (65536, 3, 1, 1)
        joint = torch.logsumexp(pixel_log_probs(mol, params, rgb), 0)
        marginal = pixel_log_probs(grey, red, torch.full((1, 1, 1, 1), r / 255, dtype=torch.float64))[0]
        assert torch.allclose(joint, marginal, atol=1e-9), r


def test_channels_are_coupled_as_in_pixelcnnpp():
    """One component: log P(r,g,b) = log L(r | mu_r) + log L(g | mu_g + a r) + log L(b | mu_b + b r + c g),
    with (a, b, c) = tanh(coefficients) and r, g, b on [-1, 1] (Salimans et al. 2017, sec. 2.2)."""
    mol, logistic = DiscretizedMixtureLogistic(1), DiscretizedLogistic()
    g = torch.Generator().manual_seed(0)
    params = torch.randn(4, 10, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randint(0, 256, (4, 3, 2, 2), generator=g).double() / 255
    mu, log_s, coef = params[:, 1:4], params[:, 4:7], torch.tanh(params[:, 7:10])
    v = 2 * x - 1
    shifted = torch.stack([mu[:, 0], mu[:, 1] + coef[:, 0] * v[:, 0],
                           mu[:, 2] + coef[:, 1] * v[:, 0] + coef[:, 2] * v[:, 1]], 1)  # fmt: skip
    expected = logistic.log_prob(torch.cat([shifted, log_s], 1), x)
    assert torch.allclose(mol.log_prob(params, x), expected, atol=1e-10)

    grey = torch.randn(4, 3, 2, 2, generator=g)  # one component, one channel: the discretized logistic itself
    xg = x[:, :1].float()
    assert torch.allclose(
        DiscretizedMixtureLogistic(1).log_prob(grey, xg), logistic.log_prob(grey[:, 1:], xg)
    )


def test_mean_is_the_most_probable_components_coupled_centre():
    mol = DiscretizedMixtureLogistic(2)
    params = torch.zeros(1, 20, 1, 1)
    params[0, :2, 0, 0] = torch.tensor([-5.0, 5.0])  # component 1 dominates
    params[0, 2:8, 0, 0] = torch.tensor([0.9, 0.9, 0.9, -0.5, 0.2, 0.1])  # means (component, channel)
    params[0, 14:20, 0, 0] = torch.tensor(
        [0.0, 0.0, 0.0, 1e6, 1e6, -1e6]
    )  # coefficients: component 1: +1, +1, -1
    r = -0.5
    g = 0.2 + r
    b = min(1.0, max(-1.0, 0.1 + r - g))
    expected = (torch.tensor([r, g, b]) + 1) / 2
    assert torch.allclose(mol.mean(params).flatten(), expected, atol=1e-6)
    out = DiscretizedMixtureLogistic(10).mean(torch.randn(3, 100, 4, 4) * 5)
    assert out.shape == (3, 3, 4, 4) and out.min() >= 0 and out.max() <= 1


def test_gradients_stay_finite_at_extreme_parameters():
    mol = DiscretizedMixtureLogistic(4)
    params = (torch.randn(2, mol.param_channels(3), 3, 3) * 30).requires_grad_()
    x = (
        torch.tensor([0.0, 1.0, 128 / 255]).repeat(2, 3, 3, 1).permute(0, 3, 1, 2).contiguous()
    )  # edges, middle
    mol.log_prob(params, x).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_models_and_config_take_the_mixture():
    cfg = ModelConfig(
        variant="vae", arch="conv", latent_dim=4, base_channels=4, depth=2, likelihood="mol", mixtures=3
    )
    model = build_model(cfg, (8, 8, 3), 10, "mol")
    assert model.likelihood.mixtures == 3 and model.hparams["mixtures"] == 3
    x = to_model_input(torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8))
    assert model.decode(torch.zeros(2, 4)).shape == (2, 30, 8, 8) and model.loss(x).recon.shape == (2,)
    assert "mixtures" not in build_model(cfg, (8, 8, 3), 10, "logistic").hparams  # recorded only for mol
    with pytest.raises(ConfigError, match="model.mixtures"):
        ModelConfig(mixtures=0)
