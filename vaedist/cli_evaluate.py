"""``vaedist evaluate``: the evaluation commands (likelihood, CAS, audit), thin like the rest of the
command line (:mod:`vaedist.cli`, which adds this group): flags into an :class:`EvaluateConfig` and a
:class:`ResourcesConfig`, one call to :func:`vaedist.evaluate.run_evaluate`."""

from __future__ import annotations

import json

import click

from vaedist.cli_common import echo, given
from vaedist.config import EvaluateConfig, ResourcesConfig, default_help


@click.group()
def evaluate() -> None:
    """How good a model and its synthetic data are: test likelihood (nats, bits/dim) and CAS."""


def _resources(workers, cpus_per_worker, gpus_per_worker, address):
    return ResourcesConfig(
        **given(workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, address=address)
    )


def _resource_options(fn):
    fn = click.option(
        "--address", help="Ray cluster address [default: $RAY_ADDRESS, else local Ray in-process]."
    )(fn)
    fn = click.option("--gpus-per-worker", type=float, help="GPUs per worker [default: 1 where the cluster has a GPU for every worker, else 0].")(fn)
    fn = click.option(
        "--cpus-per-worker", type=float, help="CPUs per worker [default: the node's CPUs / workers]."
    )(fn)
    return click.option("--workers", type=int, help=f"Ray workers {default_help(ResourcesConfig, 'workers')}.")(fn)


def _allow_other_data(fn):
    return click.option("--allow-other-data", is_flag=True, default=None, help="Judge the model (or the set) even against data whose fingerprint differs from its training data's.")(fn)  # fmt: skip


def _classifier_options(who: str, epochs_note: str, seed_note: str):
    """--epochs, --batch-size, --lr, --seed of an evaluation classifier (CAS's, the audit's features)."""

    def add(fn):
        for flag, kind, text, field in reversed((
            ("--epochs", int, f"{who} epochs, {epochs_note}", "classifier_epochs"),
            ("--batch-size", int, f"{who} global batch size", "classifier_batch_size"),
            ("--lr", float, f"{who} Adam learning rate", "classifier_lr"),
            ("--seed", int, f"Seed {seed_note}", "seed"),
        )):  # fmt: skip
            fn = click.option(flag, type=kind, help=f"{text} {default_help(EvaluateConfig, field)}.")(fn)
        return fn

    return add


@evaluate.command("likelihood")
@click.option(
    "--model",
    required=True,
    help="models:/vaedist-mnist@champion, models:/NAME/VERSION, runs:/ID/model or a model.pt.",
)
@click.option(
    "--dataset",
    metavar="NAME|PATH",
    help="Test set: a built-in name or a path [default: the model's].",
)
@click.option("--k", type=int, help=f"Importance samples for the IW-NLL {default_help(EvaluateConfig, 'k')}.")
@click.option(
    "--k-batch", type=int, help=f"Importance samples per forward pass (bounds memory) {default_help(EvaluateConfig, 'k_batch')}."
)
@click.option("--batch-size", type=int, help=f"Test images per forward pass {default_help(EvaluateConfig, 'batch_size')}.")
@click.option("--seed", type=int, help=f"Seed of the test-set binarization and the z draws {default_help(EvaluateConfig, 'seed')}.")
@click.option("--limit", type=int, help="Score only the first N test images (smoke runs) [default: all].")
@_allow_other_data
@_resource_options
def evaluate_likelihood(
    model, dataset, k, k_batch, batch_size, seed, limit, allow_other_data, workers, cpus_per_worker,
    gpus_per_worker, address,
) -> None:  # fmt: skip
    """Test -ELBO and importance-weighted NLL (nats, bits/dim) of a model, logged on its MLflow run.

    Bernoulli models are scored on the test set binarized once with --seed (the MNIST literature's
    protocol), others on the 8-bit images; a conditional model as -log p(x|y) with the true label.
    """
    cfg = EvaluateConfig(
        **given(model=model, dataset=dataset, k=k, k_batch=k_batch, batch_size=batch_size, seed=seed,
                 allow_other_data=allow_other_data)
    )  # fmt: skip
    resources = _resources(workers, cpus_per_worker, gpus_per_worker, address)
    from vaedist.evaluate import run_evaluate  # torch and Ray load only once the flags are valid

    run_evaluate(cfg, resources, "likelihood", echo=echo, limit=limit)


