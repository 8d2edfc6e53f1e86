"""Synthetic-data audit (``vaedist evaluate audit``): fidelity, diversity and memorization, each against
the same figure for real data.

Everything is measured in one feature space (:mod:`.features`: a domain classifier's pooled conv
features, not Inception) between three sets: the generated images G, the real training images T (what a model
saw), and the real test images P (real data the model never saw: the floor every measure is read against).

- Fidelity: the Fréchet distance ``fd`` = ||mu_G - mu_T||^2 + Tr(S_G + S_T - 2 (S_G S_T)^1/2) and KID (the
  unbiased MMD^2 with the kernel (x.y / D + 1)^3, averaged over subsets), both torchmetrics'; the floors
  ``fd_real_floor`` / ``kid_real_floor`` are the same between P and T at the same sample sizes.
- Diversity: precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020),
  with k-NN balls (k = 5) in a seeded sample of T as large as G's sample; overall and per class.
- Memorization: each image's distance to its closest training image (DCR), for G and for P:
  ``dcr_ratio`` = median DCR(G) / median DCR(P), ``copy_fraction`` = share of G closer to T than the
  1st percentile of DCR(P), and ``data_copying_z``, the C_T statistic of Meehan et al. 2020 over k-means
  cells of T. Feature-space DCR drives the verdict; pixel-space DCR is reported beside it (exact copies
  show in both, shifted or re-drawn copies in features only).

Metrics and verdicts are pure functions of arrays; :func:`measure` runs them with features and
nearest-neighbour searches on Ray, and :mod:`vaedist.evaluate.entry` records the result in MLflow.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedist.errors import UsageError
from vaedist.evaluate import neighbours
from vaedist.evaluate.sets import TABLE_FORMAT
from vaedist.generate.format import UNCONDITIONAL_LABEL
from vaedist.generate.reader import GeneratedSet

AUDIT_VERSION = 1  # bump when a measure changes: the run name changes with it
AUDIT_ARTIFACT = "evaluation/audit.json"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' defaults (Binkowski et al. 2018 used the same)
COPY_PERCENTILE = 1.0  # copy_fraction: closer to the training set than this percentile of the test DCRs
CELLS = 50  # k-means cells of the training features for the data-copying test
MIN_CELL_GENERATED = 20  # Meehan et al.'s tau = 20 / m: a cell counts when it holds more generated images
LOCAL_PAIRS = 1e8  # searches smaller than this many pairs run in this process (10,000 x 10,000: ~2 s)
KMEANS_FIT = 10_000  # training features the k-means cells are fitted on (a seeded sample)

# --------------------------------------------------------------------------------------------------
# The set, checked against the dataset


def check_set(
    gen: GeneratedSet, dataset: str | None, k: int, allow_other_data: bool = False
) -> tuple[str, GeneratedSet]:
    """(the dataset, the set with labels as the dataset's class indices) after checking image shape,
    labels and their names, and size (> k, so every generated image has k other ones)."""
    from vaedist.evaluate.cas import matching_dataset

    dataset, spec = matching_dataset(gen, dataset, allow_other_data)
    if len(gen.labels) < k + 1:
        raise UsageError(f"{gen.folder} holds {len(gen.labels)} image(s), fewer than k + 1 = {k + 1} (each image's "
                         f"k = {k} nearest neighbours are measured)")  # fmt: skip
    labels = gen.labels
    if (
        gen.image_format == TABLE_FORMAT and gen.label_names
    ):  # declared names: map them to the dataset's indices
        unknown = sorted({n for names in gen.label_names.values() for n in names} - set(spec.class_names))
        if unknown:
            raise UsageError(f"class {unknown[0]!r} of {gen.folder} is not a {dataset} class "
                             f"({', '.join(spec.class_names)})")  # fmt: skip
        index = {label: spec.class_names.index(names[0]) for label, names in gen.label_names.items()}
        labels = np.array([index[v] for v in labels.tolist()], dtype=np.int64)
    else:
        for label, names in sorted(gen.label_names.items()):
            if (
                label != UNCONDITIONAL_LABEL
                and 0 <= label < spec.num_classes
                and names != [spec.class_names[label]]
            ):
                raise UsageError(f"label {label} in {gen.folder} is named {', '.join(map(repr, names))} but "
                                 f"{dataset} calls it {spec.class_names[label]!r} (made for another dataset?)")  # fmt: skip
    outside = sorted(
        {v for v in labels.tolist() if v != UNCONDITIONAL_LABEL and not 0 <= v < spec.num_classes}
    )
    if outside:
        raise UsageError(
            f"label {outside[0]} in {gen.folder} is not a {dataset} class (0..{spec.num_classes - 1})"
        )
    return dataset, GeneratedSet(**{**gen.__dict__, "labels": labels})


# --------------------------------------------------------------------------------------------------
# Fidelity: FD and KID (torchmetrics), on features computed once


class GivenFeatures(nn.Module):
    """The identity on feature batches (B, D). torchmetrics' FID and KID take the feature extractor as a
    module; the audit runs its extractor once, on Ray, for every measure, so they get its output."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_tensor(x: np.ndarray, dtype=np.float64) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=dtype))  # (N, D)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) of features (N, D) and (M, D), by torchmetrics'
    FrechetInceptionDistance (float64; Tr((S_r S_f)^1/2) as the sum of the square roots of the eigenvalues
    of S_r S_f, which is stable where sqrtm of a near-singular product is not)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]))
    fid.update(_as_tensor(real), real=True)
    fid.update(_as_tensor(fake), real=False)
    return float(fid.compute())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, seed: int) -> tuple[float, float]:
    """(mean, standard deviation) over KID_SUBSETS random subsets (seeded) of the unbiased MMD^2 with the
    cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018), by torchmetrics'
    KernelInceptionDistance. Unbiased: about 0, even slightly negative, for two samples of one distribution."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=GivenFeatures(real.shape[1]), subsets=KID_SUBSETS, subset_size=size
        )
    # float32: 100 subsets of 3 kernel matrices take ~4x longer in float64 and agree to 4 digits here
    kid.update(_as_tensor(real, np.float32), real=True)
    kid.update(_as_tensor(fake, np.float32), real=False)
    with torch.random.fork_rng():  # its subsets come from torch's global generator
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


# --------------------------------------------------------------------------------------------------
# Diversity: precision, recall, density, coverage


@dataclass(frozen=True)
class Search:
    """Where nearest-neighbour searches run: in this process (``plan`` None, or a small search), or as Ray
    tasks of ``plan`` (:func:`vaedist.evaluate.neighbours.on_ray`). Same answers either way. ``kernels``
    collects the names of the pass-1 kernels that ran (``cpu/float32``, ...), for the audit's record."""

    plan: Any = None
    kernels: set[str] = field(default_factory=set)

    def _run(self, fn, queries: np.ndarray, reference: np.ndarray, args: tuple, what: str) -> tuple:
        if self.plan is None or len(queries) * len(reference) < LOCAL_PAIRS:
            kernel = neighbours.kernel_here()
            out = fn(queries, reference, *args, kernel=kernel)
            self.kernels.add(kernel.name)
            return out if isinstance(out, tuple) else (out,)
        out, ran = neighbours.on_ray(fn, queries, reference, args, self.plan, what)
        self.kernels.update(ran)
        return out

    def nearest(self, queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k) ascending, indices (Q, k)) of the k nearest reference rows."""
        return self._run(neighbours.nearest, queries, reference, (k,), "nearest-neighbour search")

    def ball_counts(self, queries: np.ndarray, reference: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return self._run(neighbours.ball_counts, queries, reference, (radii,), "k-NN ball count")[0]


def prdc(real: np.ndarray, fake: np.ndarray, k: int, search: Search | None = None) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) of ``fake``
    (M, D) against ``real`` (N, D). With rad_r(j) the distance from real j to its k-th nearest other real,
    rad_f(i) likewise among fakes, and B(x, r) the open ball:
      precision = 1/M sum_i 1[f_i in some B(r_j, rad_r(j))]    recall = 1/N sum_j 1[r_j in some B(f_i, rad_f(i))]
      density   = 1/(kM) sum_i #{j: f_i in B(r_j, rad_r(j))}   coverage = 1/N sum_j 1[nearest fake to r_j in B(r_j, rad_r(j))]
    """
    search = search or Search()
    real_radii = search.nearest(real, real, k + 1)[0][:, k]  # column 0: the point itself
    fake_radii = search.nearest(fake, fake, k + 1)[0][:, k]
    in_real_balls = search.ball_counts(fake, real, real_radii)  # (M,)
    in_fake_balls = search.ball_counts(real, fake, fake_radii)  # (N,)
    nearest_fake = search.nearest(real, fake, 1)[0][:, 0]  # (N,)
    return {
        "precision": float((in_real_balls > 0).mean()),
        "recall": float((in_fake_balls > 0).mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float((nearest_fake < real_radii).mean()),
    }


# --------------------------------------------------------------------------------------------------
# Memorization: distance to the closest record, the data-copying test


def dcr_figures(generated: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """DCRs of generated (M,) and held-out test images (N,) -> dcr_ratio, copy_fraction and their parts."""
    threshold = float(np.percentile(test, COPY_PERCENTILE))
    median_test = float(np.median(test))
    return {
        "dcr_ratio": float(np.median(generated)) / median_test if median_test > 0 else math.inf,
        "copy_fraction": float((generated < threshold).mean()),
        "copy_threshold": threshold,
        "dcr_median_generated": float(np.median(generated)),
        "dcr_median_test": median_test,
    }


def mann_whitney_z(generated: np.ndarray, test: np.ndarray) -> float:
    """Z-scored Mann-Whitney U of generated (m,) vs test (n,) DCRs (Meehan et al. 2020, eq. 3):
    U = #{(i, j): d(g_i) > d(p_j)} + ties / 2, Z = (U - mn/2 + 1/2) / sqrt(mn(m + n + 1) / 12) (mean and variance
    under H0, continuity-corrected as in the authors' code). Z << 0: generated images sit closer to training."""
    from scipy.stats import mannwhitneyu

    m, n = len(generated), len(test)
    u = mannwhitneyu(generated, test, alternative="less").statistic  # U of the first sample
    return float((u - m * n / 2 + 0.5) / math.sqrt(m * n * (m + n + 1) / 12))


def kmeans_cells(train: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """Centroids (cells, D) of k-means (scikit-learn, k-means++, seeded) on a seeded sample of KMEANS_FIT
    training features (the cells only partition the space; Meehan et al. fit them on the training set)."""
    from sklearn.cluster import KMeans

    rows = np.random.default_rng(seed).choice(len(train), min(KMEANS_FIT, len(train)), replace=False)
    fitted = KMeans(n_clusters=min(cells, len(rows)), n_init=1, max_iter=100, random_state=seed).fit(
        train[rows]
    )
    return fitted.cluster_centers_.astype(np.float32)


def cell_of(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """int64 (N,): each point's nearest centroid, argmin_c ||c||^2 - 2 x.c (few centroids: no blocks)."""
    x, c = (
        torch.from_numpy(np.asarray(points, np.float32)),
        torch.from_numpy(np.asarray(centroids, np.float32)),
    )
    return torch.addmm(c.pow(2).sum(dim=1), x, c.T, alpha=-2.0).argmin(dim=1).numpy()


def data_copying_z(test_dcr: np.ndarray, test_cells: np.ndarray, gen_dcr: np.ndarray,
                   gen_cells: np.ndarray) -> tuple[float, int]:  # fmt: skip
    """(C_T, cells used): Meehan et al. 2020, eq. 5, C_T = sum_c P(c) Z_U(c) / sum_c P(c) over the cells c
    holding more than MIN_CELL_GENERATED generated images (tau = 20 / m) and some test image; P(c) is the
    share of test images in c, Z_U(c) the Mann-Whitney Z of the DCRs in c. NaN when no cell qualifies."""
    n_cells = int(max(test_cells.max(initial=0), gen_cells.max(initial=0))) + 1
    gen_counts = np.bincount(gen_cells, minlength=n_cells)
    test_counts = np.bincount(test_cells, minlength=n_cells)
    used = np.flatnonzero((gen_counts > MIN_CELL_GENERATED) & (test_counts > 0))
    if len(used) == 0:
        return math.nan, 0
    z = np.array([mann_whitney_z(gen_dcr[gen_cells == c], test_dcr[test_cells == c]) for c in used])
    weight = test_counts[used] / len(test_dcr)
    return float((weight * z).sum() / weight.sum()), len(used)


# --------------------------------------------------------------------------------------------------
# Verdicts: each measure against its real-data floor (pure)


class Level(Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


_WORST = {Level.OK: 0, Level.WARN: 1, Level.FAIL: 2}
# Which measures a headline group's level is the worst of; the others are reported with their own verdict.
GROUPS = {"fidelity": ("fd", "precision"), "diversity": ("recall", "coverage"),
          "memorization": ("copy_fraction", "data_copying_z")}  # fmt: skip


def _grade(good: bool, fair: bool) -> Level:
    return Level.OK if good else Level.WARN if fair else Level.FAIL


def judge(r: dict[str, Any]) -> dict[str, dict[str, str]]:
    """A level and a plain sentence per measure of result ``r`` (its figures and ``real`` floors)."""
    real, out = r["real"], {}
    fd_times = r["fd"] / real["fd"] if real["fd"] > 0 else math.inf
    out["fd"] = (_grade(fd_times <= 2, fd_times <= 10),
                 f"FD {r['fd']:.3g} is {fd_times:.3g}x real test data's {real['fd']:.3g}")  # fmt: skip
    # KID is unbiased, so real data's is about 0 and a ratio means nothing: the excess is read against the
    # spread over subsets (within 3 standard deviations: as real as real data at this sample size).
    spread = max(r.get("kid_std", 0.0), real.get("kid_std", 0.0), 1e-12)
    out["kid"] = (_grade(r["kid"] - real["kid"] <= 3 * spread, r["kid"] <= 10 * (max(real["kid"], 0.0) + 3 * spread)),
                  f"KID {r['kid']:.3g} vs {real['kid']:.3g} for real test data (+/- {spread:.2g} over subsets)")  # fmt: skip
    for key, what in (("precision", "share of samples that look real"), ("recall", "share of real data covered"),
                      ("density", "closeness to real neighbourhoods"), ("coverage", "real neighbourhoods reached")):  # fmt: skip
        share = r[key] / real[key] if real[key] > 0 else 0.0
        out[key] = (
            _grade(share >= 0.8, share >= 0.5),
            f"{key} {r[key]:.3f} ({what}) vs {real[key]:.3f} for real test data",
        )
    cf = r["copy_fraction"]
    out["copy_fraction"] = (_grade(cf <= 0.03, cf <= 0.1),
                            f"{cf:.2%} of samples are nearer a training image than 99% of real test images are (real: 1%)")  # fmt: skip
    out["dcr_ratio"] = (_grade(r["dcr_ratio"] >= 0.7, r["dcr_ratio"] >= 0.3),
                        f"median distance to the training set {r['dcr_ratio']:.2f}x that of real test images")  # fmt: skip
    z = r["data_copying_z"]
    z_text = (
        "no cell had enough samples"
        if math.isnan(z)
        else (
            f"data-copying Z {z:+.1f} (real: 0; below -3 = copying"
            + ("; > +3: farther than real data, underfitting)" if z > 3 else ")")
        )
    )
    out["data_copying_z"] = (Level.WARN if math.isnan(z) else _grade(z >= -1, z >= -3), z_text)
    return {key: {"level": level.value, "text": text} for key, (level, text) in out.items()}


def headline(verdicts: dict[str, dict[str, str]]) -> dict[str, str]:
    """Per group, the worst level of its measures: {"fidelity": "ok" | "warn" | "fail", ...}."""
    return {group: max((Level(verdicts[m]["level"]) for m in members), key=_WORST.__getitem__).value
            for group, members in GROUPS.items()}  # fmt: skip


def verdict_line(result: dict[str, Any]) -> str:
    """One line for summaries: the three groups and the figure that decides each."""
    h, real = result["headline"], result["real"]
    return (f"fidelity {h['fidelity'].upper()} (FD {result['fd']:.3g}, real {real['fd']:.3g}; precision "
            f"{result['precision']:.2f}), diversity {h['diversity'].upper()} (recall {result['recall']:.2f}, real "
            f"{real['recall']:.2f}), memorization {h['memorization'].upper()} (copies {result['copy_fraction']:.2%}, "
            f"Z {result['data_copying_z']:+.1f})")  # fmt: skip


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The readable summary: each measure beside its real-data floor and its verdict, then the headline."""
    v, real = r["verdicts"], r["real"]
    rows = [("FD", "fd", ".3g"), ("KID", "kid", ".3g"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
            ("density", "density", ".3f"), ("coverage", "coverage", ".3f"), ("copy fraction", "copy_fraction", ".2%"),
            ("DCR ratio", "dcr_ratio", ".2f"), ("data-copying Z", "data_copying_z", "+.2f")]  # fmt: skip
    lines = [f"  {'':16s}{'generated':>12s}{'real test':>12s}  verdict"]
    for label, key, fmt in rows:
        lines.append(f"  {label:16s}{format(r[key], fmt):>12s}{format(real[key], fmt):>12s}  "
                     f"{v[key]['level'].upper():5s} {v[key]['text']}")  # fmt: skip
    px = r["pixel"]
    lines.append(f"  pixel space: DCR ratio {px['dcr_ratio']:.2f}, copy fraction {px['copy_fraction']:.2%} (reported; "
                 "the memorization verdict is decided in feature space)")  # fmt: skip
    lines.append("  verdict: " + verdict_line(r))
    return lines


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN) and numpy scalars as Python's."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
