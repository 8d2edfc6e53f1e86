"""Observation models p(x|z) and the conversions around them.

Images enter models as float ``x`` ``(B, C, H, W)`` in [0, 1]: binarized {0, 1} for the Bernoulli
likelihood, ``k/255`` (8-bit) for the discretized ones. Every likelihood is a probability *mass* on
the data it models, so ``-log p`` is a code length in nats and bits/dim are comparable across
likelihoods and with the literature.

``log_prob`` sums over all pixels and channels and never averages: the ELBO is a sum over dims.
The discretized likelihoods work on the scale [-1, 1] (as PixelCNN++ does): 256 bins of width
2/255 centred on ``2k/255 - 1``, the outer two bins stretched to -inf and +inf.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor on log-scales: keeps 1/s finite


def to_model_input(images_uint8_nhwc: Tensor) -> Tensor:
    """Stored images ``(B, H, W, C)`` uint8 -> model input ``(B, C, H, W)`` float in [0, 1] (k/255)."""
    if images_uint8_nhwc.dtype != torch.uint8 or images_uint8_nhwc.dim() != 4:
        raise ValueError(
            "to_model_input expects uint8 images of shape (B, H, W, C), "
            f"got {images_uint8_nhwc.dtype} {tuple(images_uint8_nhwc.shape)}"
        )
    x = images_uint8_nhwc.permute(0, 3, 1, 2)  # (B, C, H, W) view
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # NCHW-contiguous


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarization: each pixel is an independent Bernoulli(x) draw, redrawn every call
    (Salakhutdinov & Murray 2008), so the Bernoulli likelihood sees a proper binary dataset."""
    return torch.bernoulli(x, generator=generator)


def bits_per_dim(nll_nats: Tensor, num_dims: int) -> Tensor:
    """Negative log-likelihood in nats per image -> bits per dimension: ``nll / (D ln 2)``."""
    return nll_nats / (num_dims * math.log(2.0))


def _sum_pixels(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)  # (B, ...) -> (B,)


