"""The audit run end to end (``vaedist evaluate audit``): read and check the set, get the feature space,
compute on Ray (:mod:`.audit` has the measures), record in MLflow.

Recorded on an evaluation run of its own in ``vaedist/<dataset>`` (kind ``evaluate``, tagged with the
generating model, beside CAS's), and, when the set came from a vaedist model, on the model's run too
(``audit_*`` metrics and the result). A rerun with ``reuse`` reads a finished audit of the same set,
feature space, k and seed back from MLflow.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaedist import tracking
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.evaluate import audit, features, spread
from vaedist.evaluate.audit import (
    CELLS,
    Search,
    cell_of,
    check_set,
    data_copying_z,
    dcr_figures,
    frechet_distance,
    headline,
    judge,
    kernel_inception_distance,
    kmeans_cells,
    prdc,
)
from vaedist.evaluate.features import Extractor, extract_on_ray
from vaedist.evaluate.sets import open_evaluation_run, read_set
from vaedist.generate.format import UNCONDITIONAL_LABEL
from vaedist.generate.reader import GeneratedSet
from vaedist.names import AUDIT_CPU_CAPABILITY_TAG, AUDIT_CPU_TAG, AUDIT_KERNELS_TAG, EVAL_TAG_PREFIX

# --------------------------------------------------------------------------------------------------
# The measure: read and check, set up, compute on Ray


@dataclass
class AuditSetup:
    """One audit, checked, with its run name; nothing started yet."""

    folder: str  # as given
    where: str  # canonical location (absolute path or URI)
    gen: GeneratedSet  # labels as the dataset's class indices
    dataset: str
    k: int
    seed: int
    name: str  # the MLflow run's name: the set, the feature space, k, seed, AUDIT_VERSION


def read_checked(cfg: EvaluateConfig) -> tuple[GeneratedSet, str]:
    """The synthetic set (vaedist folder or foreign table) and its dataset, after every check."""
    dataset, gen = check_set(read_set(str(cfg.generated)), cfg.dataset, cfg.audit_k, cfg.allow_other_data)
    return gen, dataset


def set_up(cfg: EvaluateConfig, gen: GeneratedSet, dataset: str, features_digest: str) -> AuditSetup:
    folder = str(cfg.generated)
    where = str(Path(folder).expanduser().resolve()) if "://" not in folder else folder
    facts = {"generated": where, "digest": gen.manifest_sha1, "features": features_digest, "k": cfg.audit_k,
             "seed": cfg.seed, "version": audit.AUDIT_VERSION}  # fmt: skip
    digest = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]
    stem = Path(where.rstrip("/")).name.removesuffix(".parquet")
    return AuditSetup(folder, where, gen, dataset, cfg.audit_k, cfg.seed, f"audit-{stem}-{digest}")


@dataclass
class RealSide:
    """The real data's half of an audit in one feature space: features, the test images' DCRs, the
    k-means cells, and the floors by sample size. The same for every set audited against the dataset,
    so one process (a pipeline, the tests) computes it once (:func:`real_side`)."""

    train: tuple[np.ndarray, np.ndarray]  # images uint8 (N, H, W, C), labels (N,)
    test: tuple[np.ndarray, np.ndarray]
    train_f: np.ndarray  # float32 (N, D)
    test_f: np.ndarray
    test_dcr: np.ndarray  # (N_test,) feature distance of each test image to the closest training image
    test_dcr_pixel: np.ndarray  # the same in pixels
    centroids: np.ndarray  # (CELLS, D) k-means cells of the training features
    floors: dict = field(default_factory=dict)  # (sample size, k) -> real test data's fidelity / diversity


_REAL: dict[tuple[str, str, int], RealSide] = {}  # (feature space, dataset, seed) -> its RealSide; one kept


def real_side(s: AuditSetup, extractor: Extractor, plan, search: Search, echo) -> tuple[np.ndarray, RealSide]:
    """(the generated features, the real side): everything real computed on Ray, unless this process did."""
    key = (extractor.digest, s.dataset, s.seed)
    if key in _REAL:
        return extract_on_ray(extractor, [s.gen.images], plan)[0], _REAL[key]
    train, test = load_split(s.dataset, "train_full"), load_split(s.dataset, "test")
    gen_f, train_f, test_f = extract_on_ray(extractor, [s.gen.images, train[0], test[0]], plan)
    echo(
        f"  features of {len(train_f):,} training and {len(test_f):,} test images computed (kept for this process)"
    )
    real = RealSide(train, test, train_f, test_f, test_dcr=search.nearest(test_f, train_f, 1)[0][:, 0],
                    test_dcr_pixel=search.nearest(test[0], train[0], 1)[0][:, 0],
                    centroids=kmeans_cells(train_f, CELLS, s.seed))  # fmt: skip
    _REAL.clear()
    _REAL[key] = real
    return gen_f, real


def _rows(seed: list[int], n: int, size: int) -> np.ndarray:
    """``size`` of ``range(n)`` (all when size >= n), a seeded choice in order."""
    return np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _figures(
    x: np.ndarray, train_f: np.ndarray, reference: np.ndarray, s: AuditSetup, search: Search
) -> dict:
    kid, kid_std = kernel_inception_distance(train_f, x, s.seed)
    return {
        "fd": frechet_distance(train_f, x),
        "kid": kid,
        "kid_std": kid_std,
        **prdc(reference, x, s.k, search),
    }


def _fidelity_and_diversity(s: AuditSetup, gen_f, real: RealSide, search: Search) -> tuple[dict, dict]:
    """(generated's figures, real test data's) at one sample size n = min(generated, test): FD and KID
    against every training feature, PRDC against n training features (Naeem et al.: equal sizes)."""
    n = min(len(gen_f), len(real.test_f))
    reference = real.train_f[_rows([s.seed, n, 0], len(real.train_f), n)]
    if (n, s.k) not in real.floors:
        test = real.test_f[_rows([s.seed, n, 1], len(real.test_f), n)]
        real.floors[n, s.k] = _figures(test, real.train_f, reference, s, search)
    gen = gen_f[_rows([s.seed, n, 2], len(gen_f), n)]
    return _figures(gen, real.train_f, reference, s, search), dict(real.floors[n, s.k])


def _per_class(s: AuditSetup, gen_f, real: RealSide, search: Search) -> dict[str, Any]:
    """PRDC of each class's generated images against its real training images, beside the class's real
    test images (sizes equal per class: the smaller of generated and test)."""
    names, out = get_spec(s.dataset).class_names, {}
    for c, name in enumerate(names):
        g, p, t = (np.flatnonzero(y == c) for y in (s.gen.labels, real.test[1], real.train[1]))
        n = min(len(g), len(p))
        entry: dict[str, Any] = {"images": int(len(g))}
        if n > s.k:
            reference = real.train_f[t[_rows([s.seed, c, n, 0], len(t), n)]]
            entry |= prdc(reference, gen_f[g[_rows([s.seed, c, n, 2], len(g), n)]], s.k, search)
            entry["real"] = prdc(reference, real.test_f[p[_rows([s.seed, c, n, 1], len(p), n)]], s.k, search)
        out[name] = entry
    return out


def _memorization(s: AuditSetup, gen_f, real: RealSide, search: Search) -> dict[str, Any]:
    """DCRs in features (decide) and pixels (reported), and the data-copying Z over k-means cells."""
    gen_d, gen_i = search.nearest(gen_f, real.train_f, 1)
    figures = dcr_figures(gen_d[:, 0], real.test_dcr)
    pixel = dcr_figures(search.nearest(s.gen.images, real.train[0], 1)[0][:, 0], real.test_dcr_pixel)
    test_cells, gen_cells = cell_of(real.test_f, real.centroids), cell_of(gen_f, real.centroids)
    z, cells = data_copying_z(real.test_dcr, test_cells, gen_d[:, 0], gen_cells)
    closest = np.argsort(gen_d[:, 0], kind="stable")[:12]
    return {**figures, "data_copying_z": z, "data_copying_cells": cells, "pixel": pixel,
            "real_copy_fraction": float((real.test_dcr < figures["copy_threshold"]).mean()),
            "nearest_copies": [[int(i), int(gen_i[i, 0]), float(gen_d[i, 0])] for i in closest]}  # fmt: skip


def measure(s: AuditSetup, extractor: Extractor, plan, echo) -> dict[str, Any]:
    """Every measure of the audit, its real-data floors and verdicts (features and searches on Ray):
    the result, not yet recorded."""
    t0, search = time.perf_counter(), Search(plan)
    gen_f, real = real_side(s, extractor, plan, search, echo)
    echo(
        f"  features of the {len(gen_f):,} generated images: {gen_f.shape[1]}-d  [{time.perf_counter() - t0:.0f}s]"
    )
    n = min(len(gen_f), len(real.test_f))
    figures, floor = _fidelity_and_diversity(s, gen_f, real, search)
    echo(
        f"  fidelity and diversity: {n:,} generated vs {n:,} real test images  [{time.perf_counter() - t0:.0f}s]"
    )
    labelled = bool((s.gen.labels != UNCONDITIONAL_LABEL).any())
    per_class = _per_class(s, gen_f, real, search) if labelled else {}
    memo = _memorization(s, gen_f, real, search)
    echo(f"  memorization: the {len(gen_f):,} generated and {len(real.test_f):,} test images' nearest of "
         f"{len(real.train_f):,} training images, in features and pixels  [{time.perf_counter() - t0:.0f}s]")  # fmt: skip
    echo(f"  searches: pass 1 in {', '.join(sorted(search.kernels))} (chosen per node from its hardware; "
         "pass 2 exact float32)")  # fmt: skip
    pixel, copies = memo.pop("pixel"), memo.pop("nearest_copies")
    floor |= {"dcr_ratio": 1.0, "copy_fraction": memo.pop("real_copy_fraction"), "data_copying_z": 0.0}
    result = {
        "generated": s.where, "dataset": s.dataset, "model_uri": s.gen.model_uri,
        "model_version": s.gen.model_version, "generated_images": len(gen_f), "train_images": len(real.train_f),
        "test_images": len(real.test_f), "sample_size": n, "k": s.k, "seed": s.seed,
        "features": extractor.description, **figures, "fd_real_floor": floor["fd"], "kid_real_floor": floor["kid"],
        **{key: memo[key] for key in ("dcr_ratio", "copy_fraction", "data_copying_z")},
        "real": floor, "verdict_space": "features", "dcr": memo, "pixel": pixel, "per_class": per_class,
        "nearest_copies": copies, "search": search_record(search),
    }  # fmt: skip
    result["verdicts"] = judge(result)
    result["headline"] = headline(result["verdicts"])
    result["seconds"] = time.perf_counter() - t0
    return result


def search_record(search: Search) -> dict[str, Any]:
    """Which kernels the searches ran (``cpu/float32``, ``cuda/bfloat16``: pass 1's device and dtype, chosen
    on each node from its hardware; pass 2 is exact float32) and the driver's machine, for the result."""
    from vaedist import hardware

    return {"pass1_kernels": sorted(search.kernels), "pass2": "float32 exact", "driver": hardware.machine_facts()}


