"""What reaches the terminal: vaedist's own lines and progress; Ray's and MLflow's INFO logs only when asked.

By default a person sees what runs where, a progress bar per epoch (``vaedist train``) or per trial (a tune
job), results and errors. Ray's and MLflow's INFO logs still go to Ray's log files (``/tmp/ray/session_*/
logs``); ``vaedist -v`` or ``VAEDIST_VERBOSE=1`` shows them too. Their warnings and errors always show.

The decisions (which knobs, which levels, bars or lines) are plain functions of plain values; the effects
(``configured``: this process's environment; the displays: the terminal) come after them. Ray reads the
knobs through ``cluster.connect_ray`` / ``cluster.worker_env`` and ``train.build_trainer`` / ``tune``.
Nothing heavy is imported at the top: the CLI imports this module, and ``vaedist --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

VERBOSE_ENV = "VAEDIST_VERBOSE"
_TRUE = ("1", "true", "yes", "on")

# Ray 2.60's Train controller logs this C++ error for its own PreemptionWatcher actor on every run
# (ray-project/ray#53727): nothing a user can act on. It has no level of its own to turn down short of
# RAY_BACKEND_LOG_LEVEL, which would drop every C++ error from Ray's log files too; Ray's documented
# RAY_DEDUP_LOGS_SKIP_REGEX drops it on its way to the driver only (ray/_private/ray_constants.py).
PREEMPTION_WATCHER_LINE = r"Actor with class name: 'PreemptionWatcher'.*max_restarts > 0"

# Environment read by Ray workers (maybe on other machines): travels in the runtime env's env_vars.
WORKER_KEYS = (VERBOSE_ENV, "MLFLOW_CONFIGURE_LOGGING", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")

log = logging.getLogger("vaedist.console")


# ------------------------------------------------------------------------------------------ decisions


def verbose_from(flag: bool, environ: Mapping[str, str]) -> bool:
    """``-v`` given, or ``$VAEDIST_VERBOSE`` set to 1/true/yes/on (how it reaches jobs and workers)."""
    return flag or environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def quiet_env(verbose: bool) -> dict[str, str]:
    """The environment that keeps Ray's and MLflow's INFO lines off the terminal (none when verbose)."""
    if verbose:
        return {VERBOSE_ENV: "1"}
    return {
        VERBOSE_ENV: "0",
        # mlflow/environment_variables.py: the level of MLflow's loggers, read when mlflow is imported
        # (system metrics' "Started monitoring...", "Creating initial MLflow database tables...").
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        # mlflow/environment_variables.py: its artifact download bars (a registration downloads the
        # checkpoint back), carriage-return updates that a log file shows as one garbled line.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "RAY_DEDUP_LOGS_SKIP_REGEX": PREEMPTION_WATCHER_LINE,
        # ray/air/constants.py, ray/tune/experimental/output.py: Tune's newer output engine prints its
        # "Configuration for experiment" box and "View detailed results here" even at verbose=0; the
        # classic one, at verbose=0 (tune_verbosity), prints nothing (air/config.py's RunConfig docs).
        "RAY_AIR_NEW_OUTPUT": "0",
        # ray/tune/execution/experiment_state.py: one-worker trials checkpoint every epoch and Tune snapshots
        # its state at each (num_to_keep forces it), then warns that snapshots "may become a bottleneck" (each
        # is a few ms here); 0 turns the warning off.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }


def worker_quiet_env(verbose: bool) -> dict[str, str]:
    """The environment of Ray workers that keeps their INFO lines in Ray's log files, off the terminal."""
    if verbose:
        return {VERBOSE_ENV: "1"}
    return {
        VERBOSE_ENV: "0",
        # mlflow/__init__.py, mlflow/environment_variables.py: MLflow leaves its loggers unconfigured, so
        # they propagate to the worker's root logger. In a Ray Train worker that is Ray Train's log file
        # (every INFO: "Started monitoring system metrics") and the console (WARNING: quiet_worker_console).
        "MLFLOW_CONFIGURE_LOGGING": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What Ray workers get of this process's console policy: its verbosity's, and any of these variables
    set here (by the user, or by ``configured``)."""
    return {**worker_quiet_env(verbose_from(False, environ)), **{k: environ[k] for k in WORKER_KEYS if k in environ}}


def ray_logging_level(verbose: bool) -> int:
    """``ray.init(logging_level=...)``: the driver's ``ray`` logger ("Started a local Ray instance", Tune's
    "Wrote the latest version of all result files")."""
    return logging.INFO if verbose else logging.WARNING


def train_log_level(verbose: bool) -> str:
    """``ray.train.LoggingConfig(log_level=...)`` (ray/train/v2/api/config.py): the console level of the
    ``ray.train`` loggers in the Train controller and workers ("Reporting training result", "Checkpoint
    successfully created", "Setting up process group", ...). Ray's Train log files keep every level."""
    return "INFO" if verbose else "WARNING"


def train_logging_config():
    """The ``ray.train.LoggingConfig`` of every TorchTrainer vaedist builds: :func:`train_log_level` for
    this process's verbosity (``-v``)."""
    import ray.train

    return ray.train.LoggingConfig(log_level=train_log_level(is_verbose()))


def worker_console_level(verbose: bool) -> int:
    """The level of a Ray Train worker's console handler (stderr, which Ray forwards to the driver).

    Ray Train sends the worker's root logger to it at INFO, and Ray 2.60 logs "Reporting training result
    ... TrainingReport(...)" on a logger named by its file path (ray/train/v2/_internal/execution/
    context.py:54, ``logging.getLogger(__file__)``), outside the ``ray.train`` loggers that LoggingConfig
    governs. The handler's level, not the logger's: Ray Train's log file of the worker keeps every INFO.
    """
    return logging.INFO if verbose else logging.WARNING


def tune_verbosity(verbose: bool) -> int:
    """``ray.tune.RunConfig(verbose=...)``: 0 silences Tune's status tables (vaedist draws its own)."""
    return 1 if verbose else 0


class Progress(enum.Enum):
    BARS = "bars"  # tqdm bars, redrawn in place: a terminal
    LINES = "lines"  # a line per epoch or trial: a file, a pipe, `ray job submit`, CI logs


def progress_mode(isatty: bool, verbose: bool) -> Progress:
    """Bars only on a terminal, and not under -v, where Ray's lines would break them up."""
    return Progress.BARS if isatty and not verbose else Progress.LINES


def epoch_line(metrics: Mapping[str, float], epochs: int) -> str:
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}: train -ELBO {metrics['train_neg_elbo']:.2f}, "
        f"val -ELBO {metrics['val_neg_elbo']:.2f} nats ({metrics['val_bits_per_dim']:.4f} bits/dim), "
        f"{metrics['train_images_per_s']:,.0f} img/s"
    )


