"""vaedist.figures: shapes, pixel placement, determinism, PCA, and input validation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vaedist import charts as C
from vaedist import figures as F


def _images(n: int, h: int = 5, w: int = 4, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _assert_rgb(img: np.ndarray) -> None:
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.flags["C_CONTIGUOUS"]


# ----------------------------------------------------------------------------- image_grid


@pytest.mark.parametrize(
    ("n", "ncol", "padding", "rows"),
    [(1, 1, 2, 1), (6, 3, 2, 2), (7, 3, 2, 3), (2, 5, 0, 1), (10, 4, 3, 3)],
)
def test_image_grid_shape(n, ncol, padding, rows):
    h, w = 5, 4
    grid = F.image_grid(_images(n, h, w, 3), ncol=ncol, padding=padding)
    _assert_rgb(grid)
    assert grid.shape == (rows * (h + padding) + padding, ncol * (w + padding) + padding, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_places_each_image_exactly(channels):
    n, h, w, p, ncol = 7, 5, 4, 2, 3
    imgs = _images(n, h, w, channels, seed=3)
    grid = F.image_grid(imgs, ncol=ncol, padding=p, pad_value=17)
    rgb = np.repeat(imgs, 3, axis=-1) if channels == 1 else imgs
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for k in range(n):
        r, c = divmod(k, ncol)
        y, x = p + r * (h + p), p + c * (w + p)
        np.testing.assert_array_equal(grid[y : y + h, x : x + w], rgb[k])
        covered[y : y + h, x : x + w] = True
    # Everything else (padding and the two empty cells of the last row) is pad_value.
    assert np.all(grid[~covered] == 17)


def test_image_grid_grayscale_expands_to_equal_channels():
    imgs = _images(4, c=1)
    grid = F.image_grid(imgs, ncol=2, padding=1, pad_value=0)
    np.testing.assert_array_equal(grid[..., 0], grid[..., 1])
    np.testing.assert_array_equal(grid[..., 0], grid[..., 2])
    np.testing.assert_array_equal(grid[1:6, 1:5, 0], imgs[0, :, :, 0])


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (np.zeros((5, 4, 1), np.uint8), {"ncol": 2}, r"4-D array \(N, H, W, C\)"),
        (np.zeros((2, 5, 4, 1, 1), np.uint8), {"ncol": 2}, "4-D"),
        (np.zeros((2, 5, 4, 2), np.uint8), {"ncol": 2}, "1 or 3 channels"),
        (np.zeros((2, 5, 4, 4), np.uint8), {"ncol": 2}, "1 or 3 channels"),
        (np.zeros((2, 5, 4, 3), np.float32), {"ncol": 2}, "uint8"),
        (np.zeros((0, 5, 4, 3), np.uint8), {"ncol": 2}, "empty"),
        (np.zeros((2, 5, 4, 3), np.uint8), {"ncol": 0}, "ncol"),
        (np.zeros((2, 5, 4, 3), np.uint8), {"ncol": 2, "padding": -1}, "padding"),
        (np.zeros((2, 5, 4, 3), np.uint8), {"ncol": 2, "pad_value": 256}, "pad_value"),
    ],
)
def test_image_grid_rejects_bad_input(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.image_grid(images, **kwargs)


# ----------------------------------------------------------------------------- labelled rows & friends


def _find_subimage(haystack: np.ndarray, needle: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) of an exact occurrence of needle in haystack, or None."""
    hh, hw = haystack.shape[:2]
    nh, nw = needle.shape[:2]
    for y in range(hh - nh + 1):
        for x in range(hw - nw + 1):
            if np.array_equal(haystack[y : y + nh, x : x + nw], needle):
                return y, x
    return None


def test_labelled_rows_contains_upscaled_grid_and_labels():
    r, m, h, w, scale = 3, 4, 6, 5, 2
    rows = np.random.default_rng(1).integers(0, 256, size=(r, m, h, w, 1), dtype=np.uint8)
    out = F.labelled_rows(rows, ["zero", "one", "two"], title="samples", col_labels=list("abcd"), scale=scale)
    _assert_rgb(out)
    flat = rows.reshape(r * m, h, w, 1)
    big = np.repeat(np.repeat(flat, scale, axis=1), scale, axis=2)
    grid = F.image_grid(big, ncol=m, padding=2)
    # The image part is exactly the upscaled grid; labels add margins left and on top only.
    pos = _find_subimage(out, grid[:, :12])  # a narrow strip is enough to locate it quickly
    assert pos is not None
    y, x = pos
    assert x > 0 and y > 0  # row labels on the left, title + column labels above
    np.testing.assert_array_equal(out[y : y + grid.shape[0], x : x + grid.shape[1]], grid)
    # Text was drawn in the left margin (some dark pixels there).
    assert out[y : y + grid.shape[0], :x].min() < 128