# --------------------------------------------------------------------------------------------------
# Recording in MLflow


METRICS = ("fd", "fd_real_floor", "kid", "kid_real_floor", "precision", "recall", "density", "coverage",
           "dcr_ratio", "copy_fraction", "data_copying_z")  # fmt: skip


def logged_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The result's figures under their MLflow names (``audit_*``; per class ``audit_class_<i>_<measure>``)."""
    out = {f"audit_{key}": result[key] for key in METRICS}
    out |= {f"audit_real_{key}": value for key, value in result["real"].items() if key not in ("fd", "kid")}
    out["audit_kid_std"] = result["kid_std"]
    out |= {f"audit_pixel_{key}": result["pixel"][key] for key in ("dcr_ratio", "copy_fraction")}
    for i, entry in enumerate(result["per_class"].values()):
        out |= {
            f"audit_class_{i}_{m}": entry[m]
            for m in ("precision", "recall", "density", "coverage")
            if m in entry
        }
    return {key: float(value) for key, value in out.items() if value is not None and value == value}  # no NaN


def _open_run(s: AuditSetup, extractor: features.Extractor, uri: str) -> tuple[str, Any, str | None]:
    """(the audit's MLflow run, its logger, the generating model's run or None), the run tagged like CAS's."""
    params = {
        "evaluate.generated": s.where, "evaluate.dataset": s.dataset, "evaluate.seed": s.seed,
        "evaluate.audit_k": s.k, "audit.features": extractor.description, "audit.features_digest": extractor.digest,
        "audit.generated_images": len(s.gen.labels), "audit.version": audit.AUDIT_VERSION,
    }  # fmt: skip
    return open_evaluation_run(s.dataset, s.name, s.where, s.gen, params, "audit", uri)


