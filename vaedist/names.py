"""The names vaedist's modules share, defined once: the validation metric, the checkpoint's file name and
the MLflow tags. The bottom of the package: imports nothing (nor torch, nor MLflow), so
``vaedist.tracking`` reads it without loading torch and ``vaedist.checkpoint`` without loading MLflow."""

from __future__ import annotations

# Lower is better: the metric Tune ranks trials on, checkpoints are kept by and the champion alias is
# decided on (docs/ARCHITECTURE.md, "Model URI").
VAL_METRIC = "val_neg_elbo"
CHECKPOINT_FILE = "model.pt"  # a checkpoint folder's one file: hparams + weights (vaedist.checkpoint)
CHAMPION = "champion"  # the registry alias of a dataset's best model

# MLflow tags on runs.
NAME_TAG = "vaedist.name"  # the job's deterministic name: a rerun with the same name resumes this run
KIND_TAG = "vaedist.kind"
DONE_TAG = "vaedist.checkpoint"  # set on a train run once it finished: where its best checkpoint is
MODEL_TAG = "vaedist.model_uri"  # on a run that registered its model: the models:/ URI and the version
VERSION_TAG = "vaedist.model_version"
MODEL_RUN_TAG = "vaedist.model_run_id"
TRIAL_ID_TAG = "vaedist.trial_id"  # a trial's child run: Tune's trial id, so a resumed trial finds its run
BEST_TRIAL_TAG = "vaedist.best_trial"  # a search's parent run: its best trial and that trial's model
BEST_MODEL_TAG = "vaedist.best_model"
STOPPED_EARLY_TAG = "vaedist.stopped_early"  # a trial's run: whether ASHA stopped it
NODES_TAG = "vaedist.nodes"  # a train run: the nodes its workers ran on
NUM_NODES_TAG = "vaedist.num_nodes"
EVALUATE_TAG = "vaedist.evaluate"  # an evaluation run: what it measured (cas, audit, audit-features)
FEATURES_TAG = "vaedist.features"  # a features run: the extractor
GENERATED_TAG = "vaedist.generated"  # an evaluation run: the generated folder it judged
VERSION_OF_VAEDIST_TAG = "vaedist.version"
AUDIT_KERNELS_TAG = "vaedist.audit.search_kernels"  # an audit run: the kernels and CPU its search ran on
AUDIT_CPU_TAG = "vaedist.audit.cpu"
AUDIT_CPU_CAPABILITY_TAG = "vaedist.audit.cpu_capability"
# On the model's run, what evaluate found: EVAL_TAG_PREFIX + "likelihood.<dataset>", + "audit.verdict", ...
EVAL_TAG_PREFIX = "vaedist.eval."

# MLflow tags on a registered model version.
VAL_SET_TAG = "val_set"  # the validation set its VAL_METRIC was measured on (champion.validation_set)