def test_labelled_rows_scale_changes_size_and_shape_is_deterministic():
    rows = np.zeros((2, 3, 28, 28, 3), np.uint8)
    a = F.labelled_rows(rows, ["a", "b"], scale=1)
    b = F.labelled_rows(rows, ["a", "b"], scale=3)
    _assert_rgb(a)
    _assert_rgb(b)
    assert b.shape[0] - a.shape[0] == 2 * 28 * 2
    assert b.shape[1] - a.shape[1] == 3 * 28 * 2
    np.testing.assert_array_equal(a, F.labelled_rows(rows, ["a", "b"], scale=1))


@pytest.mark.parametrize(
    ("rows", "row_labels", "kwargs", "match"),
    [
        (np.zeros((2, 3, 4, 4, 1), np.uint8), ["a"], {}, "row_labels has 1 entries but there are 2 rows"),
        (np.zeros((2, 3, 4, 4, 1), np.uint8), ["a", "b"], {"col_labels": ["x"]}, "col_labels has 1"),
        (np.zeros((3, 4, 4, 1), np.uint8), ["a", "b", "c"], {}, r"5-D array \(R, M, H, W, C\)"),
        (np.zeros((2, 3, 4, 4, 1), np.uint8), ["a", "b"], {"scale": 0}, "scale"),
        (np.zeros((2, 3, 4, 4, 1), np.uint8), "ab", {}, "list of strings"),
    ],
)
def test_labelled_rows_rejects_bad_input(rows, row_labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.labelled_rows(rows, row_labels, **kwargs)


def test_reconstruction_grid_rows_and_mismatch():
    x = _images(5, 8, 8, 1, seed=1)
    xr = _images(5, 8, 8, 1, seed=2)
    noisy = _images(5, 8, 8, 3, seed=3)  # channel count may differ between rows
    two = F.reconstruction_grid(x, xr, scale=1)
    three = F.reconstruction_grid(x, xr, {"with latent noise": noisy}, scale=1)
    _assert_rgb(two)
    _assert_rgb(three)
    assert three.shape[0] - two.shape[0] == 8 + 2  # exactly one more image row
    assert three.shape[1] >= two.shape[1]  # the longer label may widen the margin
    with pytest.raises(ValueError, match="same"):
        F.reconstruction_grid(x, xr[:4])
    with pytest.raises(ValueError, match="same"):
        F.reconstruction_grid(x, xr, {"noise": _images(5, 8, 9)})
    with pytest.raises(ValueError, match="4-D"):
        F.reconstruction_grid(x[0], xr[0])


def test_interpolation_strip_shape_and_labels():
    frames = _images(8, 7, 6, 3)
    out = F.interpolation_strip(frames, "3", "8", scale=2)
    _assert_rgb(out)
    strip = F.image_grid(np.repeat(np.repeat(frames, 2, 1), 2, 2), ncol=8, padding=2)
    assert out.shape[0] == strip.shape[0]  # one row, no title
    assert out.shape[1] > strip.shape[1]  # labels on both ends
    pos = _find_subimage(out, strip[:, :10])
    assert pos is not None
    y, x = pos
    np.testing.assert_array_equal(out[y : y + strip.shape[0], x : x + strip.shape[1]], strip)
    assert out[:, :x].min() < 128  # start label
    assert out[:, x + strip.shape[1] :].min() < 128  # end label
    with pytest.raises(ValueError, match="4-D"):
        F.interpolation_strip(frames[0], "a", "b")


# ----------------------------------------------------------------------------- PCA and latent scatter


def test_pca_2d_recovers_a_plane_in_8d():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(8, 2)))  # orthonormal 2-D plane in R^8
    coeffs = rng.normal(size=(400, 2)) * np.array([3.0, 1.0])
    z = coeffs @ basis.T + rng.normal(size=8)  # plus an offset: pca must centre
    proj, ratio = C.pca_2d(z)
    assert proj.shape == (400, 2)
    assert ratio.shape == (2,)
    assert ratio.sum() == pytest.approx(1.0, abs=1e-9)
    assert ratio[0] > ratio[1] > 0
    # Distances within the plane are preserved exactly by the projection.
    d_orig = np.linalg.norm(z[:50, None] - z[None, :50], axis=-1)
    d_proj = np.linalg.norm(proj[:50, None] - proj[None, :50], axis=-1)
    np.testing.assert_allclose(d_proj, d_orig, atol=1e-9)
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)
    # Deterministic including signs.
    proj2, ratio2 = C.pca_2d(z.copy())
    np.testing.assert_array_equal(proj, proj2)
    np.testing.assert_array_equal(ratio, ratio2)


