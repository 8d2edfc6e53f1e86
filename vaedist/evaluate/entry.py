"""``vaedist evaluate``'s entry: check what is asked for, run each measure, record it in MLflow.

The measures (:mod:`.likelihood`, :mod:`.cas`) compute and print; this module decides what runs, reads an
earlier result back instead of recomputing it (``reuse``), and records: the likelihood on the model's own
run (metrics named for the data they were measured on, tags, the result as an artifact), CAS on an
evaluation run of its own (kind ``evaluate``, tagged with the generating model).
"""

from __future__ import annotations

from typing import Any

from vaedist import tracking
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.errors import UsageError
from vaedist.evaluate import audit_run, cas, likelihood, spread
from vaedist.evaluate.sets import open_evaluation_run
from vaedist.generate.card import record_evaluation
from vaedist.generate.format import CARD, MANIFEST_FORMAT
from vaedist.names import EVAL_TAG_PREFIX

WHATS = ("likelihood", "cas", "all", "audit")  # all = likelihood and CAS (and the audit with cfg.audit)


def check_request(cfg: EvaluateConfig, what: str, limit: int | None) -> tuple[str, ...]:
    """The measures ``what`` asks for, in the order they run; UsageError when an input is missing."""
    if what not in WHATS:
        raise UsageError(f"evaluate: what {what!r} is not one of {', '.join(WHATS)}")
    measures = ("likelihood", "cas") if what == "all" else (what,)
    if cfg.audit and what in ("all", "cas"):  # an evaluate section with audit: true
        measures += ("audit",)
    if "likelihood" in measures and not cfg.model:
        raise UsageError(
            "evaluate likelihood needs a model (--model models:/vaedist-mnist@champion or a checkpoint)"
        )
    if "cas" in measures and not cfg.generated:
        raise UsageError(
            "evaluate cas needs a generated folder (--generated DIR, written by vaedist generate)"
        )
    if "audit" in measures and not cfg.generated:
        raise UsageError(
            "evaluate audit needs a synthetic set (--generated: a vaedist generate folder or a labelled Parquet table)"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UsageError(f"evaluate: limit must be a positive number of test images, got {limit!r}")
    return measures


def run_evaluate(
    cfg: EvaluateConfig,
    resources: ResourcesConfig,
    what: str,
    echo=print,
    *,
    limit: int | None = None,
    reuse: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the evaluations ``what`` asks for: 'likelihood' (needs ``cfg.model``), 'cas' (needs
    ``cfg.generated``), 'all' (both), 'audit' (``cfg.generated``; also after CAS when ``cfg.audit``).
    Returns ``{"likelihood": {...}, "cas": {...}, "audit": {...}}`` with the keys run.

    ``limit``: score only the first ``limit`` test images in the likelihood (smoke runs, tests).
    ``reuse``: an evaluation MLflow already holds for the same model (or generated folder), data, k and
    seed is returned instead of recomputed (a pipeline's rerun; an IW-NLL at k=1000 of MNIST takes ~17 min on 2 cores).
    Inputs are checked before Ray starts, so bad input fails in a second with one line.
    """
    out: dict[str, dict[str, Any]] = {}
    for measure in check_request(cfg, what, limit):
        if measure == "likelihood":
            out["likelihood"] = evaluate_likelihood(cfg, resources, echo=echo, limit=limit, reuse=reuse)
        elif measure == "audit":
            out["audit"] = audit_run.evaluate_audit(cfg, resources, echo=echo, reuse=reuse)
        else:
            out["cas"] = evaluate_cas(cfg, resources, echo=echo, reuse=reuse)
    return out


# --------------------------------------------------------------------------------------------------
# Likelihood: on the model's own run


def evaluate_likelihood(
    cfg: EvaluateConfig, resources: ResourcesConfig, echo=print, limit: int | None = None, reuse: bool = False
) -> dict[str, Any]:
    """Test -ELBO, IW-NLL(k) and bits/dim of ``cfg.model`` on Ray; logged on the model's MLflow run.

    ``reuse``: the result already on the model's run for the same data, k, seed and images is returned
    without starting Ray.
    """
    s = likelihood.set_up(cfg, limit)
    run_id = tracking.model_run_id(s.uri)  # None for a checkpoint path: printed, not logged
    prior = tracking.load_dict(run_id, s.artifact) if reuse and run_id else None
    if prior is not None:
        echo(f"likelihood of {s.uri} on {s.n} {s.dataset} test images (k={cfg.k}, seed {cfg.seed}) is already on "
             f"MLflow run {run_id}: reusing it")  # fmt: skip
        return {**prior, "checkpoint": str(s.path), "run_id": run_id}
    result = likelihood.measure(s, cfg, resources, echo)
    if run_id is None:
        echo(
            "  not logged to MLflow: a checkpoint path has no run (evaluate a models:/ or runs:/ URI to log)"
        )
        return result
    logger = tracking.RunLogger(run_id, tracking.tracking_uri())
    logger.log_metrics(result["logged_metrics"], step=0)
    tag = f"{EVAL_TAG_PREFIX}likelihood.{s.dataset}"
    logger.set_tags({
        f"{tag}.protocol": s.protocol, f"{tag}.conditioning": s.conditioning,
        f"{tag}.images": s.n, f"{tag}.seed": cfg.seed, f"{tag}.k": cfg.k,
    })  # fmt: skip
    logger.log_dict({key: value for key, value in result.items() if key != "checkpoint"}, s.artifact)
    result["run_id"] = run_id
    echo(f"  logged to MLflow run {run_id} in {tracking.shown_uri()}")
    return result


# --------------------------------------------------------------------------------------------------
# CAS: an evaluation run of its own


def _open_cas_run(s: cas.CasSetup, cfg: EvaluateConfig, uri: str) -> tuple[str, Any]:
    """The evaluation's MLflow run (found by name on a rerun) and its logger, tagged with the model."""
    gen = s.gen
    params = {
        "evaluate.generated": s.where,
        "evaluate.dataset": s.dataset,
        "evaluate.seed": cfg.seed,
        "evaluate.classifier_epochs": cfg.classifier_epochs,
        "evaluate.classifier_batch_size": cfg.classifier_batch_size,
        "evaluate.classifier_lr": cfg.classifier_lr,
        "cas.classifier": f"CASClassifier v{cas.CLASSIFIER_VERSION} (2 conv + dropout + 2 linear)",
        "cas.generated_images": len(gen.labels),
        "cas.real_train_images": s.n_real,
        "cas.test_images": len(s.test[1]),
        "cas.image_format": gen.image_format,
    }
    run_id, logger, _ = open_evaluation_run(s.dataset, s.name, s.where, gen, params, "cas", uri)
    return run_id, logger


def _record_cas(s: cas.CasSetup, synthetic, real, run_id: str, logger) -> dict[str, Any]:
    """Metrics, the two confusion matrices and the result as an artifact; the run ends FINISHED."""
    from vaedist.charts import confusion_matrix_image
    from vaedist.data import get_spec

    result = cas.cas_result(s, synthetic, real, run_id)
    metrics = {"cas": synthetic.accuracy, "cas_real_accuracy": real.accuracy, "cas_ratio": result["ratio"]}
    for i in range(len(synthetic.confusion)):
        metrics[f"cas_class_{i}"] = float(synthetic.per_class[i])
        metrics[f"cas_real_class_{i}"] = float(real.per_class[i])
    logger.log_metrics(metrics, step=0)
    names = list(get_spec(s.dataset).class_names)
    for key, classifier, title in (
        ("cas_confusion_matrix", synthetic, f"CAS: trained on generated, tested on real {s.dataset}"),
        ("cas_real_confusion_matrix", real, f"ceiling: trained on {s.n_real} real {s.dataset} images"),
    ):
        logger.log_image(key, confusion_matrix_image(classifier.confusion, names, title=title), step=0)
    logger.log_dict({key: v for key, v in result.items() if key != "run_id"}, cas.CAS_ARTIFACT)
    tracking.end_run(run_id, "FINISHED")
    return result


def _update_card(s: cas.CasSetup, result: dict[str, Any], run_id: str, echo) -> None:
    """Put the figures on the folder's dataset card (a vaedist folder only: others have no card of ours)."""
    if s.gen.manifest.get("format") != MANIFEST_FORMAT:
        return
    figures = {key: result[key] for key in ("cas", "real_accuracy", "ratio")}
    problem = record_evaluation(s.where, s.gen.manifest, "cas", figures, run_id)
    echo(f"  warning: {problem}" if problem else f"  dataset card updated: {s.where}/{CARD}")


def evaluate_cas(
    cfg: EvaluateConfig, resources: ResourcesConfig, echo=print, reuse: bool = False
) -> dict[str, Any]:
    """CAS of ``cfg.generated`` against the real test set, with the real-data ceiling; logged to MLflow.

    ``reuse``: a finished evaluation of the same images with the same budget is read back from MLflow
    before Ray starts.
    """
    from vaedist.cluster import check_storage_shared, storage_path

    gen, dataset = cas.read_checked(cfg)
    uri = tracking.checked_tracking_uri()
    storage = storage_path(None)
    s = cas.set_up(cfg, gen, dataset)
    found = tracking.finished_result(dataset, s.name, cas.CAS_ARTIFACT) if reuse else None
    if found is not None:
        run_id, prior = found
        echo(f"CAS of {s.folder} (same images, same classifier budget) is already on MLflow run {run_id}: "
             f"reusing it: CAS {prior['cas']:.4f} / real {prior['real_accuracy']:.4f}")  # fmt: skip
        return {**prior, "run_id": run_id}
    plan = spread.start(resources)
    if plan.workers > 1:  # rank 0's report carries a checkpoint, written where every node can see it
        check_storage_shared(storage)
    run_id, logger = _open_cas_run(s, cfg, uri)
    echo(f"CAS of {s.folder}: {len(gen.labels)} generated images ({gen.image_format}) from "
         f"{gen.model_uri or 'an unknown model'}, tested on {len(s.test[1])} real {dataset} test images")  # fmt: skip
    echo(f"  classifier CASClassifier v{cas.CLASSIFIER_VERSION}: {cfg.classifier_epochs} epoch(s), batch "
         f"{cfg.classifier_batch_size}, lr {cfg.classifier_lr:g}, seed {cfg.seed}; {plan.workers} worker(s) x "
         f"{plan.cpus_per_worker:g} CPU; MLflow run {run_id} in {tracking.shown_uri(uri)}")  # fmt: skip
    try:
        synthetic, real = cas.train_both(s, cfg, plan, storage, echo)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    result = _record_cas(s, synthetic, real, run_id, logger)
    echo(f"  CAS {synthetic.accuracy:.4f} / real {real.accuracy:.4f} = {result['ratio']:.3f}")
    _update_card(s, result, run_id, echo)
    echo("  per class: " + "  ".join(f"{name}={acc:.2f}" for name, acc in result["per_class"].items()))
    return result
