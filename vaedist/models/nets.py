"""Encoders and decoders with size knobs: dense (MLP), conv (strided conv / transposed conv) and resnet
(residual blocks per resolution, ``models/blocks.py``).

An encoder maps an image ``x`` ``(B, C, H, W)`` (and, for a conditional model, a label code
``cond`` ``(B, k)``: one-hot or a learned embedding) to a flat vector ``(B, out_dim)``; the model
splits it into ``(mu, logvar)``. A decoder maps a flat vector ``(B, in_dim)`` (the latent ``z``,
with the label code appended for a conditional model) to likelihood parameters ``(B, P, H, W)``.

No normalisation layers and no dropout: train and eval mode compute the same function, and DDP
needs no buffer sync.

Levels, for the hierarchical models (``models/ladder.py``): level ``l = 1..depth`` is the ``l``-th
resolution below the image (``H / 2^l``; for dense, the ``l``-th hidden layer counted from the image, a
``(width, 1, 1)`` map). Encoders give their features per level (``pyramid``); decoders call
``inject(level, features)`` at each level on the way down, top first, so latents can enter there. Both
publish ``level_shapes``: ``{l: (channels, h, w)}``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaedist.choices import ARCHS, CONDITIONINGS  # the vocabulary, defined once (torch-free)
from vaedist.models.blocks import ResNetDecoder, ResNetEncoder
from vaedist.models.layers import ACTIVATIONS, Inject, check_side, conv_channels, make_activation

__all__ = ["ACTIVATIONS", "ConvDecoder", "ConvEncoder", "DenseDecoder", "DenseEncoder", "LabelCode",
           "build_decoder", "build_encoder", "conv_channels", "conv_level_shapes"]  # fmt: skip


class LabelCode(nn.Module):
    """Label ``y`` ``(B,)`` int64 to a code ``(B, dim)``: one-hot (``dim = num_classes``) or a learned
    ``nn.Embedding(num_classes, embedding_dim)``. One code is shared by encoder and decoder."""

    def __init__(self, num_classes: int, conditioning: str = "onehot", embedding_dim: int = 16) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r} (allowed: {', '.join(CONDITIONINGS)})")
        self.num_classes = num_classes
        self.conditioning = conditioning
        if conditioning == "embedding":
            self.embedding: nn.Embedding | None = nn.Embedding(num_classes, embedding_dim)
            self.dim = embedding_dim
        else:
            self.embedding = None
            self.dim = num_classes

    def forward(self, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.embedding is not None:
            return self.embedding(y).to(dtype)  # (B, e)
        return F.one_hot(y, self.num_classes).to(dtype)  # (B, num_classes)


def _through(layers: nn.Sequential, h: Tensor, levels: Iterator[int], hook: Inject) -> Tensor:
    """Run ``layers`` on ``h``; after each activation (where one level ends) call ``hook(next level, h)``.
    A flat ``(B, width)`` state is shown to the hook as a ``(B, width, 1, 1)`` map."""
    acts = tuple(ACTIVATIONS.values())
    for layer in layers:
        h = layer(h)
        if isinstance(layer, acts):
            h = _at_level(hook, next(levels), h)
    return h


def _at_level(hook: Inject, level: int, h: Tensor) -> Tensor:
    return hook(level, h[:, :, None, None]).flatten(1) if h.dim() == 2 else hook(level, h)


def _recorder(feats: dict[int, Tensor]) -> Inject:
    def record(level: int, h: Tensor) -> Tensor:
        feats[level] = h
        return h

    return record


def _mlp(in_dim: int, width: int, depth: int, out_dim: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else width, width), make_activation(activation)]
    layers.append(nn.Linear(width if depth else in_dim, out_dim))
    return nn.Sequential(*layers)


class DenseEncoder(nn.Module):
    """Flattened image (with the label code appended) -> ``depth`` hidden layers of ``width`` -> out_dim."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_dim: int,
        *,
        width: int = 512,
        depth: int = 2,
        cond_dim: int = 0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        h, w, c = image_shape
        self.cond_dim = cond_dim
        self.net = _mlp(c * h * w + cond_dim, width, depth, out_dim, activation)
        self.level_shapes = {level: (width, 1, 1) for level in range(1, depth + 1)}

    def pyramid(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """``(out (B, out_dim), {level: hidden layer (B, width, 1, 1)})``."""
        h = x.flatten(1)  # (B, C*H*W)
        if self.cond_dim:
            h = torch.cat([h, cond], dim=1)  # (B, C*H*W + k)
        feats: dict[int, Tensor] = {}
        return _through(self.net, h, iter(range(1, len(self.level_shapes) + 1)), _recorder(feats)), feats

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.pyramid(x, cond)[0]  # (B, out_dim)


class DenseDecoder(nn.Module):
    """``(B, in_dim)`` -> ``depth`` hidden layers of ``width`` -> likelihood parameters ``(B, P, H, W)``."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_channels: int,
        in_dim: int,
        *,
        width: int = 512,
        depth: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        h, w, _ = image_shape
        self.out_shape = (out_channels, h, w)
        self.net = _mlp(in_dim, width, depth, out_channels * h * w, activation)
        self.level_shapes = {level: (width, 1, 1) for level in range(1, depth + 1)}

    def forward(self, h: Tensor, inject: Inject | None = None) -> Tensor:
        if inject is None:
            return self.net(h).unflatten(1, self.out_shape)  # (B, P, H, W)
        levels = iter(range(len(self.level_shapes), 0, -1))  # the first hidden layer is the top level
        return _through(self.net, h, levels, inject).unflatten(1, self.out_shape)


def conv_level_shapes(image_shape: tuple[int, int, int], chans: list[int]) -> dict[int, tuple[int, int, int]]:
    """``{l: (chans[l-1], H/2^l, W/2^l)}`` for the levels ``1..len(chans)``."""
    h, w, _ = image_shape
    return {level: (c, h >> level, w >> level) for level, c in enumerate(chans, start=1)}


class ConvEncoder(nn.Module):
    """``depth`` blocks of Conv2d(kernel 4, stride 2, padding 1) + activation, each halving H and W,
    then a linear bottleneck to ``out_dim``.

    Conditioning: the label code ``(B, k)`` enters as ``k`` constant label maps appended to the
    image's channels (one map per class for one-hot, one per embedding coordinate otherwise).
    Convolution is linear, so rather than convolving ``B`` stacks of ``C + k`` channels (most of
    them constant) we convolve the image's ``C`` channels and add the first layer's response to the
    ``k`` unit label maps, computed once per call on ``k`` images and mixed by the code with one
    matmul. That is exactly ``conv(cat([x, maps]))`` with the same ``(c0, C + k, 4, 4)`` weight,
    zero padding included, at about a third of the cost for MNIST's one-hot labels.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_dim: int,
        *,
        base_channels: int = 32,
        depth: int = 2,
        cond_dim: int = 0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _, _, c = image_shape
        h_out, w_out = check_side(image_shape, depth)
        chans = conv_channels(base_channels, depth)
        self.in_channels = c
        self.cond_dim = cond_dim
        self.first = nn.Conv2d(c + cond_dim, chans[0], 4, stride=2, padding=1)  # on [x, label maps]
        layers: list[nn.Module] = [make_activation(activation)]
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), make_activation(activation)]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1] * h_out * w_out, out_dim)
        self.level_shapes = conv_level_shapes(image_shape, chans)

    def first_conv(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``self.first(cat([x, label maps]))`` without materialising the label maps."""
        c, k = self.in_channels, self.cond_dim
        weight = self.first.weight  # (c0, C + k, 4, 4)
        out = F.conv2d(x, weight[:, :c], self.first.bias, stride=2, padding=1)  # (B, c0, H/2, W/2)
        if k:
            h, w = x.shape[2:]
            unit_maps = torch.eye(k, dtype=x.dtype, device=x.device)[:, :, None, None].expand(k, k, h, w)
            response = F.conv2d(unit_maps, weight[:, c:], stride=2, padding=1)  # (k, c0, H/2, W/2)
            out = out + (cond.to(x.dtype) @ response.flatten(1)).view_as(out)
        return out

    def pyramid(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """``(out (B, out_dim), {level l: features after the l-th block (B, c_l, H/2^l, W/2^l)})``."""
        feats: dict[int, Tensor] = {}
        levels = iter(range(1, len(self.level_shapes) + 1))
        h = _through(self.blocks, self.first_conv(x, cond), levels, _recorder(feats))  # (B, c_last, ...)
        return self.head(h.flatten(1)), feats

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.blocks(self.first_conv(x, cond))  # (B, c_last, H/2^depth, W/2^depth)
        return self.head(h.flatten(1))  # (B, out_dim)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: a linear layer to ``(c_last, H/2^depth, W/2^depth)``, then
    ``depth`` ConvTranspose2d(kernel 4, stride 2, padding 1) blocks, each doubling H and W; the last
    one outputs the likelihood's ``P`` parameter channels with no activation."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_channels: int,
        in_dim: int,
        *,
        base_channels: int = 32,
        depth: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        h_in, w_in = check_side(image_shape, depth)
        chans = conv_channels(base_channels, depth)
        self.start_shape = (chans[-1], h_in, w_in)
        self.fc = nn.Sequential(nn.Linear(in_dim, chans[-1] * h_in * w_in), make_activation(activation))
        layers: list[nn.Module] = []
        outs = chans[::-1][1:] + [out_channels]
        for i, (c_in, c_out) in enumerate(zip(chans[::-1], outs, strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < depth - 1:
                layers.append(make_activation(activation))
        self.blocks = nn.Sequential(*layers)
        self.level_shapes = conv_level_shapes(image_shape, chans)

    def forward(self, h: Tensor, inject: Inject | None = None) -> Tensor:
        h = self.fc(h).unflatten(1, self.start_shape)  # (B, c_last, H/2^depth, W/2^depth)
        if inject is None:
            return self.blocks(h)  # (B, P, H, W)
        depth = len(self.level_shapes)
        return _through(self.blocks, inject(depth, h), iter(range(depth - 1, 0, -1)), inject)


def build_encoder(
    arch: str,
    image_shape: tuple[int, int, int],
    out_dim: int,
    *,
    width: int,
    base_channels: int,
    depth: int,
    cond_dim: int = 0,
    activation: str = "relu",
    blocks_per_level: int = 2,
) -> nn.Module:
    if arch == "dense":
        return DenseEncoder(
            image_shape, out_dim, width=width, depth=depth, cond_dim=cond_dim, activation=activation
        )
    sizes = {"base_channels": base_channels, "depth": depth, "cond_dim": cond_dim, "activation": activation}
    if arch == "conv":
        return ConvEncoder(image_shape, out_dim, **sizes)
    if arch == "resnet":
        return ResNetEncoder(image_shape, out_dim, blocks_per_level=blocks_per_level, **sizes)
    raise ValueError(f"unknown arch {arch!r} (allowed: {', '.join(ARCHS)})")


def build_decoder(
    arch: str,
    image_shape: tuple[int, int, int],
    out_channels: int,
    in_dim: int,
    *,
    width: int,
    base_channels: int,
    depth: int,
    activation: str = "relu",
    blocks_per_level: int = 2,
) -> nn.Module:
    if arch == "dense":
        return DenseDecoder(
            image_shape, out_channels, in_dim, width=width, depth=depth, activation=activation
        )
    sizes = {"base_channels": base_channels, "depth": depth, "activation": activation}
    if arch == "conv":
        return ConvDecoder(image_shape, out_channels, in_dim, **sizes)
    if arch == "resnet":
        return ResNetDecoder(image_shape, out_channels, in_dim, blocks_per_level=blocks_per_level, **sizes)
    raise ValueError(f"unknown arch {arch!r} (allowed: {', '.join(ARCHS)})")