def test_pca_2d_edge_cases():
    proj, ratio = C.pca_2d(np.ones((5, 4)))  # no variance
    np.testing.assert_array_equal(ratio, [0.0, 0.0])
    np.testing.assert_array_equal(proj, np.zeros((5, 2)))
    proj, ratio = C.pca_2d(np.arange(8.0).reshape(1, 8))  # one point
    assert proj.shape == (1, 2)
    with pytest.raises(ValueError, match="d >= 2"):
        C.pca_2d(np.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"2-D array \(N, d\)"):
        C.pca_2d(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        C.pca_2d(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_latent_coords_labels_per_dimension():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(8, 2)))
    z8 = rng.normal(size=(300, 2)) @ basis.T
    xy, xl, yl = C.latent_coords(z8)
    assert xy.shape == (300, 2)
    assert xl.startswith("PC1 (") and xl.endswith("% var)")
    assert yl.startswith("PC2 (") and yl.endswith("% var)")
    pcts = [float(s.split("(")[1].split("%")[0]) for s in (xl, yl)]
    assert sum(pcts) == pytest.approx(100.0, abs=0.11)

    z2 = rng.normal(size=(50, 2))
    xy, xl, yl = C.latent_coords(z2)
    np.testing.assert_array_equal(xy, z2)
    assert (xl, yl) == ("z1", "z2")

    z1 = rng.normal(size=(50, 1))
    xy, xl, yl = C.latent_coords(z1)
    np.testing.assert_array_equal(xy[:, 0], z1[:, 0])
    assert (xl, yl) == ("z1", "jitter")
    assert np.all(np.abs(xy[:, 1]) <= 0.5)
    np.testing.assert_array_equal(xy, C.latent_coords(z1)[0])  # fixed-seed jitter


@pytest.mark.parametrize("d", [1, 2, 8])
def test_latent_scatter_shape_and_determinism(d):
    rng = np.random.default_rng(d)
    z = rng.normal(size=(200, d)).astype(np.float32)
    labels = rng.integers(0, 3, size=200)
    names = ["zero", "one", "two"]
    a = C.latent_scatter(z, labels, names, title=f"d={d}")
    _assert_rgb(a)
    assert a.shape == (500, 600, 3)
    assert a.min() < 255  # something was drawn
    b = C.latent_scatter(z.copy(), labels.copy(), list(names), title=f"d={d}")
    np.testing.assert_array_equal(a, b)


def test_latent_scatter_changes_with_data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(100, 2))
    labels = rng.integers(0, 2, size=100)
    a = C.latent_scatter(z, labels, ["a", "b"])
    b = C.latent_scatter(z * 3 + 1, labels, ["a", "b"])
    assert a.shape == b.shape
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("z", "labels", "names", "match"),
    [
        (np.zeros((10,)), np.zeros(10, int), ["a"], r"2-D array \(N, d\)"),
        (np.zeros((10, 2)), np.zeros(9, int), ["a"], "labels has 9 entries but z has 10 points"),
        (np.zeros((10, 2)), np.zeros((10, 1), int), ["a"], "1-D"),
        (np.zeros((10, 2)), np.zeros(10), ["a"], "integers"),
        (np.zeros((10, 2)), np.full(10, 2), ["a", "b"], r"\[0, 2\)"),
        (np.zeros((10, 2)), np.full(10, -1), ["a", "b"], r"\[0, 2\)"),
        (np.zeros((10, 2)), np.zeros(10, int), [], "empty"),
        (np.zeros((0, 2)), np.zeros(0, int), ["a"], "at least one point"),
        (np.full((3, 2), np.inf), np.zeros(3, int), ["a"], "NaN or infinite"),
    ],
)
def test_latent_scatter_rejects_bad_input(z, labels, names, match):
    with pytest.raises(ValueError, match=match):
        C.latent_scatter(z, labels, names)