def trial_line(trial: str, epochs_run: int, epochs: int, metric: str, value: float | None, failed: bool) -> str:
    done = f"{epochs_run}/{epochs} epoch(s)"
    if failed:
        return f"trial {trial}: failed after {done} (its error is above; details in its MLflow run)"
    how = "finished" if epochs_run >= epochs else "stopped early by ASHA"
    shown = "-" if value is None else f"{value:.2f}"
    return f"trial {trial}: {how} after {done}, {metric} {shown}"


# -------------------------------------------------------------------------------------------- effects


def is_verbose() -> bool:
    """This process's setting (workers get it through ``worker_env``)."""
    return verbose_from(False, os.environ)


@contextlib.contextmanager
def configured(flag: bool) -> Iterator[bool]:
    """Set this process's environment by the policy for the command's duration; yields verbose.

    Set before Ray and MLflow are imported (the CLI group does it first), as both read these at import.
    A variable the user set already is left alone: theirs is the one they meant.
    """
    verbose = verbose_from(flag, os.environ)
    changes = {key: value for key, value in quiet_env(verbose).items() if key not in os.environ}
    if flag:
        changes[VERBOSE_ENV] = "1"  # -v on the command line outranks VAEDIST_VERBOSE=0 in the environment
    # for a command run in-process (click's CliRunner): the next one starts from the same place
    with environment(changes):
        yield verbose


@contextlib.contextmanager
def environment(changes: Mapping[str, str]) -> Iterator[None]:
    """``changes`` set in this process's environment for the block (and in processes started inside
    it), then each variable put back as it was, unset where it was unset."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Ray's notice on starting a local instance with token auth on (its default since 2.5x): a WARNING on
# every `ray.init()`, though nothing is wrong and nothing needs doing. Its opposite, "Token authentication
# is disabled ... Anyone with network access ..." is a real warning and still reaches the terminal.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_verbose() or not record.getMessage().startswith(TOKEN_AUTH_ON_NOTICE)


def drop_token_auth_notice() -> None:
    """Keep Ray's token-auth-on notice off the terminal unless verbose (idempotent)."""
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


def _quiet_console_handlers(logger: logging.Logger) -> None:
    """The console handlers of ``logger`` at ``worker_console_level`` (file handlers keep their level)."""
    level = worker_console_level(is_verbose())
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def quiet_worker_console() -> None:
    """In a Ray Train worker, once Ray Train has set up its logging: the root logger's console handlers."""
    _quiet_console_handlers(logging.getLogger())


def quiet_ray_data_console() -> None:
    """In the process that runs a Ray Data pipeline (the driver of ``vaedist generate``), once ``ray.data``
    is imported: its console handler, which prints every pipeline's "Dataset ... execution finished in
    N seconds" at INFO (ray/data/_internal/logging.py); Ray's ray-data.log keeps every level."""
    _quiet_console_handlers(logging.getLogger("ray.data"))