@evaluate.command("cas")
@click.option(
    "--generated", required=True, help="A folder written by vaedist generate (with _manifest.json)."
)
@click.option(
    "--dataset",
    metavar="NAME|PATH",
    help="Real dataset: a built-in name or a path [default: the manifest's].",
)
@_classifier_options("Classifier", "the same for generated and real data", "of the classifier and of the real-data subset")
@_allow_other_data
@_resource_options
def evaluate_cas(
    generated, dataset, epochs, batch_size, lr, seed, allow_other_data, workers, cpus_per_worker, gpus_per_worker,
    address,
) -> None:  # fmt: skip
    """Classification Accuracy Score: a fixed CNN trained on the generated images, tested on real ones.

    The same CNN and budget trained on as many real training images gives the ceiling; CAS, ceiling,
    their ratio, per-class accuracy and the confusion matrix go to an MLflow run in vaedist/<dataset>.
    """
    cfg = EvaluateConfig(**given(generated=generated, dataset=dataset, classifier_epochs=epochs,
                                  classifier_batch_size=batch_size, classifier_lr=lr, seed=seed,
                                  allow_other_data=allow_other_data))  # fmt: skip
    resources = _resources(workers, cpus_per_worker, gpus_per_worker, address)
    from vaedist.evaluate import run_evaluate

    run_evaluate(cfg, resources, "cas", echo=echo)


@evaluate.command("audit")
@click.option("--generated", required=True, help="A vaedist generate folder, or any labelled Parquet image table (an image column, an integer label column).")
@click.option("--dataset", help="Real dataset: a built-in name or a path [default: the folder's manifest's].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (progress goes to stderr).")
@click.option("--k", "audit_k", type=int, help=f"Nearest neighbours of precision / recall / density / coverage {default_help(EvaluateConfig, 'audit_k')}.")
@click.option("--features", "audit_features", type=click.Path(dir_okay=False), help="A feature extractor saved with torch.export or TorchScript: float (B, C, H, W) in [0, 1] -> (B, D) [default: the CAS classifier trained on the real data].")
@_classifier_options("Feature classifier", "the CAS recipe", "of the classifier, the samples and the k-means cells")
@_allow_other_data
@_resource_options
def evaluate_audit(generated, dataset, as_json, audit_k, audit_features, epochs, batch_size, lr, seed,
                   allow_other_data, workers, cpus_per_worker, gpus_per_worker, address) -> None:  # fmt: skip
    """Fidelity (FD, KID), diversity (precision, recall, density, coverage) and memorization (distance
    to the closest training image, copy fraction, data-copying Z) of a synthetic set, each beside the
    same figure for real test data, with a verdict; logged to MLflow. The distances are measured in a
    domain classifier's features (not Inception: no Inception weights here) unless --features is given.
    """
    cfg = EvaluateConfig(**given(generated=generated, dataset=dataset, audit_k=audit_k, audit_features=audit_features,
                                  classifier_epochs=epochs, classifier_batch_size=batch_size, classifier_lr=lr,
                                  seed=seed, allow_other_data=allow_other_data))  # fmt: skip
    resources = _resources(workers, cpus_per_worker, gpus_per_worker, address)
    from vaedist.evaluate import run_evaluate
    from vaedist.evaluate.audit import json_ready

    progress = (lambda line: click.echo(line, err=True)) if as_json else echo
    result = run_evaluate(cfg, resources, "audit", echo=progress)["audit"]
    if as_json:
        click.echo(json.dumps(json_ready(result)))
