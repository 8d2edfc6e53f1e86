"""Residual conv encoder and decoder (arch ``resnet``): residual blocks at every resolution.

The block is the pre-activation residual unit of He et al. (2016, "Identity mappings in deep residual
networks", fig. 4e): ``x + conv3x3(act(conv3x3(act(x))))``. The branch's last convolution starts at zero
(Goyal et al. 2017; Fixup, Zhang et al. 2019), so every block starts as the identity and a deep stack
trains from the first step without normalisation. No normalisation layers at all, as in VDVAE (Child
2021): train and eval mode compute the same function and DDP needs no buffer synchronisation.

Channels per level (levels as in ``nets.py``; the shared pieces in ``layers.py``): ``c_0 = base_channels`` at full resolution, then
``c_l = conv_channels(base, depth)[l - 1]`` at ``H / 2^l``, the conv arch's widths, so both archs size
alike. Knobs: ``base_channels`` (width), ``depth`` (halvings), ``blocks_per_level``, ``activation``.

    encoder: conv3x3 (C -> c_0) [+ label bias] -> blocks_0 -> {conv4x4/2 (c_{l-1} -> c_l), blocks_l}
             for l = 1..depth -> act -> linear (c_depth H/2^depth W/2^depth -> out_dim)
    decoder: linear -> (c_depth, H/2^depth, W/2^depth) -> {inject(l), blocks_l, nearest x2 + conv3x3
             (c_l -> c_{l-1})} for l = depth..1 -> blocks_0 -> act -> conv3x3 (c_0 -> P)

Upsampling is nearest-neighbour then a 3x3 convolution, not a transposed convolution: no checkerboard
artefacts (Odena et al. 2016, "Deconvolution and checkerboard artifacts").
"""

from __future__ import annotations

from torch import Tensor, nn

from vaedist.models.layers import Inject, check_side, conv_channels, make_activation


class ResBlock(nn.Module):
    """``x + conv3x3(act(conv3x3(act(x))))`` on ``(B, c, h, w)``; the identity at initialisation."""

    def __init__(self, channels: int, activation: str = "relu") -> None:
        super().__init__()
        self.branch = nn.Sequential(
            make_activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
            make_activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _stack(channels: int, blocks: int, activation: str) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels, activation) for _ in range(blocks)))


def level_channels(base_channels: int, depth: int) -> list[int]:
    """``[c_0, ..., c_depth]``: base at full resolution, then the conv arch's doubling widths."""
    return [base_channels, *conv_channels(base_channels, depth)]


def _level_shapes(image_shape: tuple[int, int, int], chans: list[int]) -> dict[int, tuple[int, int, int]]:
    h, w, _ = image_shape
    return {level: (chans[level], h >> level, w >> level) for level in range(1, len(chans))}


class ResNetEncoder(nn.Module):
    """Image ``(B, C, H, W)`` (+ label code ``(B, k)``) -> ``(B, out_dim)``; features per level in ``pyramid``.

    The label enters as a learned per-channel bias after the stem, ``W cond`` broadcast over the image:
    what appending ``k`` constant label maps and a 1x1 convolution on them would compute.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_dim: int,
        *,
        base_channels: int = 32,
        depth: int = 2,
        blocks_per_level: int = 2,
        cond_dim: int = 0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        h_out, w_out = check_side(image_shape, depth)
        chans = level_channels(base_channels, depth)
        self.stem = nn.Conv2d(image_shape[2], chans[0], 3, padding=1)
        self.label = nn.Linear(cond_dim, chans[0], bias=False) if cond_dim else None
        self.levels = nn.ModuleList(_stack(c, blocks_per_level, activation) for c in chans)
        self.down = nn.ModuleList(
            nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.Sequential(
            make_activation(activation), nn.Flatten(), nn.Linear(chans[-1] * h_out * w_out, out_dim)
        )
        self.level_shapes = _level_shapes(image_shape, chans)

    def pyramid(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """``(out (B, out_dim), {level l: (B, c_l, H/2^l, W/2^l)})``."""
        h = self.stem(x)  # (B, c_0, H, W)
        if self.label is not None:
            h = h + self.label(cond)[:, :, None, None]
        h = self.levels[0](h)
        feats: dict[int, Tensor] = {}
        for level, down in enumerate(self.down, start=1):
            h = feats[level] = self.levels[level](down(h))  # (B, c_l, H/2^l, W/2^l)
        return self.head(h), feats

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.pyramid(x, cond)[0]


class ResNetDecoder(nn.Module):
    """``(B, in_dim)`` -> likelihood parameters ``(B, P, H, W)``; ``inject(l, h)`` at levels depth..1."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_channels: int,
        in_dim: int,
        *,
        base_channels: int = 32,
        depth: int = 2,
        blocks_per_level: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        h_in, w_in = check_side(image_shape, depth)
        chans = level_channels(base_channels, depth)
        self.start_shape = (chans[-1], h_in, w_in)
        self.fc = nn.Linear(in_dim, chans[-1] * h_in * w_in)
        self.levels = nn.ModuleList(_stack(c, blocks_per_level, activation) for c in chans)
        self.up = nn.ModuleList(  # up[l - 1]: level l -> level l - 1
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(b, a, 3, padding=1))
            for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.out = nn.Sequential(make_activation(activation), nn.Conv2d(chans[0], out_channels, 3, padding=1))
        self.level_shapes = _level_shapes(image_shape, chans)

    def forward(self, h: Tensor, inject: Inject | None = None) -> Tensor:
        h = self.fc(h).unflatten(1, self.start_shape)  # (B, c_depth, H/2^depth, W/2^depth)
        for level in range(len(self.up), 0, -1):
            if inject is not None:
                h = inject(level, h)
            h = self.up[level - 1](self.levels[level](h))  # (B, c_{l-1}, H/2^(l-1), W/2^(l-1))
        return self.out(self.levels[0](h))  # (B, P, H, W)
