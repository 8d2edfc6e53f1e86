"""What reaches the terminal: the policy's decisions (fast tier), and a real `vaedist train` run read as a
person would see it (slow: real MNIST, local Ray, MLflow on sqlite), quiet by default and chatty with -v."""

from __future__ import annotations

import io
import logging
import os
import queue
import subprocess
import sys
from pathlib import Path

import pytest

from vaedist import console
from vaedist.console import Progress

METRICS = {"epoch": 1, "train_neg_elbo": 290.456, "val_neg_elbo": 192.53, "val_bits_per_dim": 0.35429,
           "train_images_per_s": 9953.7}  # fmt: skip
# Ray 2.60's Train controller prints this on every run (copied from a real run's output).
PREEMPTION_LINE = (
    "\x1b[36m(TrainController pid=15161)\x1b[0m [2026-12-01 00:10:01,144 E 15161 15193] core_worker.cc:2465: "
    "Actor with class name: 'PreemptionWatcher' and ID: '30c8447126e6fbee0330d30301000000' has constructor "
    "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727"
)
# Lines of Ray's and MLflow's that a default run must not show (issue 15, item 3).
INTERNALS = ("TrainingReport", "Checkpoint successfully created", "Setting up process group",
             "DistributedDataParallel", "PreemptionWatcher", "system metrics", "Moving model to device",
             "Attempting to start training worker group", "Started a local Ray instance",
             "Token authentication is enabled")  # fmt: skip


# ------------------------------------------------------------------------------- decisions (fast)


@pytest.mark.parametrize(
    ("flag", "env", "verbose"),
    [(False, {}, False), (True, {}, True), (False, {"VAEDIST_VERBOSE": "1"}, True),
     (False, {"VAEDIST_VERBOSE": " True "}, True), (False, {"VAEDIST_VERBOSE": "0"}, False),
     (False, {"VAEDIST_VERBOSE": ""}, False), (True, {"VAEDIST_VERBOSE": "0"}, True)],
)  # fmt: skip
def test_verbose_comes_from_the_flag_or_the_environment(flag, env, verbose):
    assert console.verbose_from(flag, env) is verbose