def _bins(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """8-bit data ``x`` in [0, 1] -> its bin ``k = round(255 x)`` and the bin's lower and upper edges
    on [-1, 1]. Edges are computed from the integer ``2k +- 1`` so that bin k's upper edge and bin
    k+1's lower edge are the same float: the bins tile the line exactly even when the scale is far
    below the bin width (from ``x`` directly, float rounding leaves gaps that lose mass)."""
    k = torch.round(x * 255.0)  # (B, C, H, W) bin index as float, 0..255
    lower = (2.0 * k - 1.0) / 255.0 - 1.0
    upper = (2.0 * k + 1.0) / 255.0 - 1.0
    return k, lower, upper


def _log1mexp_neg(log_d: Tensor) -> Tensor:
    """``log(1 - exp(-d))`` for ``d = exp(log_d) > 0``, stable for tiny and large d (Maechler 2012).

    Branches are computed on clamped inputs so that neither produces inf/nan: a ``torch.where``
    over an inf branch would still poison the gradient."""
    d = torch.exp(log_d.clamp(min=-20.0))
    return torch.where(log_d < -10.0, log_d, torch.log(-torch.expm1(-d)))


def _logistic_bin_log_prob(k: Tensor, lower: Tensor, upper: Tensor, mu: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise ``log P(bin k)`` under a logistic(mu, s), edge bins to +-inf (see
    :class:`DiscretizedLogistic` for the identity used). All arguments broadcast; ``log_scale`` floored."""
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (upper - mu)  # standardised upper bin edge
    minus = inv_scale * (lower - mu)  # standardised lower bin edge
    log_cdf_plus = F.logsigmoid(plus)  # log P(X <= upper edge): the whole mass of bin 0
    log_sf_minus = F.logsigmoid(-minus)  # log P(X > lower edge): the whole mass of bin 255
    log_width = math.log(2.0 / 255.0) - log_scale  # log(plus - minus)
    log_mid = log_cdf_plus + log_sf_minus + _log1mexp_neg(log_width)
    return torch.where(k == 0, log_cdf_plus, torch.where(k == 255, log_sf_minus, log_mid))


class Likelihood(nn.Module):
    """A decoder output ``params`` ``(B, P, H, W)`` -> a distribution over images ``(B, C, H, W)``."""

    name: ClassVar[str]
    binarized: ClassVar[bool] = False  # True: the data must be binarized {0, 1} (see :func:`binarize`)

    def param_channels(self, channels: int) -> int:
        """Channels ``P`` the decoder must output for images with ``channels`` channels."""
        raise NotImplementedError

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x | params)`` summed over all pixels and channels: ``(B,)`` nats."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """The image a decoder output stands for, ``(B, C, H, W)`` in [0, 1]: what generation outputs."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; the decoder outputs logits ``(B, C, H, W)``.

    ``log p(x|z) = sum x log sigmoid(l) + (1 - x) log sigmoid(-l) = -BCE_with_logits(l, x)``.
    """

    name = "bernoulli"
    binarized = True

    def param_channels(self, channels: int) -> int:
        return channels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")  # (B, C, H, W)
        return -_sum_pixels(bce)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class DiscretizedLogistic(Likelihood):
    """Discretized logistic over 256 bins, one mixture component (Salimans et al. 2017, eq. 2).

    The decoder outputs per-pixel mean ``mu`` and log-scale ``log s`` (``2C`` channels). With
    ``x`` on [-1, 1] and ``sigma`` the logistic sigmoid,
    ``P(x) = sigma((x + 1/255 - mu)/s) - sigma((x - 1/255 - mu)/s)``; the bin of 0 extends to
    -inf (``P = sigma(plus)``) and the bin of 255 to +inf (``P = 1 - sigma(minus)``).

    Numerics: PixelCNN++ takes ``log(cdf_plus - cdf_min)`` in log-sigmoid form for the edge bins
    and falls back to the mid-bin density times the bin width when the difference underflows. We
    use the exact identity ``sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - exp(b - a))``, i.e.
    ``log P = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(-(a - b)))`` with ``a - b = 2/(255 s)``:
    log-sigmoid terms only, no subtraction of nearly equal numbers, so it stays accurate in both
    tails where PixelCNN++ needs its fallback, and no fallback is needed.
    """

    name = "logistic"

    def param_channels(self, channels: int) -> int:
        return 2 * channels

    @staticmethod
    def _split(params: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_scale = params.chunk(2, dim=1)  # (B, C, H, W) each
        return mu, log_scale.clamp(min=_LOG_SCALE_MIN)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mu, log_scale = self._split(params)
        return _sum_pixels(_logistic_bin_log_prob(*_bins(x), mu, log_scale))

    def mean(self, params: Tensor) -> Tensor:
        mu, _ = self._split(params)
        return (mu.clamp(-1.0, 1.0) + 1.0) / 2.0


class DiscretizedGaussian(Likelihood):
    """Discretized Gaussian over 256 bins with one learned scalar ``log sigma`` shared by all pixels:
    the sigma-VAE (Rybkin et al. 2021). The decoder outputs the per-pixel mean only (``C``
    channels); learning sigma balances reconstruction against KL as an MSE loss with a hand-tuned
    beta cannot, and discretizing makes the likelihood a probability mass as for the others.

    ``P(x) = Phi((x + 1/255 - mu)/sigma) - Phi((x - 1/255 - mu)/sigma)`` on [-1, 1], edge bins to
    +-inf. For a bin above the mean we use the mirror ``Phi(-b) - Phi(-a)`` so both ends sit in the
    left tail where ``log_ndtr`` is accurate; ``log P = log Phi(a) + log(1 - exp(log Phi(b) -
    log Phi(a)))``. When the bin is narrow against sigma that difference cancels, so (as PixelCNN++
    does) we fall back to the density at the bin centre times the bin width.
    """

    name = "gaussian"
    # sigma starts at 0.2 on [-1, 1] (a tenth of the pixel range), the order of a trained model's
    # reconstruction error: Adam moves log sigma by about lr per step, so a start at sigma = 1 would
    # spend thousands of steps with a reconstruction term too weak to learn from.
    INIT_LOG_SIGMA = math.log(0.2)
    LOG_SIGMA_RANGE = (_LOG_SCALE_MIN, 2.0)
    _NARROW = 1e-3  # standardised bin width below which the mid-bin density is used

    def __init__(self) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(self.INIT_LOG_SIGMA))

    def param_channels(self, channels: int) -> int:
        return channels

    def sigma(self) -> Tensor:
        return self.log_sigma.clamp(*self.LOG_SIGMA_RANGE).exp()

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        log_sigma = self.log_sigma.clamp(*self.LOG_SIGMA_RANGE)
        inv_sigma = torch.exp(-log_sigma)
        k, lower, upper = _bins(x)
        plus = (upper - params) * inv_sigma  # standardised upper bin edge
        minus = (lower - params) * inv_sigma  # standardised lower bin edge
        log_cdf_plus = torch.special.log_ndtr(plus)  # whole mass of bin 0
        log_sf_minus = torch.special.log_ndtr(-minus)  # whole mass of bin 255
        # Interior bins: reflect bins above the mean into the left tail; hi > lo.
        upper_half = minus > 0
        hi = torch.where(upper_half, -minus, plus)
        lo = torch.where(upper_half, -plus, minus)
        log_hi = torch.special.log_ndtr(hi)
        diff = (torch.special.log_ndtr(lo) - log_hi).clamp(max=-1e-12)  # log(Phi(lo)/Phi(hi)) < 0
        log_mid = log_hi + torch.log(-torch.expm1(diff))
        width = (2.0 / 255.0) * inv_sigma  # standardised bin width (a scalar)
        centre = (plus + minus) / 2
        log_density = -0.5 * centre.square() - 0.5 * math.log(2 * math.pi) + torch.log(width)
        log_mid = torch.where(width < self._NARROW, log_density, log_mid)
        log_p = torch.where(k == 0, log_cdf_plus, torch.where(k == 255, log_sf_minus, log_mid))
        return _sum_pixels(log_p)

    def mean(self, params: Tensor) -> Tensor:
        return (params.clamp(-1.0, 1.0) + 1.0) / 2.0


def _pair(c: int, j: int) -> int:
    """Index of the coefficient of channel ``j`` in channel ``c``'s mean (j < c): (1,0), (2,0), (2,1), ..."""
    return c * (c - 1) // 2 + j


