"""Pictures of models and data as image grids (Pillow): sample grids, reconstructions, interpolations, the
audit's nearest copies. Charts drawn with matplotlib (latent scatter, confusion matrix, per-class bars) are
in :mod:`vaedist.charts`.

numpy + Pillow only (no torch, Ray, MLflow or matplotlib).

Conventions:

- Image inputs are uint8 NHWC arrays with C = 1 (grayscale) or 3 (RGB); grayscale is
  expanded to RGB.
- Every figure function returns an RGB uint8 array of shape (H, W, 3), ready for
  `mlflow.log_image`. Nothing here writes files except `save_png`.
- Same input, same output: no randomness except fixed-seed jitter / draw order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "image_grid",
    "labelled_rows",
    "reconstruction_grid",
    "interpolation_strip",
    "nearest_copies_grid",
    "to_uint8",
    "save_png",
]

_LABEL_FONT_SIZE = 12
_TITLE_FONT_SIZE = 14
_MARGIN = 6
_TEXT_COLOR = (0, 0, 0)
_BACKGROUND = (255, 255, 255)


# ----------------------------------------------------------------------------- validation helpers


def _as_images(images: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """Check an image batch (uint8, `ndim` dims, last = 1 or 3 channels) and return it as RGB uint8."""
    arr = np.asarray(images)
    if arr.ndim != ndim:
        layout = {3: "(H, W, C)", 4: "(N, H, W, C)", 5: "(R, M, H, W, C)"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 (0..255), got dtype {arr.dtype}; convert with vaedist.figures.to_uint8"
        )
    channels = arr.shape[-1]
    if channels not in (1, 3):
        raise ValueError(
            f"{name} must have 1 or 3 channels in the last axis, got {channels} (shape {arr.shape})"
        )
    if any(s == 0 for s in arr.shape):
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return int(scale)


def _upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of (..., H, W, C) by an integer factor."""
    if scale == 1:
        return images
    return np.repeat(np.repeat(images, scale, axis=-3), scale, axis=-2)


def check_labels(labels: Sequence[str] | None, expected: int, name: str, what: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ValueError(f"{name} must be a list of strings, not a single string")
    labels = [str(x) for x in labels]
    if len(labels) != expected:
        raise ValueError(f"{name} has {len(labels)} entries but there are {expected} {what}")
    return labels


# ----------------------------------------------------------------------------- image grids (Pillow)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Convert images to uint8: floats are taken as [0, 1] (clipped), integers as 0..255 (clipped).

    Any shape; returns the same shape as uint8. A convenience for callers holding model
    outputs (e.g. Bernoulli means in [0, 1]).
    """
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError("images contain NaN or infinite values")
        return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.dtype == np.bool_:
            return arr.astype(np.uint8) * 255
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"cannot convert images of dtype {arr.dtype} to uint8")


def image_grid(images: np.ndarray, ncol: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile a batch of images into a grid, row-major.

    images: uint8 (N, H, W, C), C = 1 or 3.
    Returns uint8 (rows * (H + padding) + padding, ncol * (W + padding) + padding, 3) with
    rows = ceil(N / ncol). Image k sits at row k // ncol, column k % ncol, its top-left
    pixel at (padding + row * (H + padding), padding + col * (W + padding)). Empty cells
    and padding are `pad_value`.
    """
    imgs = _as_images(images, 4, "images")
    if isinstance(ncol, bool) or not isinstance(ncol, (int, np.integer)) or ncol < 1:
        raise ValueError(f"ncol must be an integer >= 1, got {ncol!r}")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    if (
        isinstance(pad_value, bool)
        or not isinstance(pad_value, (int, np.integer))
        or not 0 <= pad_value <= 255
    ):
        raise ValueError(f"pad_value must be an integer in 0..255, got {pad_value!r}")
    n, h, w, _ = imgs.shape
    ncol = int(ncol)
    p = int(padding)
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + p) + p, ncol * (w + p) + p, 3), pad_value, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        y, x = p + r * (h + p), p + c * (w + p)
        grid[y : y + h, x : x + w] = imgs[k]
    return grid


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Loaded per call: FreeType faces are not safe to share between threads.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int, int, int]:
    """(width, height, y0, y1) of `text`; y0/y1 are the ink bbox offsets from the draw origin."""
    if not text:
        return 0, 0, 0, 0
    x0, y0, x1, y1 = font.getbbox(text)
    return int(x1 - x0), int(y1 - y0), int(y0), int(y1)


