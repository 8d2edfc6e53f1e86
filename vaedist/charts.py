"""Charts of models and data, drawn with matplotlib: the latent scatter (PCA or raw coordinates), the
confusion matrix, the audit's per-class bars. Image grids (Pillow) are in :mod:`vaedist.figures`.

numpy + matplotlib only (no torch, Ray or MLflow). matplotlib is used through `matplotlib.figure.Figure`
and `FigureCanvasAgg` directly, never `pyplot`: no global backend switch, no figure registry, so rendering
is thread-safe and leaks nothing. Every chart returns an RGB uint8 array (H, W, 3), ready for
`mlflow.log_image`; same input, same output (fixed-seed jitter and draw order only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vaedist.figures import check_labels

__all__ = ["pca_2d", "latent_coords", "latent_scatter", "confusion_matrix_image", "per_class_bars"]

_SCATTER_FIGSIZE = (6.0, 5.0)  # inches
_DPI = 100
_SEED = 0  # jitter and draw order in latent_scatter



def _render(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _class_colors(k: int) -> np.ndarray:
    import matplotlib

    if k <= 10:
        cmap, pos = matplotlib.colormaps["tab10"], np.arange(k)
    elif k <= 20:
        cmap, pos = matplotlib.colormaps["tab20"], np.arange(k)
    else:
        cmap, pos = matplotlib.colormaps["turbo"], np.linspace(0.0, 1.0, k)
    return np.asarray(cmap(pos))[:, :3]


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, d) points onto their first two principal components.

    Centres z and takes the SVD. Returns (proj, explained_ratio): proj float64 (N, 2),
    explained_ratio float64 (2,) = fraction of total variance along PC1 and PC2 (zeros when
    the data has no variance; a component that does not exist, e.g. N = 1, is all zeros).
    Signs are fixed (largest-magnitude loading of each component positive), so the same
    input always gives the same projection.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must be a 2-D array (N, d), got shape {z.shape}")
    n, d = z.shape
    if n == 0:
        raise ValueError("z must contain at least one point")
    if d < 2:
        raise ValueError(f"pca_2d needs d >= 2 dimensions, got d = {d}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or infinite values")
    centred = z - z.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for i in range(vt.shape[0]):
        if vt[i, np.argmax(np.abs(vt[i]))] < 0:
            vt[i] = -vt[i]
    k = min(2, vt.shape[0])
    proj = np.zeros((n, 2))
    proj[:, :k] = centred @ vt[:k].T
    total = float(np.sum(s**2))
    ratio = np.zeros(2)
    if total > 0:
        ratio[:k] = s[:k] ** 2 / total
    return proj, ratio


def latent_coords(z: np.ndarray) -> tuple[np.ndarray, str, str]:
    """The 2-D coordinates and axis labels `latent_scatter` plots for latent codes z (N, d).

    d == 1: (z1, jitter) with fixed-seed uniform jitter in [-0.5, 0.5]; d == 2: (z1, z2) as
    is; d > 2: first two principal components, labelled "PC1 (xx.x% var)", "PC2 (xx.x% var)".
    Returns (xy float64 (N, 2), x_label, y_label).
    """
    z = np.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"z must be a 2-D array (N, d), got shape {z.shape}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"z must have at least one point and one dimension, got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.number) or np.issubdtype(z.dtype, np.complexfloating):
        raise ValueError(f"z must be real numbers, got dtype {z.dtype}")
    z = z.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or infinite values")
    n, d = z.shape
    if d == 1:
        jitter = np.random.default_rng(_SEED).uniform(-0.5, 0.5, size=n)
        return np.column_stack([z[:, 0], jitter]), "z1", "jitter"
    if d == 2:
        return z.copy(), "z1", "z2"
    proj, ratio = pca_2d(z)
    return proj, f"PC1 ({100 * ratio[0]:.1f}% var)", f"PC2 ({100 * ratio[1]:.1f}% var)"


def latent_scatter(z: np.ndarray, labels: np.ndarray, class_names: list[str], title: str = "") -> np.ndarray:
    """Scatter of latent codes coloured by class, with a legend.

    z: (N, d) real; labels: (N,) integers in [0, K); class_names: K strings.
    d > 2 is projected to its first two principal components (axis labels give the
    explained variance), d == 1 is plotted against a fixed jitter; see `latent_coords`.
    Points are drawn in a fixed-seed shuffled order so no class hides the others.
    Returns uint8 (500, 600, 3) (6 x 5 in at 100 dpi); identical input gives an identical array.
    """
    xy, x_label, y_label = latent_coords(z)
    n = xy.shape[0]
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array (N,), got shape {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but z has {n} points")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if isinstance(class_names, str):
        raise ValueError("class_names must be a list of strings, not a single string")
    names = [str(c) for c in class_names]
    k = len(names)
    if k == 0:
        raise ValueError("class_names must not be empty")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(
            f"labels must lie in [0, {k}) for {k} class_names, got range [{labels.min()}, {labels.max()}]"
        )

    colors = _class_colors(k)
    order = np.random.default_rng(_SEED).permutation(n)
    fig = Figure(figsize=_SCATTER_FIGSIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    size = 12.0 if n <= 2000 else 4.0
    ax.scatter(xy[order, 0], xy[order, 1], c=colors[labels[order]], s=size, alpha=0.8, linewidths=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=5, color=colors[i], label=names[i])
        for i in range(k)
    ]
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize="small" if k <= 20 else "x-small",
        ncols=max(1, math.ceil(k / 25)),
        frameon=False,
        handletextpad=0.2,
    )
    return _render(fig)


def confusion_matrix_image(cm: np.ndarray, class_names: list[str], title: str = "") -> np.ndarray:
    """A confusion matrix: rows = true class, columns = predicted class.

    cm: (K, K) non-negative counts; class_names: K strings. Cell colours are row-normalised
    (fraction of each true class; an empty row is white), the raw counts are written in the
    cells, and the overall accuracy is shown under the title.
    Returns uint8 (S, S, 3) with S = 100 * clip(0.6 * K + 3, 5, 14) rounded: the shape
    depends on K only.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square 2-D array (K, K), got shape {cm.shape}")
    k = cm.shape[0]
    if k == 0:
        raise ValueError("cm must not be empty")
    if not np.issubdtype(cm.dtype, np.number) or np.issubdtype(cm.dtype, np.complexfloating):
        raise ValueError(f"cm must hold real counts, got dtype {cm.dtype}")
    counts = cm.astype(np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("cm must hold finite, non-negative counts")
    names = check_labels(class_names, k, "class_names", "classes in cm")

    row_sums = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    total = counts.sum()
    accuracy = float(np.trace(counts) / total) if total > 0 else float("nan")
    integral = np.all(counts == np.round(counts))

    side = float(np.clip(0.6 * k + 3.0, 5.0, 14.0))
    fig = Figure(figsize=(side, side), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class")
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    heading = f"accuracy {accuracy:.1%}" if total > 0 else "no samples"
    ax.set_title(f"{title}\n{heading}" if title else heading)
    fontsize = 9 if k <= 10 else 7 if k <= 20 else 5
    for i in range(k):
        for j in range(k):
            value = counts[i, j]
            text = f"{int(value)}" if integral else f"{value:.3g}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    return _render(fig)


def per_class_bars(
    class_names: Sequence[str], values: dict[str, Sequence[float]], floors: dict[str, Sequence[float]] | None = None,
    title: str = "",
) -> np.ndarray:
    """Grouped bars per class, one colour per measure (e.g. precision, recall, coverage in [0, 1]); where
    ``floors`` gives a measure's real-data value per class, a black tick marks it on the bar. NaN: no bar.

    class_names: K strings; values, floors: measure -> K numbers. Returns uint8 (500, W, 3), W growing with K.
    """
    k, names = len(class_names), list(values)
    if k == 0 or not names:
        raise ValueError("per_class_bars needs at least one class and one measure")
    for name in names:
        if len(values[name]) != k or (floors and name in floors and len(floors[name]) != k):
            raise ValueError(f"{name!r} must have one value per class ({k})")
    fig = Figure(figsize=(max(6.0, 0.7 * k * len(names) / 2 + 2), 5.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    width, x = 0.8 / len(names), np.arange(k)
    colors = _class_colors(max(len(names), 3))
    for j, name in enumerate(names):
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, np.nan_to_num(np.asarray(values[name], float), nan=0.0), width, label=name, color=colors[j])
        if floors and name in floors:
            ax.scatter(pos, np.asarray(floors[name], float), marker="_", s=120, color="black", zorder=3)
    ax.scatter([], [], marker="_", color="black", label="real test data")
    ax.set_xticks(x, labels=list(class_names), rotation=45 if k > 10 else 0, ha="right" if k > 10 else "center")
    ax.set_ylim(0.0, 1.15)  # room above the bars for the legend
    ax.legend(loc="upper center", ncol=len(names) + 1, fontsize=8, frameon=False)
    ax.set_title(title)
    return _render(fig)
