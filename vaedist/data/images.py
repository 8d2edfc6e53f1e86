"""Decoding the user's images into uint8 arrays: one shape rule, in parallel.

The shape rule (``--image-size``): resize so that the image covers the target (its shorter side, relative
to the target's, becomes the target's), with Pillow's antialiased bicubic filter, then crop the centre.
Without a size every image must already share one. Channels: 1 (greyscale, Pillow mode ``L``) or 3 (RGB);
without ``--channels``, 3 if any image is in colour, else 1. Alpha is dropped; a GIF gives its first frame.

Decoding runs in a process pool from the standard library, chunks of files per process: measured here,
Pillow decodes a 32x32 JPEG in ~140 us, and threads add only 10 % (the per-image Python work holds the
GIL), while processes scale with the cores. Ray (tasks or Ray Data ``read_images``) would do the same on
one node, but the data layer stays free of Ray so that ``vaedist data info`` and the tests need none;
the result is cached (:mod:`vaedist.data.cache`), so a cluster's workers read the decoded arrays instead.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from vaedist.data.spec import MAX_IMAGE_PIXELS
from vaedist.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CHUNK = 1000  # files per task: large enough to amortise the task, small enough to balance
PARALLEL_FROM = 2000  # below this many files, one process is faster than starting a pool


@dataclass
class Decoded:
    """Images as decoded, before they share a shape: each uint8 (H, W, 1) or (H, W, 3)."""

    images: list[np.ndarray] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # positions in the input that decoded
    bad: list[tuple[int, str]] = field(default_factory=list)  # (position, why) of those that did not


def fit(image, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """A Pillow image -> uint8 (H, W, C) by the shape rule. C: ``channels``, else the image's own (1 or 3)."""
    from PIL import Image

    grey = image.mode in GREY_MODES if channels is None else channels == 1
    image = image.convert("L" if grey else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        (w, h), (th, tw) = image.size, size
        scale = max(th / h, tw / w)  # cover the target, then crop what sticks out
        rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)  # antialiased when shrinking
        left, top = (rw - tw) // 2, (rh - th) // 2
        image = image.crop((left, top, left + tw, top + th))
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


class TooLarge(ValueError):
    """An image above ``MAX_IMAGE_PIXELS``."""


TOO_LARGE = f"above the limit of {MAX_IMAGE_PIXELS:,} pixels per image"


def _decode_one(source: str | bytes, size, channels) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) where it would decode an image above its own limit: an
        # image vaedist refuses, not a warning to print and then decode.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source) as image:
            w, h = image.size  # from the header: nothing decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise TooLarge(f"{w}x{h} = {w * h:,} pixels, {TOO_LARGE}")
            image.seek(0)  # the first frame of an animation
            return fit(image, size, channels)


def _decode_chunk(sources: Sequence[str | bytes], offset: int, size, channels) -> Decoded:
    from PIL import Image, UnidentifiedImageError

    out = Decoded()
    for i, source in enumerate(sources):
        try:
            out.images.append(_decode_one(source, size, channels))
            out.kept.append(offset + i)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # above Pillow's limit too
            out.bad.append((offset + i, f"more pixels than Pillow decodes, {TOO_LARGE}"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # Pillow's decode errors
            out.bad.append((offset + i, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return out


def refuse_bad(decoded: Decoded, names: Sequence[str], location: str, skip: bool) -> list[str]:
    """The names of the images that did not decode; unless ``skip`` (``--skip-bad-images``), a UsageError
    naming the first of them, why, and the flag."""
    if decoded.bad and not skip:
        pos, why = decoded.bad[0]
        raise UsageError(f"{location}/{names[pos]} is not a readable image ({why}); "
                         f"pass --skip-bad-images to skip such files ({len(decoded.bad)} found)")  # fmt: skip
    return [names[i] for i, _ in decoded.bad]


def decode_all(sources: Sequence[str | bytes], size=None, channels=None, workers: int | None = None) -> Decoded:
    """Decode image files (paths) or encoded images (bytes), in order, in a process pool when there are many."""
    workers = workers or min(os.cpu_count() or 1, 8)
    chunks = [(sources[i : i + CHUNK], i) for i in range(0, len(sources), CHUNK)]
    if workers <= 1 or len(sources) < PARALLEL_FROM:
        parts = [_decode_chunk(chunk, i, size, channels) for chunk, i in chunks]
    else:
        # spawn, not fork: the caller may be a Ray worker or hold threads (fork would copy their locks)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_decode_chunk, chunk, i, size, channels) for chunk, i in chunks]
            parts = [f.result() for f in futures]
    out = Decoded()
    for part in parts:
        out.images += part.images
        out.kept += part.kept
        out.bad += part.bad
    return out


def stack(decoded: Decoded, names: Sequence[str], channels: int | None) -> np.ndarray:
    """The decoded images as one uint8 (N, H, W, C) array; UsageError naming two files of different sizes."""
    shapes = {}
    for image, i in zip(decoded.images, decoded.kept, strict=True):
        shapes.setdefault(image.shape[:2], i)
    if len(shapes) > 1:
        (s1, i1), (s2, i2) = list(shapes.items())[:2]
        raise UsageError(
            f"images differ in size: {names[i1]} is {s1[0]}x{s1[1]}, {names[i2]} is {s2[0]}x{s2[1]}; "
            "pass --image-size N or HxW to resize them all"
        )
    colour = channels == 3 or any(image.shape[2] == 3 for image in decoded.images)
    if colour:  # some were greyscale: give them three equal channels
        return np.stack([np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in decoded.images])
    return np.stack(decoded.images)
