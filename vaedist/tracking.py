"""vaedist's MLflow code: the store (its URI, opening it), experiments, runs, params, metrics, pictures,
dataset inputs, and finding a model's checkpoint by URI. Logging and registering a model and the
``champion`` alias are :mod:`vaedist.model_registry`'s, built on this module's connection
(:func:`mlflow_client`). MLflow is imported by these two and the served model's modules only.
Conventions (docs/ARCHITECTURE.md):
- tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``, made absolute so Ray workers,
  whose working directory differs from the driver's, write to the same store;
- one experiment per dataset, ``vaedist/<dataset>``; models registered as ``vaedist-<dataset>``;
- the alias ``champion`` moves only to a version that beats the current champion on validation -ELBO.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vaedist.errors import UsageError, VaedistError, first_line, redact_url
from vaedist.names import CHECKPOINT_FILE, KIND_TAG, NAME_TAG


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded default, with a relative sqlite path made absolute.

    ``sqlite:///mlflow.db`` names a file relative to the working directory, and a Ray worker's working
    directory is not the driver's: left relative, rank 0 would log into a store of its own.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, _, query = uri[len("sqlite:///") :].partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).expanduser().resolve()}" + (f"?{query}" if query else "")
    return uri


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as the console and logs show it: a password in it is masked."""
    return redact_url(uri or tracking_uri())


def experiment_name(dataset: str) -> str:
    """vaedist/<name>: a built-in dataset's name, or a path dataset's (``name=`` option, else its stem)."""
    from vaedist.data.sources import display_name

    return f"vaedist/{display_name(dataset)}"


def registered_model_name(dataset: str) -> str:
    from vaedist.data.sources import display_name

    return f"vaedist-{display_name(dataset)}"


def mlflow_module():
    import mlflow

    _store_opened.wait()  # a store being opened on the side thread is opened once, there
    return mlflow


# SQLAlchemy stores (mlflow/store/db/db_types.py): what opening costs time
DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")
# Set while no store is being opened in the background (open_store_in_background).
_store_opened = threading.Event()
_store_opened.set()


def open_store_in_background() -> None:
    """Import MLflow here, then open a database tracking store on a side thread while this one starts Ray
    (``cluster.connect_ray`` calls it just before ``ray.init``).

    Opening a database store (SQLAlchemy, the schema check, the tables of a new database) takes 1.2-1.9 s
    on 2 CPUs, and ``ray.init`` 4-7 s, mostly waiting for its own processes: a command that starts Ray
    and then records a run saves up to the shorter of the two (0.9 s on average for ``vaedist generate``
    here, where Ray's processes want the same CPUs; docs/benchmarks.md). Every other MLflow call waits (in ``mlflow_module``)
    until the store is open, so MLflow never builds one store twice at once; an error is left for that
    call to raise, where the command handles it. The thread is not a daemon: a command that fails while
    it runs exits once the store is whole. A sqlite file that does not exist yet is left to the command's
    own first call: a command refused after Ray starts (a GPU the cluster lacks) writes nothing. A
    tracking server (http) is left alone: its client opens nothing, and a server that stops answering
    would hold the exit.

    MLflow is imported first, on this thread: ``mlflow/__init__`` reads MLFLOW_CONFIGURE_LOGGING, and
    ``connect_ray`` sets the workers' value in this process's environment while ``ray.init`` runs
    (nothing that opening a store reads changes there: the URI is passed, and is the workers' too).
    """
    global _store_opened
    mlflow = mlflow_module()
    uri = tracking_uri()
    if not uri.startswith(DATABASE_SCHEMES) or (uri.startswith("sqlite:///") and not _sqlite_file(uri).exists()):
        return
    opened = threading.Event()

    def open_store() -> None:
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the caller's own first call raises it again, where it is handled
            pass
        finally:
            opened.set()

    _store_opened = opened
    threading.Thread(target=open_store, name="vaedist-mlflow-store").start()


def _sqlite_file(uri: str) -> Path:
    """The file of a ``sqlite:///`` URI (``tracking_uri`` makes it absolute)."""
    return Path(uri[len("sqlite:///") :].partition("?")[0])