def quiet_trial_console() -> None:
    """In a Tune trial that trains in its own process (``places.TunePlace``): also Ray Train's and Tune's
    own loggers at ``worker_console_level``; the trial reports a checkpoint every epoch and each report
    logs "Checkpoint successfully created at: ..." at INFO on the "ray" logger's console handler."""
    quiet_worker_console()
    level = worker_console_level(is_verbose())
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)


class StepReporter:
    """Rank 0's side of the progress channel: throttled step counts, every epoch's metrics.

    ``send`` puts one event (a dict) where the driver reads it; None sends nothing. A display must never
    stop training, so a failed send only turns the reporter off.
    """

    def __init__(self, send: Callable[[dict], Any] | None, interval_s: float = 0.5, clock=time.monotonic):
        self._send, self._interval_s, self._clock = send, interval_s, clock
        self._last = -float("inf")

    def step(self, epoch: int, done: int, steps: int) -> None:
        now = self._clock()
        if now - self._last >= self._interval_s:
            self._last = now
            self._put({"kind": "step", "epoch": epoch, "done": done, "steps": steps})

    def epoch(self, metrics: Mapping[str, float]) -> None:
        self._put({"kind": "epoch", "metrics": dict(metrics)})

    def _put(self, event: dict) -> None:
        if self._send is None:
            return
        try:
            self._send(event)
        except Exception as exc:  # the driver is gone or its queue closed: train on, show nothing
            log.debug("progress channel closed: %s", exc)
            self._send = None


def _bar(**kwargs):
    from tqdm.auto import tqdm  # imported here: tqdm is not needed for --help or in lines mode

    return tqdm(dynamic_ncols=True, leave=False, **kwargs)


class EpochDisplay:
    """The driver's view of one training run: a bar per epoch on a terminal, then the epoch's line."""

    def __init__(self, epochs: int, echo: Callable[[str], Any], mode: Progress, file=None):
        self.epochs, self.echo, self.mode, self.file = epochs, echo, mode, file
        self._bar = None
        self._epoch = 0

    def handle(self, event: Mapping[str, Any]) -> None:
        if event["kind"] == "epoch":
            self._close_bar()
            self.echo(epoch_line(event["metrics"], self.epochs))
        elif event["kind"] == "step" and self.mode is Progress.BARS:
            if event["epoch"] != self._epoch:
                self._close_bar()
                self._epoch = event["epoch"]
                desc = f"epoch {self._epoch}/{self.epochs}"
                self._bar = _bar(total=event["steps"], desc=desc, unit="step", file=self.file)
            self._bar.update(event["done"] - self._bar.n)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TrialDisplay:
    """The driver's view of a search: a bar per running trial (epochs) on a terminal, a line per trial."""

    def __init__(self, epochs: int, metric: str, echo: Callable[[str], Any], mode: Progress, file=None):
        self.epochs, self.metric, self.echo, self.mode, self.file = epochs, metric, echo, mode, file
        self._trials: dict[str, dict[str, Any]] = {}

    def start(self, trial: str, epochs: int | None) -> None:
        state = {"epochs": int(epochs or self.epochs), "done": 0, "value": None, "bar": None}
        if self.mode is Progress.BARS:
            state["bar"] = _bar(total=state["epochs"], desc=f"trial {trial}", unit="epoch", file=self.file)
        self._trials[trial] = state

    def result(self, trial: str, epoch: int, value: float | None) -> None:
        state = self._trials.get(trial)
        if state is None:  # a trial resumed from an earlier run of the search: no start seen here
            self.start(trial, None)
            state = self._trials[trial]
        state["done"], state["value"] = epoch, value
        if state["bar"] is not None:
            state["bar"].update(epoch - state["bar"].n)

    def end(self, trial: str, failed: bool) -> None:
        state = self._trials.pop(trial, None) or {"epochs": self.epochs, "done": 0, "value": None, "bar": None}
        if state["bar"] is not None:
            state["bar"].close()
        line = trial_line(trial, state["done"], state["epochs"], self.metric, state["value"], failed)
        self._write(line)

    def close(self) -> None:
        for state in self._trials.values():
            if state["bar"] is not None:
                state["bar"].close()
        self._trials.clear()

    def _write(self, line: str) -> None:
        if self.mode is Progress.BARS and self._trials:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=self.file):  # other trials' bars step aside for the line
                self.echo(line)
        else:
            self.echo(line)


@contextlib.contextmanager
def following(receive: Callable[[float], Mapping[str, Any] | None], display: EpochDisplay) -> Iterator[None]:
    """Draw events from ``receive(timeout_s)`` (None when none came) on a side thread while the body runs.

    On exit the events still waiting are drawn too (rank 0 sends its last epoch before ``fit`` returns).
    """
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                event = receive(0.5)
                if event is not None:
                    display.handle(event)
            while (event := receive(0)) is not None:
                display.handle(event)
        except Exception as exc:  # a display must never stop training
            log.debug("progress display stopped: %s", exc)

    thread = threading.Thread(target=run, name="vaedist-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        display.close()


def stderr_isatty() -> bool:
    """tqdm draws on stderr: bars when that is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed by a host program
        return False
