"""The model registry: a checkpoint logged as an MLflow model (the ``python_function`` flavor over the
weights-only ``model.pt``, the decoder's torch.export graph beside it), registered as
``vaedist-<dataset>``, and the ``champion`` alias read and moved (the verdict itself is
``vaedist.champion.judge``). MLflow code like :mod:`vaedist.tracking`, on whose connection it builds; runs,
metrics and loading a model by URI stay there."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from vaedist import tracking
from vaedist.names import CHAMPION, VAL_METRIC, VAL_SET_TAG

# What MLflow's registry prints (``eprint``, not logging) on every registration; vaedist says it itself.
_REGISTRY_CHATTER = ("Successfully registered model", "Created version", "Registered model ")


@contextlib.contextmanager
def _registry_chatter_dropped():
    """Keep MLflow's registration prints off the terminal unless verbose; any other line printed in the block
    still reaches stderr, at the block's end. A filter on captured text because MLflow prints these with ``print(file=sys.stderr)``,
    not through a logger a level could silence."""
    import io
    import sys

    from vaedist.console import is_verbose

    if is_verbose():
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not line.startswith(_REGISTRY_CHATTER)]
        sys.stderr.write("".join(kept))


def log_model(
    run_id: str,
    dataset: str,
    checkpoint_file: Path,
    exportable,
    example_inputs: tuple,
    val_metric: float,
    val_set: str,
) -> tuple[str, str]:
    """Log the generator as an MLflow model and register it as ``vaedist-<dataset>``.

    The registered model (``model``) is a ``python_function`` (:class:`vaedist.serve.GeneratorModel`):
    ``mlflow.pyfunc.load_model(...).predict`` and ``mlflow models serve`` turn a table of labels (and
    seeds, temperatures) into images. Its artifact is the vaedist checkpoint (hparams + state_dict,
    loaded with ``weights_only=True``), so ``models:/vaedist-mnist@champion`` also gives generate and
    evaluate the full VAE. Beside it, unregistered, ``generator_graph`` is the decoder as a torch.export
    ("pt2") graph: it loads with plain ``mlflow.pytorch.load_model`` / ``torch.export.load`` without
    vaedist installed and without unpickling code (the pyfunc needs both). ``exportable`` maps
    (z, label) -> images; torch.export needs an example with batch > 1.
    Returns (model URI of the version, version).
    """
    mlflow = tracking.mlflow_module()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    conditional = len(example_inputs) == 2
    name = tracking.registered_model_name(dataset)
    with mlflow.start_run(run_id=run_id):
        with _registry_chatter_dropped():  # only this call registers; the capture spans nothing else
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_model(),
                artifacts={"checkpoint": str(checkpoint_file)},
                signature=_pyfunc_signature(conditional),
                input_example=_pyfunc_example(conditional),
                registered_model_name=name,
                metadata={VAL_METRIC: val_metric},
                pip_requirements=pinned("vaedist", "torch", "numpy", "pandas", "cloudpickle"),
            )
        mlflow.pytorch.log_model(
            exportable,
            name="generator_graph",
            signature=_graph_signature(exportable, example_inputs),
            input_example=tuple(t.numpy() for t in example_inputs),
            serialization_format="pt2",
            pip_requirements=pinned("torch", "numpy", "cloudpickle"),
        )
    version = str(info.registered_model_version)
    client = tracking.mlflow_client()
    client.set_model_version_tag(name, version, VAL_METRIC, str(val_metric))
    client.set_model_version_tag(name, version, VAL_SET_TAG, val_set)
    client.set_model_version_tag(name, version, "run_id", run_id)
    from vaedist.checkpoint import load_checkpoint

    # the data it was trained on, as the registry shows it: the checkpoint's facts, not the data reopened
    fingerprint = (load_checkpoint(checkpoint_file).get("dataset") or {}).get("fingerprint")
    if fingerprint:
        client.set_model_version_tag(name, version, "dataset", dataset)
        client.set_model_version_tag(name, version, "dataset_fingerprint", fingerprint)
    return f"models:/{name}/{version}", version


def pinned(*names: str) -> list[str]:
    """``name==version`` of the installed distributions, for a logged model's requirements.

    Given explicitly because MLflow's inference (import the model in two subprocesses and list what they
    loaded) took 8 of the 10.8 s of a registration here, on every train run and search. These are what
    it inferred. A local version label (torch's ``+cpu``) is dropped, as MLflow does, so pip can install it.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def _pyfunc_model() -> str:
    """Models from code: MLflow keeps this file and runs it on load (no cloudpickled object)."""
    return str(Path(__file__).with_name("serve_model.py"))


def _pyfunc_signature(conditional: bool):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    columns = [ColSpec("long", "seed", required=False), ColSpec("double", "temperature", required=False)]
    if conditional:
        columns.insert(0, ColSpec("long", "label"))
    return ModelSignature(
        inputs=Schema(columns), params=ParamSchema([ParamSpec("image_format", "string", "raw")])
    )


def _pyfunc_example(conditional: bool):
    import pandas as pd

    example = {"seed": [0, 1], "temperature": [1.0, 1.0]}
    return pd.DataFrame({"label": [0, 1], **example} if conditional else example)


def _graph_signature(exportable, example_inputs: tuple):
    """(z, label) -> image tensor spec of the torch.export graph."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    inputs = [
        TensorSpec(np.dtype(t.numpy().dtype), (-1, *t.shape[1:]), name=name)
        for name, t in zip(("z", "label"), example_inputs, strict=False)
    ]
    with torch.no_grad():
        out = exportable(*example_inputs)
    return ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]), name="image")]),
    )


def registered_model_of_run(run_id: str, uri_tag: str, version_tag: str) -> tuple[str, str, float, str] | None:
    """(model URI, version, validation -ELBO, its validation set) that ``run_id`` registered before, or None."""
    client = tracking.mlflow_client()
    tags = client.get_run(run_id).data.tags
    uri, version = tags.get(uri_tag), tags.get(version_tag)
    if not uri or not version:
        return None
    try:
        mv = client.get_model_version(uri[len("models:/") :].split("/", 1)[0], version)
    except tracking.mlflow_module().exceptions.MlflowException:
        return None  # the version was deleted since: register anew
    return uri, version, float(mv.tags.get(VAL_METRIC, "inf")), mv.tags.get(VAL_SET_TAG, "")


def champion_uri(dataset: str) -> str | None:
    """``models:/vaedist-<dataset>/<version>`` of the current champion, or None."""
    name = tracking.registered_model_name(dataset)
    try:
        return f"models:/{name}/{tracking.mlflow_client().get_model_version_by_alias(name, CHAMPION).version}"
    except tracking.mlflow_module().exceptions.MlflowException:
        return None


def current_champion(dataset: str) -> tuple[str, float, str] | None:
    """(version, validation -ELBO, validation set) of the dataset's ``champion``, or None."""
    name = tracking.registered_model_name(dataset)
    try:
        mv = tracking.mlflow_client().get_model_version_by_alias(name, CHAMPION)
    except tracking.mlflow_module().exceptions.MlflowException:
        return None
    return str(mv.version), float(mv.tags.get(VAL_METRIC, "inf")), mv.tags.get(VAL_SET_TAG, "")


def set_champion(dataset: str, version: str) -> None:
    tracking.mlflow_client().set_registered_model_alias(tracking.registered_model_name(dataset), CHAMPION, version)