def _pictures(s: AuditSetup, result: dict[str, Any], logger) -> None:
    """The generated images nearest the training set beside their nearest training images, and the
    per-class precision / recall / coverage against real test data's."""
    from vaedist.charts import per_class_bars
    from vaedist.figures import nearest_copies_grid

    train_x, _ = load_split(s.dataset, "train_full")
    copies = result["nearest_copies"]
    grid = nearest_copies_grid(
        s.gen.images[[g for g, _, _ in copies]], train_x[[t for _, t, _ in copies]], [d for _, _, d in copies],
        threshold=result["dcr"]["copy_threshold"],
        title="closest to the training set (feature distance; '!' = nearer than 99% of real test images)",
    )  # fmt: skip
    logger.log_image("audit_nearest_copies", grid, step=0)
    if result["per_class"]:
        names = list(result["per_class"])
        measures = ("precision", "recall", "coverage")
        values = {m: [e.get(m, float("nan")) for e in result["per_class"].values()] for m in measures}
        floors = {
            m: [e.get("real", {}).get(m, float("nan")) for e in result["per_class"].values()]
            for m in measures
        }
        logger.log_image(
            "audit_per_class", per_class_bars(names, values, floors, title=f"per class: {s.dataset}"), step=0
        )


def _record(
    s: AuditSetup, result: dict[str, Any], run_id: str, logger, model_run: str | None, uri: str
) -> None:
    """Metrics, pictures and the result on the audit's run (then FINISHED), and on the model's run."""
    metrics = logged_metrics(result)
    logger.log_metrics(metrics, step=0)
    logger.set_tags({AUDIT_KERNELS_TAG: ",".join(result["search"]["pass1_kernels"]),
                     AUDIT_CPU_TAG: result["search"]["driver"]["cpu"],
                     AUDIT_CPU_CAPABILITY_TAG: result["search"]["driver"]["cpu_capability"]})  # fmt: skip
    _pictures(s, result, logger)
    logger.log_dict({k: v for k, v in result.items() if k != "run_id"}, audit.AUDIT_ARTIFACT)
    tracking.end_run(run_id, "FINISHED")
    if model_run:
        on_model = tracking.RunLogger(model_run, uri)
        on_model.log_metrics(metrics, step=0)
        on_model.set_tags({f"{EVAL_TAG_PREFIX}audit.generated": s.where, f"{EVAL_TAG_PREFIX}audit.run_id": run_id,
                           f"{EVAL_TAG_PREFIX}audit.verdict": audit.verdict_line(result)})  # fmt: skip
        on_model.log_dict({k: v for k, v in result.items() if k != "run_id"}, f"evaluation/{s.name}.json")