class DiscretizedMixtureLogistic(Likelihood):
    """Discretized mixture of ``mixtures`` logistics per pixel (Salimans et al. 2017, PixelCNN++, sec. 2.1-2.2).

    Per pixel the ``C`` channels are modelled jointly: a component ``i`` is drawn with probability
    ``pi_i = softmax(logits)_i``, then channel ``c`` is a discretized logistic (eq. 2, the edge bins to
    +-inf) with log-scale ``log s_ic`` and a mean that depends linearly on the channels before it (sec. 2.2:
    the green mean shifts with red, the blue with red and green):

        m_ic = mu_ic + sum_{j<c} a_icj x_j,   a = tanh(coefficient outputs)
        P(x) = sum_i pi_i prod_c P_logistic(x_c | m_ic, s_ic)

    so ``sum_x P(x) = 1`` over all ``256^C`` values of a pixel (a mixture of products of conditionals,
    each normalised over 256 bins). Decoder output: ``mixtures * (1 + 2C + C(C-1)/2)`` channels
    (logits; means (mixtures, C); log-scales (mixtures, C); coefficients (mixtures, C(C-1)/2)): 3 per
    component for grey levels, 10 for colour as in PixelCNN++. ``log_prob`` takes the log-sum-exp over
    components in float32 (the caller casts; see ``BaseVAE.loss_from_forward``).
    """

    name = "mol"

    def __init__(self, mixtures: int = 10) -> None:
        super().__init__()
        if int(mixtures) < 1:
            raise ValueError(f"the mixture of logistics needs mixtures >= 1, got {mixtures}")
        self.mixtures = int(mixtures)

    def param_channels(self, channels: int) -> int:
        return self.mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``params`` (B, P, H, W) -> logits (B, M, H, W), means and log-scales (B, M, C, H, W), tanh'd
        coefficients (B, M, C(C-1)/2, H, W). ``C`` solves ``P/M = 1 + 2C + C(C-1)/2``."""
        b, p, h, w = params.shape
        m = self.mixtures
        c = round((math.sqrt(1 + 8 * (p // m)) - 3) / 2)
        if p != self.param_channels(c):
            raise ValueError(
                f"mixture of {m} logistics: {p} parameter channels fit no number of image channels"
            )
        logits = params[:, :m]
        means = params[:, m : m + m * c].view(b, m, c, h, w)
        log_scales = params[:, m + m * c : m + 2 * m * c].view(b, m, c, h, w).clamp(min=_LOG_SCALE_MIN)
        coeffs = torch.tanh(params[:, m + 2 * m * c :].view(b, m, c * (c - 1) // 2, h, w))
        return logits, means, log_scales, coeffs

    @staticmethod
    def _coupled_means(means: Tensor, coeffs: Tensor, values: Tensor) -> Tensor:
        """``m_ic = mu_ic + sum_{j<c} a_icj values_j`` (B, M, C, H, W); ``values`` broadcasts to it."""
        channels = [means[:, :, 0]]
        for c in range(1, means.shape[2]):
            shift = sum(coeffs[:, :, _pair(c, j)] * values[:, :, j] for j in range(c))
            channels.append(means[:, :, c] + shift)
        return torch.stack(channels, dim=2)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        logits, means, log_scales, coeffs = self._split(params)
        k, lower, upper = (t[:, None] for t in _bins(x))  # (B, 1, C, H, W): one copy for all components
        centre = (lower + upper) / 2  # the pixel's value on [-1, 1], what the means are conditioned on
        mean = self._coupled_means(means, coeffs, centre)  # (B, M, C, H, W)
        log_pc = _logistic_bin_log_prob(k, lower, upper, mean, log_scales)  # (B, M, C, H, W)
        log_joint = F.log_softmax(logits, dim=1) + log_pc.sum(dim=2)  # (B, M, H, W): log pi_i P_i(x)
        return _sum_pixels(torch.logsumexp(log_joint, dim=1))

    def mean(self, params: Tensor) -> Tensor:
        """The most probable component's centre per pixel, its channels coupled to the values chosen
        before them: a sharp image (the mixture's average would blend its modes). Not ``E[x]``."""
        logits, means, _, coeffs = self._split(params)
        idx = logits.argmax(dim=1, keepdim=True)[:, :, None]  # (B, 1, 1, H, W)
        mu = means.gather(1, idx.expand(-1, -1, means.shape[2], -1, -1))[:, 0]  # (B, C, H, W)
        a = coeffs.gather(1, idx.expand(-1, -1, coeffs.shape[2], -1, -1))[:, 0]  # (B, C(C-1)/2, H, W)
        values: list[Tensor] = []
        for c in range(mu.shape[1]):
            shift = sum(a[:, _pair(c, j)] * values[j] for j in range(c))
            values.append((mu[:, c] + shift).clamp(-1.0, 1.0))
        return (torch.stack(values, dim=1) + 1.0) / 2.0


LIKELIHOOD_CLASSES: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, DiscretizedGaussian, DiscretizedLogistic, DiscretizedMixtureLogistic)
}
LIKELIHOODS: tuple[str, ...] = tuple(LIKELIHOOD_CLASSES)  # = config.LIKELIHOODS (a test keeps them equal)


def build_likelihood(name: str, *, mixtures: int = 10) -> Likelihood:
    """The likelihood called ``name``; ``mixtures`` is the mixture of logistics' component count."""
    if name not in LIKELIHOOD_CLASSES:
        raise ValueError(f"unknown likelihood {name!r} (allowed: {', '.join(LIKELIHOODS)})")
    if name == DiscretizedMixtureLogistic.name:
        return DiscretizedMixtureLogistic(mixtures)
    return LIKELIHOOD_CLASSES[name]()