def test_quiet_by_default_and_nothing_turned_down_when_verbose():
    quiet = console.quiet_env(False)
    assert quiet["MLFLOW_LOGGING_LEVEL"] == "WARNING" and quiet["VAEDIST_VERBOSE"] == "0"
    assert quiet["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false" and quiet["RAY_AIR_NEW_OUTPUT"] == "0"
    assert console.quiet_env(True) == {"VAEDIST_VERBOSE": "1"}
    assert (console.ray_logging_level(False), console.ray_logging_level(True)) == (logging.WARNING, logging.INFO)
    assert (console.train_log_level(False), console.train_log_level(True)) == ("WARNING", "INFO")
    assert (console.worker_console_level(False), console.worker_console_level(True)) == (logging.WARNING, logging.INFO)
    assert (console.tune_verbosity(False), console.tune_verbosity(True)) == (0, 1)


def test_the_skip_pattern_drops_only_the_preemption_watcher_line():
    import re

    pattern = re.compile(console.quiet_env(False)["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert pattern.search(PREEMPTION_LINE)
    other = PREEMPTION_LINE.replace("PreemptionWatcher", "MyActor")
    assert not pattern.search(other)
    assert not pattern.search("(RayTrainWorker pid=1) RuntimeError: CUDA out of memory")


def test_the_token_auth_notice_is_dropped_but_its_warning_about_no_auth_is_not(monkeypatch):
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(console.TOKEN_AUTH_LOGGER)
    keep = Keep()
    logger.addHandler(keep)
    try:
        console.drop_token_auth_notice()
        console.drop_token_auth_notice()  # idempotent: one filter
        assert sum(type(f).__name__ == "_DropTokenAuthNotice" for f in logger.filters) == 1
        monkeypatch.setenv("VAEDIST_VERBOSE", "0")
        logger.warning(console.TOKEN_AUTH_ON_NOTICE + ". Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        monkeypatch.setenv("VAEDIST_VERBOSE", "1")
        logger.warning(console.TOKEN_AUTH_ON_NOTICE + " (verbose)")
    finally:
        logger.removeHandler(keep)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access ...",
                    console.TOKEN_AUTH_ON_NOTICE + " (verbose)"]  # fmt: skip


def test_workers_get_the_drivers_policy_and_a_users_own_setting_wins():
    # MLflow's loggers left to propagate: to Ray Train's log file (INFO) and its console handler (WARNING)
    assert console.worker_env({}) == {
        "VAEDIST_VERBOSE": "0", "MLFLOW_CONFIGURE_LOGGING": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }  # fmt: skip
    mine = console.worker_env({"MLFLOW_CONFIGURE_LOGGING": "true", "MLFLOW_LOGGING_LEVEL": "ERROR", "PATH": "/bin"})
    assert mine["MLFLOW_CONFIGURE_LOGGING"] == "true" and mine["MLFLOW_LOGGING_LEVEL"] == "ERROR"
    assert "PATH" not in mine
    assert console.worker_env({"VAEDIST_VERBOSE": "1"}) == {"VAEDIST_VERBOSE": "1"}  # MLflow's and Ray's own


@pytest.mark.parametrize(
    ("isatty", "verbose", "mode"),
    [(True, False, Progress.BARS), (False, False, Progress.LINES), (True, True, Progress.LINES),
     (False, True, Progress.LINES)],
)  # fmt: skip
def test_bars_only_on_a_terminal_and_not_among_verbose_logs(isatty, verbose, mode):
    assert console.progress_mode(isatty, verbose) is mode


def test_result_lines():
    assert console.epoch_line(METRICS, 2) == (
        "epoch 1/2: train -ELBO 290.46, val -ELBO 192.53 nats (0.3543 bits/dim), 9,954 img/s"
    )
    assert console.trial_line("ab_00001", 2, 2, "val_neg_elbo", 158.674, False) == (
        "trial ab_00001: finished after 2/2 epoch(s), val_neg_elbo 158.67"
    )
    assert "stopped early by ASHA after 1/4" in console.trial_line("t", 1, 4, "val_neg_elbo", 170.0, False)
    assert "failed after 0/2" in console.trial_line("t", 0, 2, "val_neg_elbo", None, True)


# ---------------------------------------------------------------------------------- effects (fast)


def test_configured_sets_the_environment_for_the_command_and_leaves_a_users_values(monkeypatch):
    for key in (*console.quiet_env(False), "VAEDIST_VERBOSE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "ERROR")
    with console.configured(False) as verbose:
        assert not verbose and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"  # the user's
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ and os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"

    monkeypatch.setenv("VAEDIST_VERBOSE", "0")
    with console.configured(True) as verbose:  # -v outranks the environment, and reaches workers and jobs
        assert verbose and os.environ["VAEDIST_VERBOSE"] == "1" and "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert os.environ["VAEDIST_VERBOSE"] == "0"


def test_worker_console_quieted_but_its_log_file_keeps_info(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDIST_VERBOSE", "0")
    root = logging.getLogger()
    stream, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "w.log")
    root.addHandler(stream)
    root.addHandler(file)
    try:
        console.quiet_worker_console()
        assert (stream.level, file.level) == (logging.WARNING, logging.NOTSET)
    finally:
        root.removeHandler(stream)
        root.removeHandler(file)
        file.close()


def test_ray_data_console_quieted_but_its_log_file_handler_kept(monkeypatch):
    import ray.data  # noqa: F401  (configures the "ray.data" logger: a session file handler, a console)

    handlers = logging.getLogger("ray.data").handlers
    levels = {h: h.level for h in handlers}
    consoles = [h for h in handlers if type(h).__name__ == "PlainRayHandler"]  # Ray's console handler
    assert consoles and len(consoles) < len(handlers)  # Ray Data's default config, as in the driver
    try:
        monkeypatch.setenv("VAEDIST_VERBOSE", "0")
        console.quiet_ray_data_console()
        assert {h: h.level for h in handlers} == {**levels, **{h: logging.WARNING for h in consoles}}
        monkeypatch.setenv("VAEDIST_VERBOSE", "1")
        console.quiet_ray_data_console()
        assert all(h.level == logging.INFO for h in consoles)
    finally:
        for handler, level in levels.items():
            handler.setLevel(level)


def test_step_reporter_throttles_steps_sends_every_epoch_and_survives_a_closed_channel():
    now = [0.0]
    sent: list[dict] = []
    reporter = console.StepReporter(sent.append, interval_s=0.5, clock=lambda: now[0])
    for step in range(10):
        now[0] = step * 0.1
        reporter.step(1, step, 10)
    reporter.epoch(METRICS)
    assert [e["done"] for e in sent if e["kind"] == "step"] == [0, 5]
    assert sent[-1] == {"kind": "epoch", "metrics": METRICS}

    def closed(event):
        raise ConnectionError("queue actor is gone")

    reporter = console.StepReporter(closed)
    reporter.step(1, 0, 10)  # no exception: training goes on
    reporter.epoch(METRICS)
    console.StepReporter(None).epoch(METRICS)  # ranks other than 0: nothing to send


def test_epoch_display_lines_mode_prints_one_line_per_epoch():
    lines: list[str] = []
    display = console.EpochDisplay(2, lines.append, Progress.LINES)
    for done in (0, 50, 100):
        display.handle({"kind": "step", "epoch": 1, "done": done, "steps": 214})
    display.handle({"kind": "epoch", "metrics": METRICS})
    display.close()
    assert lines == [console.epoch_line(METRICS, 2)]


def test_epoch_display_bars_mode_draws_a_bar_then_the_line():
    out, lines = io.StringIO(), []
    display = console.EpochDisplay(2, lines.append, Progress.BARS, file=out)
    for done in (0, 107, 200):
        display.handle({"kind": "step", "epoch": 1, "done": done, "steps": 214})
    display.handle({"kind": "epoch", "metrics": METRICS})
    display.close()
    assert "epoch 1/2:" in out.getvalue() and "/214 [" in out.getvalue()  # redrawn at tqdm's own pace
    assert lines == [console.epoch_line(METRICS, 2)]


def test_trial_display_a_line_per_trial_and_bars_on_a_terminal():
    lines: list[str] = []
    display = console.TrialDisplay(4, "val_neg_elbo", lines.append, Progress.LINES)
    display.start("a_00000", 2)
    display.start("a_00001", None)  # epochs not searched: the base config's
    display.result("a_00000", 1, 180.0)
    display.result("a_00000", 2, 160.0)
    display.result("a_00002", 1, 170.0)  # resumed from an earlier run: no start seen
    display.end("a_00000", failed=False)
    display.result("a_00001", 1, 190.0)
    display.end("a_00001", failed=False)
    display.end("a_00002", failed=True)
    assert lines == [
        "trial a_00000: finished after 2/2 epoch(s), val_neg_elbo 160.00",
        "trial a_00001: stopped early by ASHA after 1/4 epoch(s), val_neg_elbo 190.00",
        console.trial_line("a_00002", 1, 4, "val_neg_elbo", 170.0, True),
    ]
    out = io.StringIO()
    bars = console.TrialDisplay(4, "val_neg_elbo", lines.append, Progress.BARS, file=out)
    bars.start("b_00000", 2)
    bars.start("b_00001", 2)
    bars.result("b_00000", 1, 180.0)
    bars.end("b_00000", failed=False)
    bars.close()
    assert "trial b_00000" in out.getvalue() and "trial b_00001" in out.getvalue()
    assert lines[-1].startswith("trial b_00000: stopped early")


def test_following_draws_every_event_including_those_left_at_the_end():
    events: queue.Queue = queue.Queue()

    def receive(timeout_s: float):
        try:
            return events.get(timeout=timeout_s) if timeout_s > 0 else events.get_nowait()
        except queue.Empty:
            return None

    lines: list[str] = []
    display = console.EpochDisplay(2, lines.append, Progress.LINES)
    with console.following(receive, display):
        events.put({"kind": "epoch", "metrics": METRICS})
        events.put({"kind": "epoch", "metrics": {**METRICS, "epoch": 2}})
    assert lines == [console.epoch_line(METRICS, 2), console.epoch_line({**METRICS, "epoch": 2}, 2)]


def test_the_cli_and_console_import_nothing_heavy():
    """`vaedist --help` stays instant: neither the CLI nor the console module imports Ray, MLflow, torch
    or tqdm at the top (the commands import what they need)."""
    code = "import sys, vaedist.cli; print(sorted(m for m in ('ray', 'mlflow', 'torch', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "vaedist", "--help"], capture_output=True, text=True, timeout=60)
    assert "-v, --verbose" in help_text.stdout


# ---------------------------------------------------------------------------------- real runs (slow)


def _train(tmp_path, *global_flags: str, epochs: int) -> tuple[int, str]:
    """`vaedist [flags] train` in a fresh process, as a person runs it (not a TTY here): its whole output."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_")) and k != "VAEDIST_VERBOSE"}  # fmt: skip
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "vaedist", *global_flags, "train", "--dataset", "mnist", "--epochs", str(epochs),
            "--workers", "2", "--base-channels", "8", "--latent-dim", "4", "--batch-size", "256",
            "--storage-path", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.run(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)  # fmt: skip
    return proc.returncode, proc.stdout


@pytest.fixture
def no_ray_here():
    """No Ray in this test process while the CLI runs: with two local Ray instances on one machine, Ray
    2.60's PlacementGroupCleaner cannot find its own (a traceback in the output that is not vaedist's)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


_TWO_RAYS = "Found multiple active Ray instances"


@pytest.mark.slow
def test_a_two_epoch_run_shows_vaedist_lines_not_ray_and_mlflow_internals(tmp_path, no_ray_here):
    code, output = _train(tmp_path, epochs=2)
    hint = " (another Ray instance runs on this machine: see no_ray_here)" if _TWO_RAYS in output else ""
    assert code == 0, output[-6000:]
    lines = output.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines{hint}:\n{output}"
    shown = [needle for needle in INTERNALS if needle in output]
    assert not shown, f"{shown}{hint}:\n{output}"
    assert "\r" not in output  # not a terminal: no bars, no carriage-return updates
    assert [line for line in lines if line.startswith("epoch ")] == [
        line for line in lines if line.startswith(("epoch 1/2: train -ELBO", "epoch 2/2: train -ELBO"))
    ] and sum(line.startswith("epoch ") for line in lines) == 2, output
    assert any(line.startswith("Ray: a new local instance") for line in lines), output  # what runs where
    assert any(line.startswith("training mnist-cvae-conv-") and "2 worker(s)" in line for line in lines)
    assert any(line.startswith("done: val -ELBO") for line in lines), output
    # A local instance runs no preemption watcher (cluster.LOCAL_ONLY_ENV): no process of Ray's logs one.
    logs = Path("/tmp/ray/session_latest/logs")
    watchers = [p.name for p in logs.glob("python-core-worker-*.log") if "PreemptionWatcher" in p.read_text()]
    assert not watchers, watchers


@pytest.mark.slow
def test_verbose_shows_ray_and_mlflow_info_lines(tmp_path, no_ray_here):
    code, output = _train(tmp_path, "-v", epochs=1)
    assert code == 0, output[-6000:]
    # Each knob, turned back: the driver's ray logger, ray.train's LoggingConfig, the workers' console
    # handler (TrainingReport), MLflow's level in the driver and in rank 0 (system metrics).
    for needle in ("Started a local Ray instance", "Setting up process group", "TrainingReport",
                   "INFO mlflow.store.db.utils", "system metrics", "Token authentication is enabled"):  # fmt: skip
        assert needle in output, f"{needle!r} missing from:\n{output}"
    assert "epoch 1/1: train -ELBO" in output