# ----------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_image_shape_stable_and_deterministic():
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(4)]
    cm1 = rng.integers(0, 50, size=(4, 4)) + np.eye(4, dtype=int) * 100
    cm2 = rng.integers(0, 5000, size=(4, 4))
    cm2[2] = 0  # an empty row must not divide by zero
    a = C.confusion_matrix_image(cm1, names, title="CAS")
    b = C.confusion_matrix_image(cm2, names)
    _assert_rgb(a)
    assert a.shape == b.shape  # depends on K only
    np.testing.assert_array_equal(a, C.confusion_matrix_image(cm1.copy(), list(names), title="CAS"))
    assert not np.array_equal(a, b)
    ten = C.confusion_matrix_image(np.eye(10, dtype=np.int64), [str(i) for i in range(10)])
    _assert_rgb(ten)
    assert ten.shape == (900, 900, 3)


def test_confusion_matrix_image_float_counts():
    out = C.confusion_matrix_image(np.array([[0.5, 0.25], [0.0, 1.0]]), ["a", "b"])
    _assert_rgb(out)


@pytest.mark.parametrize(
    ("cm", "names", "match"),
    [
        (np.zeros((2, 3)), ["a", "b"], r"square 2-D array \(K, K\)"),
        (np.zeros(4), ["a", "b"], "square"),
        (np.zeros((2, 2)), ["a"], "class_names has 1 entries but there are 2 classes"),
        (-np.ones((2, 2)), ["a", "b"], "non-negative"),
        (np.array([[1.0, np.nan], [0, 1]]), ["a", "b"], "finite"),
        (np.zeros((0, 0)), [], "empty"),
    ],
)
def test_confusion_matrix_image_rejects_bad_input(cm, names, match):
    with pytest.raises(ValueError, match=match):
        C.confusion_matrix_image(cm, names)


# ----------------------------------------------------------------------------- helpers


def test_save_png_roundtrip(tmp_path):
    img = F.image_grid(_images(3, c=3), ncol=3)
    path = tmp_path / "sub" / "grid.png"
    F.save_png(img, path)
    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), img)
    with pytest.raises(ValueError, match="uint8"):
        F.save_png(img.astype(np.float32), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        F.save_png(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "x.png")


def test_to_uint8():
    np.testing.assert_array_equal(F.to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(F.to_uint8(np.array([-3, 7, 300])), [0, 7, 255])
    x = np.arange(5, dtype=np.uint8)
    assert F.to_uint8(x) is x
    with pytest.raises(ValueError, match="NaN"):
        F.to_uint8(np.array([np.nan]))


def test_the_numpy_helper_rounds_as_the_sampler_does():
    """figures.to_uint8 (users' float arrays) and sampling.to_uint8_hwc (the decoder's tensors) are one rule."""
    import torch

    from vaedist.sampling import to_uint8_hwc

    x = np.random.default_rng(0).uniform(-0.2, 1.2, (3, 2, 5, 4)).astype(np.float32)  # (B, C, H, W)
    np.testing.assert_array_equal(to_uint8_hwc(torch.from_numpy(x)), F.to_uint8(x.transpose(0, 2, 3, 1)))


def test_imports_no_pyplot_torch_ray_or_mlflow():
    """The grids need no matplotlib at all; the charts use it without pyplot."""
    code = (
        "import sys, vaedist.figures; grids = 'matplotlib' in sys.modules; import vaedist.charts; "
        "bad = [m for m in ('matplotlib.pyplot', 'torch', 'ray', 'mlflow') if m in sys.modules]; "
        "print(bad, grids); sys.exit(1 if bad or grids else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendering_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 6))
    labels = rng.integers(0, 4, size=300)
    names = list("abcd")
    rows = rng.integers(0, 256, size=(4, 5, 10, 10, 1), dtype=np.uint8)
    expected_scatter = C.latent_scatter(z, labels, names)
    expected_rows = F.labelled_rows(rows, names, title="t")

    def work(i: int) -> bool:
        if i % 2:
            return np.array_equal(C.latent_scatter(z, labels, names), expected_scatter)
        return np.array_equal(F.labelled_rows(rows, names, title="t"), expected_rows)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(8)))