def evaluate_audit(
    cfg: EvaluateConfig, resources: ResourcesConfig, echo=print, reuse: bool = False
) -> dict[str, Any]:
    """Fidelity, diversity and memorization of ``cfg.generated`` against the real data, with real test
    data's figures as floors; logged to MLflow. Inputs are checked before Ray starts."""
    from vaedist.cluster import storage_path

    gen, dataset = read_checked(cfg)
    custom = features.custom_extractor(cfg.audit_features) if cfg.audit_features else None
    uri = tracking.checked_tracking_uri()
    s = set_up(cfg, gen, dataset, custom.digest if custom else features.classifier_digest(dataset, cfg))
    found = tracking.finished_result(dataset, s.name, audit.AUDIT_ARTIFACT) if reuse else None
    if found is not None:
        echo(f"audit of {s.folder} (same images, feature space, k and seed) found on MLflow run {found[0]}; "
             f"reusing it: {audit.verdict_line(found[1])}")  # fmt: skip
        return {**found[1], "run_id": found[0]}
    echo(f"audit of {s.folder}: {len(gen.labels):,} images ({gen.image_format}) from {gen.model_uri or 'an unknown generator'}, "
         f"against real {get_spec(dataset).name}; k={s.k}, seed {s.seed}")  # fmt: skip
    plan = spread.start(resources)
    extractor = custom or features.classifier_extractor(dataset, cfg, plan, storage_path(None), echo)
    echo(f"  feature space: {extractor.description}")
    run_id, logger, model_run = _open_run(s, extractor, uri)
    try:
        result = measure(s, extractor, plan, echo)
        _record(s, result, run_id, logger, model_run, uri)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    for line in audit.summary_lines(result):
        echo(line)
    echo(f"  logged to MLflow run {run_id}" + (f" and the model's run {model_run}" if model_run else "")
         + f" in {tracking.shown_uri(uri)}")  # fmt: skip
    return {**result, "run_id": run_id}