def check_tracking(uri: str) -> None:
    """Fail before any training if the tracking store cannot be written to or reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise VaedistError(
                f"MLflow tracking server {shown_uri(uri)} is not reachable ({reason}); start it, or unset "
                "MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = _sqlite_file(uri)
        parent = path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"cannot write the MLflow store {path}: {parent} is not a writable folder")
        if path.exists():
            try:
                sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select 1").close()
            except sqlite3.DatabaseError as exc:
                raise UsageError(f"{path} is not a usable MLflow sqlite store ({exc})") from None


def checked_tracking_uri() -> str:
    """The tracking URI (:func:`tracking_uri`), after :func:`check_tracking`: what a command calls before
    any work, so an unreachable or unwritable store fails it at once."""
    uri = tracking_uri()
    check_tracking(uri)
    return uri


def mlflow_client():
    return mlflow_module().MlflowClient(tracking_uri())


# The MLflow UI opens an experiment by its kind; without this tag MLflow 3 shows the GenAI overview
# ("Traces 0") instead of the training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(name: str) -> str:
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow.create_experiment(name, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            exp = mlflow.get_experiment_by_name(name)  # another process (a parallel trial) created it first
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:  # an experiment from an older vaedist
            mlflow_client().set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def log_dataset(run_id: str, name: str, digest: str, source: str, context: str) -> None:
    """Record the data a run used (or made) as an MLflow dataset input: the runs table's Dataset column,
    dataset filters and lineage. ``digest`` is vaedist's fingerprint of the data, ``context`` e.g. "train",
    "validation", "test", "generated"."""
    mlflow = mlflow_module()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (all local files)
        warnings.simplefilter("ignore", UserWarning)
        resolved = resolve_dataset_source(source)
    dataset = MetaDataset(resolved, name=name, digest=digest[:36])
    tag = InputTag(key=mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, value=context)
    mlflow_client().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])


def find_or_create_run(
    dataset: str,
    name: str,
    params: dict[str, Any],
    kind: str = "train",
    parent_run_id: str | None = None,
) -> str:
    """The run tagged with ``name`` in the dataset's experiment, created (with params) if absent.

    A rerun with the same name gets the same run, so resumed training continues its metric curves.
    A rerun with a different config is refused: MLflow params are immutable, and mixing two configs
    in one run would make its curves meaningless.
    """
    mlflow = mlflow_module()
    exp_id = _experiment_id(experiment_name(dataset))
    client = mlflow_client()
    found = client.search_runs([exp_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'", max_results=1)
    str_params = {k: str(v) for k, v in params.items()}
    if found:
        run = found[0]
        check_same_params(run, params, name)
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    tags = {NAME_TAG: name, KIND_TAG: kind}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=tags)
    # MLflow accepts at most 100 params per batch call.
    items = [mlflow.entities.Param(k, v) for k, v in str_params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def find_run(dataset: str, name: str) -> str | None:
    """The id of the run tagged with ``name`` in the dataset's experiment, or None."""
    exp = mlflow_client().get_experiment_by_name(experiment_name(dataset))
    if exp is None:
        return None
    found = mlflow_client().search_runs([exp.experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'", max_results=1)
    return found[0].info.run_id if found else None


def finished_run(dataset: str, name: str) -> Any | None:
    """The FINISHED run named ``name`` (with its tags and metrics), or None: lets a rerun skip done work."""
    run_id = find_run(dataset, name)
    if run_id is None:
        return None
    run = mlflow_client().get_run(run_id)
    return run if run.info.status == "FINISHED" else None


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = mlflow_client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def check_same_params(run: Any, params: dict[str, Any], name: str) -> None:
    """Refuse to reuse a run whose recorded params differ from ``params``.

    Where it runs (``resources.*``: workers, CPUs, GPUs) is no part of what a run is: a checkpoint resumes
    on another layout, and the run keeps the params it was created with.
    """
    str_params = {k: str(v) for k, v in params.items()}
    old = run.data.params
    changed = sorted(
        k for k, v in str_params.items() if k in old and old[k] != v and not k.startswith("resources.")
    )
    if changed:
        k = changed[0]
        raise UsageError(
            f"a run named {name!r} already exists with {k}={old[k]} (now {str_params[k]}); "
            "use a new --name to start a fresh run, or the same config to resume"
        )


def load_dict(run_id: str, artifact_file: str) -> dict[str, Any] | None:
    """A JSON artifact of ``run_id`` (as ``RunLogger.log_dict`` wrote it), or None if it has none."""
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return None


def finished_result(dataset: str, name: str, artifact_file: str) -> tuple[str, dict[str, Any]] | None:
    """(run id, result) of the FINISHED run named ``name`` that kept its result as ``artifact_file``, or
    None: an evaluation rerun with the same inputs reuses it instead of measuring again."""
    done = finished_run(dataset, name)
    result = load_dict(done.info.run_id, artifact_file) if done is not None else None
    return None if result is None else (done.info.run_id, result)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow_client().set_terminated(run_id, status=status)


class RunLogger:
    """What rank 0 writes during training: metrics by step, pictures by key and step."""

    def __init__(self, run_id: str, uri: str):
        self.run_id = run_id
        self.client = mlflow_module().MlflowClient(uri)
        mlflow_module().set_tracking_uri(uri)
        self._system = None

    def start_system_metrics(self) -> None:
        """CPU/memory/GPU samples into the run, where MLflow's monitor can run (needs psutil)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._system.start()
        except Exception:  # system metrics are a nicety: never fail training over them
            self._system = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [mlflow_module().entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB uint8 (H, W, 3) picture, shown in the run's Artifacts tab with a step slider."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)


    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def close(self) -> None:
        if self._system is not None:
            with contextlib.suppress(Exception):
                self._system.finish()


class NullLogger:
    """Ranks other than 0 log nothing (the rank-0 switch is the place's rank, vaedist.worker)."""

    def start_system_metrics(self) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass


    def close(self) -> None:
        pass


def resolve_checkpoint(uri: str) -> Path:
    """A local path to the vaedist checkpoint behind ``uri``.

    Accepts ``models:/name@alias`` or ``models:/name/version``, ``runs:/<run_id>/model``, or a local
    checkpoint file / folder holding ``model.pt``.
    """
    local = Path(uri).expanduser()
    if local.is_file():
        return local
    if local.is_dir() and (local / CHECKPOINT_FILE).is_file():
        return local / CHECKPOINT_FILE
    if not uri.startswith(("models:/", "runs:/")):
        raise UsageError(
            f"model {uri!r} is neither a checkpoint file nor an MLflow URI "
            "(use models:/vaedist-mnist@champion, runs:/<run_id>/model or a path to model.pt)"
        )
    store = tracking_uri()
    check_tracking(store)  # an unreachable server: one line now, not after MLflow's retries
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :].partition("?")[0]).is_file():
        # Looking it up would create an empty store here as a side effect.
        raise UsageError(
            f"model {uri!r} does not resolve: there is no MLflow store at {store}; set MLFLOW_TRACKING_URI "
            "to the store that registered it (or run where its mlflow.db is)"
        )
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(store)
    # The caller reads the checkpoint in this process; the download goes when the process ends.
    download_dir = tempfile.mkdtemp(prefix="vaedist-model-")
    atexit.register(shutil.rmtree, download_dir, ignore_errors=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=download_dir))
    except mlflow.exceptions.MlflowException as exc:
        first = first_line(exc)
        raise UsageError(f"model {uri!r} does not resolve in {shown_uri(store)}: {first}") from None
    found = sorted(path.rglob(CHECKPOINT_FILE))
    if not found:
        raise UsageError(f"model {uri!r} has no vaedist checkpoint ({CHECKPOINT_FILE}); was it logged by vaedist?")
    return found[0]


def model_version_info(uri: str) -> dict[str, str]:
    """Name, version and run id of a ``models:/`` URI (empty dict for other URIs)."""
    if not uri.startswith("models:/"):
        return {}
    client = mlflow_client()
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = ref.split("/", 1)
        mv = client.get_model_version(name, version)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id or ""}


# --- evaluation runs


def model_run_id(uri: str) -> str | None:
    """The MLflow run that logged the model behind ``uri``, or None (a checkpoint path, or a model the
    tracking store does not know): evaluation logs its numbers on that run when there is one."""
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        return run_id or None
    if not uri.startswith("models:/"):
        return None
    mlflow = mlflow_module()
    try:
        return model_version_info(uri).get("run_id") or None
    except (mlflow.exceptions.MlflowException, ValueError):
        return None