def _fit(font, text: str, max_width: int) -> str:
    """Truncate `text` with '...' so it is at most `max_width` pixels wide."""
    if _text_size(font, text)[0] <= max_width:
        return text
    while text:
        text = text[:-1]
        candidate = text.rstrip() + "..."
        if _text_size(font, candidate)[0] <= max_width:
            return candidate
    return ""


def _annotate(
    grid: np.ndarray,
    *,
    cell_h: int,
    cell_w: int,
    padding: int,
    left: list[str] | None = None,
    right: list[str] | None = None,
    top: list[str] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """Put a grid on a white canvas with row labels (left/right), column labels (top) and a title."""
    font = _font(_LABEL_FONT_SIZE)
    title_font = _font(_TITLE_FONT_SIZE)
    line_h = _text_size(font, "Ag")[1]

    def side_width(labels: list[str] | None) -> int:
        if not labels:
            return 0
        return max(_text_size(font, t)[0] for t in labels) + 2 * _MARGIN

    left_w, right_w = side_width(left), side_width(right)
    col_h = line_h + _MARGIN if top else 0
    title_h = _text_size(title_font, "Ag")[1] + 2 * _MARGIN if title else 0
    title_w = _text_size(title_font, title)[0] + 2 * _MARGIN if title else 0
    gh, gw = grid.shape[:2]
    width = max(left_w + gw + right_w, title_w)
    height = title_h + col_h + gh
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    gx, gy = left_w, title_h + col_h
    canvas.paste(Image.fromarray(grid), (gx, gy))
    draw = ImageDraw.Draw(canvas)

    def put(text: str, fnt, x_center: float | None, y_center: float, x_left: float | None = None) -> None:
        tw, _, y0, y1 = _text_size(fnt, text)
        x = x_left if x_left is not None else x_center - tw / 2
        y = y_center - (y0 + y1) / 2
        draw.text((round(x), round(y)), text, font=fnt, fill=_TEXT_COLOR)

    if title:
        put(title, title_font, width / 2, title_h / 2)
    for i, text in enumerate(left or []):
        cy = gy + padding + i * (cell_h + padding) + cell_h / 2
        put(text, font, None, cy, x_left=left_w - _MARGIN - _text_size(font, text)[0])
    for i, text in enumerate(right or []):
        cy = gy + padding + i * (cell_h + padding) + cell_h / 2
        put(text, font, None, cy, x_left=gx + gw + _MARGIN)
    for j, text in enumerate(top or []):
        cx = gx + padding + j * (cell_w + padding) + cell_w / 2
        put(_fit(font, text, cell_w + padding), font, cx, title_h + col_h / 2)
    return np.asarray(canvas, dtype=np.uint8).copy()


def labelled_rows(
    rows: np.ndarray,
    row_labels: list[str],
    title: str | None = None,
    col_labels: list[str] | None = None,
    scale: int = 2,
) -> np.ndarray:
    """A grid of R rows of M images each, every row labelled on the left.

    rows: uint8 (R, M, H, W, C), C = 1 or 3. row_labels: R strings. col_labels: M strings
    (optional, drawn above the columns, truncated to the cell width). Images are upscaled
    by `scale` (nearest neighbour) so 28-pixel images stay legible.
    Returns uint8 (H_out, W_out, 3); the image part is
    `image_grid(rows.reshape(R*M, ...) upscaled, ncol=M, padding=2)` of shape
    (R*(H*scale+2)+2, M*(W*scale+2)+2), framed by the labels and title.

    Used for samples per label, the class x z grid (rows = classes, columns = fixed z's)
    and generated samples per label.
    """
    imgs = _as_images(rows, 5, "rows")
    scale = _check_scale(scale)
    r, m, h, w, _ = imgs.shape
    row_labels = check_labels(row_labels, r, "row_labels", "rows")
    col_labels = check_labels(col_labels, m, "col_labels", "columns")
    padding = 2
    grid = image_grid(_upscale(imgs, scale).reshape(r * m, h * scale, w * scale, 3), ncol=m, padding=padding)
    return _annotate(
        grid,
        cell_h=h * scale,
        cell_w=w * scale,
        padding=padding,
        left=row_labels,
        top=col_labels,
        title=title or None,
    )


def reconstruction_grid(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
    scale: int = 2,
    title: str | None = None,
) -> np.ndarray:
    """Inputs above their reconstructions, one labelled row each.

    originals, reconstructions and every value of `extra`: uint8 (N, H, W, C) with the same
    N, H, W (C = 1 or 3, may differ between rows). Rows are labelled "input",
    "reconstruction", then the keys of `extra` in order (e.g. {"with latent noise": ...}).
    Returns uint8 (H_out, W_out, 3) as `labelled_rows` with R = 2 + len(extra), M = N.
    """
    named = [("input", originals), ("reconstruction", reconstructions), *(extra or {}).items()]
    batches = [_as_images(arr, 4, f"{label!r} images") for label, arr in named]
    first = batches[0].shape
    for (label, _), batch in zip(named, batches, strict=True):
        if batch.shape != first:
            raise ValueError(
                f"all rows must have the same (N, H, W): 'input' has {first[:3]}, {label!r} has {batch.shape[:3]}"
            )
    return labelled_rows(np.stack(batches), [label for label, _ in named], title=title, scale=scale)


def interpolation_strip(
    frames: np.ndarray,
    start_label: str,
    end_label: str,
    scale: int = 2,
    title: str | None = None,
) -> np.ndarray:
    """A latent interpolation as one row: `start_label` on the left, `end_label` on the right.

    frames: uint8 (S, H, W, C), C = 1 or 3, in order from start to end.
    Returns uint8 (H_out, W_out, 3); the image part is (H*scale + 4, S*(W*scale+2) + 2).
    """
    imgs = _as_images(frames, 4, "frames")
    scale = _check_scale(scale)
    s, h, w, _ = imgs.shape
    padding = 2
    grid = image_grid(_upscale(imgs, scale), ncol=s, padding=padding)
    return _annotate(
        grid,
        cell_h=h * scale,
        cell_w=w * scale,
        padding=padding,
        left=[str(start_label)],
        right=[str(end_label)],
        title=title or None,
    )


# ----------------------------------------------------------------------------- synthetic-data audit


def nearest_copies_grid(
    generated: np.ndarray, nearest: np.ndarray, distances: Sequence[float], threshold: float | None = None,
    title: str | None = None, scale: int = 2,
) -> np.ndarray:
    """Generated images (top row) above their nearest training images (bottom row), each pair's distance
    over its column ("d=0.00", a "!" where it is under ``threshold``: nearer than real data comes).

    generated, nearest: uint8 (M, H, W, C), the same shape; distances: M numbers.
    Returns uint8 (H_out, W_out, 3) as `labelled_rows` with R = 2.
    """
    gen = _as_images(generated, 4, "generated")
    near = _as_images(nearest, 4, "nearest")
    if gen.shape != near.shape:
        raise ValueError(f"generated {gen.shape} and nearest {near.shape} must have the same shape")
    if len(distances) != len(gen):
        raise ValueError(f"{len(distances)} distances for {len(gen)} pairs")
    marks = [f"d={d:.2f}" + ("!" if threshold is not None and d < threshold else "") for d in distances]
    return labelled_rows(np.stack([gen, near]), ["generated", "nearest training"], title=title,
                         col_labels=marks, scale=scale)  # fmt: skip


# ----------------------------------------------------------------------------- files


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an image (uint8 (H, W, 3), (H, W, 1) or (H, W)) to `path` as PNG, creating parent folders."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ValueError(
            f"image must have shape (H, W, 3), (H, W, 1) or (H, W), got {np.asarray(image).shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {arr.shape}")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")
