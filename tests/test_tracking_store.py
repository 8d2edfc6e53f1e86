"""Opening the MLflow store on a side thread while Ray starts (tracking.open_store_in_background), on real
sqlite stores: an existing store is opened there and used, the caller's own calls wait for it, its errors
reach the caller where the command handles them, and a store that does not exist yet is not made there."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from vaedist import tracking

THREAD = "vaedist-mlflow-store"


def _store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store this process has not opened, as an earlier command leaves it: made here under another file
    name, then moved to the one the test opens (MLflow keeps a store per URI, so this URI is new here;
    a subprocess making it would only add Python's and MLflow's import to the test)."""
    import mlflow

    made, path = tmp_path / "made.db", tmp_path / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{made}").search_experiments()
    made.rename(path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield path
    for t in _store_threads():
        t.join(timeout=60)


def test_an_existing_store_is_opened_on_the_side_thread_and_the_next_call_waits_for_it(store):
    tracking.open_store_in_background()
    assert _store_threads(), "a sqlite store is opened on a thread of its own"
    run_id = tracking.find_or_create_run("mnist", "side-store", {"a": 1}, kind="train")
    assert tracking._store_opened.is_set()  # the caller's call waited for the side thread
    db = sqlite3.connect(store)
    assert db.execute("select count(*) from runs where run_uuid = ?", (run_id,)).fetchone() == (1,)
    # The same name again is the same run: the store the side thread opened is the one in use.
    assert tracking.find_or_create_run("mnist", "side-store", {"a": 1}, kind="train") == run_id


def test_a_store_that_does_not_exist_yet_is_not_made_on_the_side(tmp_path, monkeypatch):
    """A command refused after Ray starts (a GPU the cluster lacks) must leave no mlflow.db behind."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.open_store_in_background()
    assert not _store_threads()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_store_that_cannot_be_opened_fails_in_the_callers_own_call(tmp_path, monkeypatch):
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"not a database, but a file of that name" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    before = tracking._store_opened
    tracking.open_store_in_background()  # the side thread's failure is not raised here...
    # A side thread was started (the event callers wait on is its own; it may already have ended: a file
    # that is no database fails at once).
    assert tracking._store_opened is not before
    for t in _store_threads():
        t.join(timeout=60)
    with pytest.raises(Exception, match="file is not a database"):
        tracking.find_or_create_run("mnist", "nowhere", {"a": 1})  # ...but by the call that needs the store


def test_a_tracking_server_is_not_opened_on_a_side_thread(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: nothing may call it
    tracking.open_store_in_background()
    assert not _store_threads()
    assert tracking._store_opened.is_set()
