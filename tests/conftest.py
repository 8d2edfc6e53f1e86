"""Shared test set-up: real data from ../shared/data, one local Ray for the session, throwaway MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


DATA_HELP = (
    "real MNIST / Fashion-MNIST not found under {path}: set VAEDIST_DATA_DIR to a folder holding mnist/ and "
    "fashion-mnist/ (the official files), or run `make test`, which fetches them into the data cache"
)


def _data_dir() -> Path:
    """$VAEDIST_DATA_DIR, else ../shared/data beside the checkout (CI), else vaedist's own data cache
    (where `make test` fetched the official files on a fresh machine)."""
    if os.environ.get("VAEDIST_DATA_DIR"):
        return Path(os.environ["VAEDIST_DATA_DIR"])
    if (SHARED_DATA / "mnist").is_dir():
        return SHARED_DATA
    from vaedist.data import default_data_dir

    return default_data_dir()


# Every test (and every Ray worker it starts) sees the real data without downloading. Never fails at
# import: the fast tier needs no data, and the tests that need it fail one by one with how to get it.
os.environ.setdefault("VAEDIST_DATA_DIR", str(_data_dir()))


@pytest.fixture(autouse=True)
def _slow_tests_have_real_data(request) -> None:
    """Slow tests train or evaluate on real MNIST: without it each fails at once with how to get it."""
    if request.node.get_closest_marker("slow") is not None:
        request.getfixturevalue("data_dir")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder; a test that needs it fails with how to get it (never silently skipped)."""
    path = _data_dir()
    if not (path / "mnist").is_dir():
        pytest.fail(DATA_HELP.format(path=path), pytrace=False)
    return path


@pytest.fixture
def decoded_cache(tmp_path, monkeypatch) -> Path:
    """A decoded-data cache of the test's own, and no listing or spec remembered from another test (the
    path-dataset tests use it for every test: ``pytestmark = pytest.mark.usefixtures("decoded_cache")``)."""
    from vaedist.data import listed
    from vaedist.data.custom import spec_for

    monkeypatch.setenv("VAEDIST_CACHE_DIR", str(tmp_path / "decoded"))
    spec_for.cache_clear()
    listed.clear()
    yield tmp_path / "decoded"
    spec_for.cache_clear()
    listed.clear()


@pytest.fixture
def cli_in_process(monkeypatch):
    """``vaedist ARGS`` run in this process by click's runner, in ``cwd`` with a sqlite MLflow store there: a
    CompletedProcess (returncode, stdout, stderr). For bad input a command refuses before Ray or MLflow
    start, where a subprocess adds only Python's and the imports' start-up (4-6 s a call on 2 cores). An
    exception the CLI did not turn into its one line is raised here, as a traceback would have been printed."""
    import subprocess

    from click.testing import CliRunner

    from vaedist.cli import main

    def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
        result = CliRunner().invoke(main, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models: threads cost more than they give on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """Ray in this process for one test module: a 2-CPU node like this machine (the actor and worker sizing
    must not deadlock on it); ``address="local"`` never joins a cluster already running here."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def module_store(tmp_path_factory) -> Path:
    """One sqlite MLflow store and one Ray storage folder for a test module (env read at call time); the
    cwd moves there too, since a sqlite store keeps artifacts in ./mlruns."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("VAEDIST_STORAGE_PATH", str(root / "runs"))
        mp.chdir(root)
        yield root


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A throwaway sqlite MLflow store for one test, in its tmp folder (also the working directory)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


@pytest.fixture(scope="session")
def tuned_store(tmp_path_factory):
    """One real smoke search (tune-mnist --preset smoke, plus a crashing trial) shared by the tests that
    need a populated MLflow store: a parent run with child runs, pictures, a registered champion.

    Yields (tracking URI, TuneResult, JobSpec, folder). Ray is shut down again afterwards.
    """
    import ray

    from vaedist.jobs import load_spec, run_spec

    folder = tmp_path_factory.mktemp("tuned")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "VAEDIST_STORAGE_PATH")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["VAEDIST_STORAGE_PATH"] = str(folder / "runs")
    if ray.is_initialized():
        ray.shutdown()
    # The smoke preset, with a grid over conv depth: depth 3 does not fit 28x28 MNIST, so that trial
    # crashes on its config while the search goes on.
    spec = load_spec("tune-mnist", preset="smoke", overrides={"tune": {"num_samples": 1, "search_space": {
        "model.arch": {"choice": ["conv"]}, "model.depth": {"grid": [1, 3]}, "train.epochs": {"choice": [1]}}}})  # fmt: skip
    lines: list[str] = []
    try:
        result = run_spec(spec, echo=lines.append)
        yield uri, result, spec, folder, lines
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
