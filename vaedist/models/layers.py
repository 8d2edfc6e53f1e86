"""What every network family shares (``nets.py``: dense and conv; ``blocks.py``: resnet): the
activations, the hook by which latents enter a decoder, the conv widths per level and the side rule.
The bottom of ``models/``: imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# keyed by vaedist.choices.ACTIVATIONS (tests/test_models.py keeps the two equal)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}
MAX_CHANNEL_MULT = 8  # conv: channels double per block up to base_channels * 8
# (level, features (B, c, h, w)) -> features of the same shape: where a decoder lets latents in
Inject = Callable[[int, Tensor], Tensor]


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by its name (``choices.ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (allowed: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def conv_channels(base_channels: int, depth: int) -> list[int]:
    """Channels of the ``depth`` stride-2 blocks: base, 2*base, 4*base, ... capped at 8*base."""
    return [base_channels * min(2**i, MAX_CHANNEL_MULT) for i in range(depth)]


def check_side(image_shape: tuple[int, int, int], depth: int) -> tuple[int, int]:
    """(H, W) / 2**depth; ValueError unless both sides divide by 2**depth."""
    h, w, _ = image_shape
    side = 2**depth
    if h % side or w % side:
        # Not an assert: a model built with a bad depth must fail the same way under ``python -O``.
        raise ValueError(f"conv depth {depth} needs image sides divisible by {side}, got {h}x{w}")
    return h // side, w // side
