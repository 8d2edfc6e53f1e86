"""The benchmarks run: each prints the machine line first and its goal lines ``<figure>: <value> (goal <op>
<target>)``; ``gpu_check.py`` runs where neither Ray nor MLflow is installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

BENCHMARKS = REPO / "benchmarks"
GOAL_LINE = re.compile(r"^[a-z0-9_]+: \S+ \(goal (>=|<=|>|==) [0-9.e+-]+[;)]", re.MULTILINE)

# Runs Python with ``import ray`` and ``import mlflow`` failing, as on a machine where neither is installed.
WITHOUT_RAY_AND_MLFLOW = """
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, Absent())
"""

# Runs each benchmark's real main() up to the first thing this harness withholds (Ray, MLflow, a data
# folder): {script: (what it printed, its exit code or the error that stopped it)}. One process for all:
# torch is imported once.
EARLY_RUNS = WITHOUT_RAY_AND_MLFLOW + """
import contextlib, io, json, runpy
runs = {}
for script, argv in json.loads(sys.argv[1]).items():
    sys.argv = [script, *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
            end = "returned"
        except SystemExit as exc:
            end = f"exit {exc.code}"
        except Exception as exc:
            end = f"{type(exc).__name__}: {exc}"
    runs[script] = (out.getvalue(), end)
print(json.dumps(runs))
"""

# The arguments that stop each script at its first dependency on Ray, MLflow or data (all absent here).
STOP_EARLY = {
    "audit_throughput.py": ["--n", "0", "--skip-pass1"],
    "classifier_startup.py": [],
    "data_loading.py": ["--folder", "/nonexistent"],
    "generate_throughput.py": [],
    "gpu_check.py": [],  # no CUDA here: the machine line, then exit 2
    "stream_throughput.py": ["--folder", "/nonexistent", "--epochs", "2"],
    "train_throughput.py": ["--dataset", "/nonexistent", "--epochs", "2"],
    "tune_overhead.py": [],
}


def env(tmp_path: Path, data: Path | None) -> dict[str, str]:
    """The environment of a benchmark run: its temp files (work folders, caches) and MLflow store in
    ``tmp_path``, its data folder (an empty one unless ``data``), no GPU even where there is one. Ray's own
    temp folder stays where it was (its socket paths must stay under 108 characters)."""
    if data is None:
        data = tmp_path / "no-data"
        data.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO), "VAEDIST_DATA_DIR": str(data), "TMPDIR": str(tmp_path),
            "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "CUDA_VISIBLE_DEVICES": "",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip


def run(args: list[str], tmp_path: Path, timeout: float, data: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env(tmp_path, data), timeout=timeout)  # fmt: skip


def test_every_benchmark_is_listed_here():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(STOP_EARLY)


@pytest.fixture(scope="module")
def early_runs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Every benchmark run until Ray, MLflow or data is needed: {name: (stdout, how it ended)}."""
    tmp_path = tmp_path_factory.mktemp("early")
    argv = {str(BENCHMARKS / name): args for name, args in STOP_EARLY.items()}
    proc = run(["-c", EARLY_RUNS, json.dumps(argv)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {Path(k).name: tuple(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("name", sorted(STOP_EARLY))
def test_every_benchmark_prints_the_machine_line_first(early_runs, name):
    stdout, end = early_runs[name]
    first = (stdout.splitlines() or [""])[0]
    assert first.startswith("machine: cpu "), f"{name} printed first {first!r}, then ended: {end}"
    assert all(f" {key} " in first for key in ("cpu_capability", "cores", "gpu", "torch", "ray")), first


def test_data_loading_prints_its_goal_lines(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(6):
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "images" / split / name / f"{i}.png")
    proc = run([str(BENCHMARKS / "data_loading.py"), "--folder", str(tmp_path / "images")], tmp_path, 120)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a goal missed (no timing is judged here)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: "), lines[:2]
    assert "images: 24" in lines
    figures = [m.group(0).split(":")[0] for m in GOAL_LINE.finditer(proc.stdout)]
    assert figures == ["first_load_ratio", "cached_load_ratio"], proc.stdout


def goal_figures(stdout: str) -> dict[str, str]:
    """{figure: the rest of its goal line}."""
    return {m.group(0).split(":")[0]: line for m in GOAL_LINE.finditer(stdout)
            for line in [stdout[m.start():].splitlines()[0]]}  # fmt: skip


@pytest.mark.slow
def test_gpu_check_on_cpu_passes_without_ray_or_mlflow(tmp_path):
    """The whole check on CPU (gloo, a world of 2), with Ray and MLflow unimportable; ~50 s on 2 cores."""
    script = WITHOUT_RAY_AND_MLFLOW + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = run(["-c", script, str(BENCHMARKS / "gpu_check.py"), "--cpu", "--size", "1000"], tmp_path, 300)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: "), proc.stdout[:500] + proc.stderr[-3000:]
    figures = goal_figures(proc.stdout)
    assert {"families_finite_in_fp32_and_bf16", "bf16_vs_fp32_loss_max_rel_diff", "decoder_fp32_images_per_s",
            "vaedist_loop_vs_plain", "ddp_ranks_finished_finite", "ddp_weights_max_diff_across_ranks",
            "neighbours_features_index_agreement", "neighbours_pixels_index_agreement"} <= set(figures)  # fmt: skip
    assert "families_finite_in_fp32_and_bf16: 11 (goal == 11" in proc.stdout
    assert "ddp_ranks_finished_finite: 2 (goal == 2; gloo, world of 2)" in proc.stdout
    # Every correctness check passes; only a timing goal may miss on a machine other agents share.
    failed = [row.split()[2] for row in lines if row.endswith("FAIL")]
    assert failed == [], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == (0 if lines[-1] == "every check passed" else 1), lines[-1]


def test_gpu_check_imports_neither_ray_nor_mlflow_and_says_how_to_run_without_cuda(early_runs):
    stdout, end = early_runs["gpu_check.py"]  # run with Ray and MLflow unimportable
    assert end == "exit 2", (end, stdout)
    last = stdout.splitlines()[-1]
    assert last.startswith("no CUDA device here: ") and "--cpu" in last, stdout


@pytest.mark.slow
def test_generate_throughput_prints_the_raw_goal_beside_ray_datas_floor(tmp_path, data_dir):
    """The benchmark end to end at a smoke size (real MNIST for its brief training, a local Ray)."""
    args = ["--n", "2000", "--png-n", "1000", "--shard-rows", "500", "--train-steps", "5", "--workdir", str(tmp_path)]
    proc = run([str(BENCHMARKS / "generate_throughput.py"), *args], tmp_path, 600, data=data_dir)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a goal missed at 2,000
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: "), lines[:2]
    figures = goal_figures(proc.stdout)
    assert {"end_to_end_ratio", "png_end_to_end_ratio", "decoder_busy_fraction"} <= set(figures), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    assert "at 2,000,000 images, this run 2,000" in figures["end_to_end_ratio"]
    floor = next(i for i, line in enumerate(lines) if line.startswith("ray_data_floor_s: "))
    assert lines[floor + 1].startswith("end_to_end_ratio: "), lines[floor : floor + 2]
    assert float(lines[floor].split()[1]) > 0  # measured in this run, not NaN
    assert "1,000 images" in next(line for line in lines if line.startswith("png_images_per_s: "))


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "figures"), [
    ("stream_throughput.py", ["--per-class", "20", "--epochs", "2", "--batch-size", "32"],
     ["in_memory_images_per_s", "streaming_images_per_s", "streaming_vs_in_memory"]),
    ("classifier_startup.py", ["--images", "256", "--rounds", "1"],
     ["one_worker_task_s", "one_worker_ray_train_s", "one_worker_task_vs_ray_train"]),
])  # fmt: skip
def test_a_ray_benchmark_at_a_smoke_size_prints_its_goal_lines(script, args, figures, tmp_path, data_dir):
    """The benchmarks that need Ray and real data (CIFAR-10 JPEGs, MNIST), end to end at a tiny size."""
    if script == "stream_throughput.py":
        args = ["--folder", str(data_dir / "cifar10-jpeg" / "train"), *args]
    proc = run([str(BENCHMARKS / script), *args], tmp_path, 600, data=data_dir)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a goal missed
    assert proc.stdout.splitlines()[0].startswith("machine: "), proc.stdout[:500]
    assert list(goal_figures(proc.stdout)) == figures, proc.stdout[-3000:]


@pytest.mark.slow
def test_the_audit_benchmark_times_both_pass1_kernels(tmp_path):
    """``--pass1-only``: the machine line, the kernel chosen here, both kernels timed at D = 64 and 784."""
    from vaedist.evaluate import neighbours

    proc = run([str(BENCHMARKS / "audit_throughput.py"), "--pass1-only"], tmp_path, 300)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: the goal missed
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and lines[1] == f"pass 1 kernel chosen here: {neighbours.choose_kernel().name}"
    assert list(goal_figures(proc.stdout)) == ["pass1_chosen_vs_fastest_d64", "pass1_chosen_vs_fastest_d784"]
