"""Evaluation: the test-set likelihood of a model, and the Classification Accuracy Score of its synthetic data.

- :mod:`.likelihood`: -ELBO, IW-NLL(k) and bits/dim on the real test set, Ray tasks over test shards.
- :mod:`.cas`: a fixed classifier trained (Ray Train) on the generated Parquet, tested on real data,
  against the same classifier trained on real images.
- :mod:`.audit` (metrics, verdicts), :mod:`.audit_run` (the run), :mod:`.features` (the feature space),
  :mod:`.neighbours` (blocked k-NN on Ray), :mod:`.sets` (vaedist folders or foreign tables): the
  synthetic-data audit, fidelity / diversity / memorization against real-data floors.
- :mod:`.spread`: the Ray parts both share, and why each measure uses the mechanism it does.
- :mod:`.entry`: ``run_evaluate`` (checks the request, dispatches), ``evaluate_likelihood`` and
  ``evaluate_cas`` (run a measure, reuse an earlier result, record it in MLflow).

The generated Parquet is read by :func:`vaedist.generate.reader.read_generated`, the one reader of that
format. Everything below is importable from ``vaedist.evaluate`` as before the split.
"""

from vaedist.evaluate.audit_run import evaluate_audit
from vaedist.evaluate.cas import (
    CAS_ARTIFACT,
    CLASSIFIER_VERSION,
    CASClassifier,
    CasSetup,
    ClassifierResult,
    cas_result,
    check_generated,
    classifier_loop_per_worker,
    train_classifier,
)
from vaedist.evaluate.entry import WHATS, check_request, evaluate_cas, evaluate_likelihood, run_evaluate
from vaedist.evaluate.likelihood import (
    LikelihoodSetup,
    batch_aligned_shards,
    likelihood_metrics,
    load_for_likelihood,
    logged_names,
    prepare_test_images,
    score_images,
    score_shard,
)
from vaedist.generate.format import MANIFEST, PART_RE
from vaedist.generate.reader import GeneratedSet, read_generated

__all__ = [
    "CAS_ARTIFACT", "CLASSIFIER_VERSION", "MANIFEST", "PART_RE", "WHATS",
    "CASClassifier", "CasSetup", "ClassifierResult", "GeneratedSet", "LikelihoodSetup",
    "batch_aligned_shards", "cas_result", "check_generated", "check_request", "classifier_loop_per_worker", "evaluate_audit", "evaluate_cas",
    "evaluate_likelihood", "likelihood_metrics", "load_for_likelihood", "logged_names", "prepare_test_images",
    "read_generated", "run_evaluate", "score_images", "score_shard", "train_classifier",
]  # fmt: skip
