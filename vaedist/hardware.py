"""What machine this is, and which fast paths it has: the CPU's model, flags and torch capability, the GPUs,
the library versions. Every hardware-dependent choice in vaedist (a kernel, a dtype) asks here, never
assumes; every benchmark prints :func:`machine_line` first, so a figure always names the machine that made it.

Bottom layer: imports nothing of vaedist (torch only, and Ray / MLflow versions read from package metadata,
never imported).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo spells them) of a native bfloat16 matrix multiply: Intel AMX tiles (Sapphire
# Rapids on), AVX-512 BF16 (Cooper Lake, AMD Zen 4 on), ARMv8.6 BF16 (BFMMLA: Graviton 3 on). Without one,
# torch's bf16 matmul converts to float32 and back around every block: 5-7x slower than float32 on an AVX2
# AMD EPYC (docs/benchmarks.md, "Pass 1 kernels").
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on ARM); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C"), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_cpu_capability() -> str:
    """The widest vector ISA torch's CPU kernels dispatch to here: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16_matmul(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) multiplies bfloat16 matrices natively (see NATIVE_BF16_FLAGS)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def cuda_fast_matmul(device: torch.device) -> bool:
    """Whether a CUDA device has tensor cores for TF32 / bf16 matmuls (compute capability 8.0, Ampere, on)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def cores() -> int:
    """The cores this process may run on (its affinity mask: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def gpu_names() -> list[str]:
    """The CUDA devices' names, one per device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_facts() -> dict[str, str]:
    """The facts a figure needs beside it, as strings (what :func:`machine_line` prints; the audit records them)."""
    gpus = gpu_names()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch_cpu_capability(),
        "native_bf16_matmul": "yes" if native_bf16_matmul() else "no",
        "cores": str(cores()),
        "gpu": f"{len(gpus)} x {gpus[0]}" if gpus else "none",
        "torch": torch.__version__,
        "ray": _version("ray"),
        "mlflow": _version("mlflow"),
    }


def machine_line() -> str:
    """One line naming the machine: every benchmark prints it first (docs/benchmarks.md quotes it)."""
    return "machine: " + ", ".join(f"{key} {value}" for key, value in machine_facts().items())
