"""Nearest neighbours among tens of thousands of vectors, in blocks, spread over Ray tasks.

The audit (:mod:`vaedist.evaluate.audit`) asks two questions of point sets far too large for one distance
matrix (60,000 generated x 60,000 training MNIST images: 3.6e9 distances, 14 GB in float32):

- :func:`nearest`: the k smallest distances ``||q_i - r_j||`` of every query row (distance to the closest
  record, k-NN radii, coverage);
- :func:`ball_counts`: how many reference balls ``B(r_j, radius_j)`` hold each query (precision, density
  and recall of Kynkäänniemi et al. 2019 / Naeem et al. 2020).

Both walk a block of queries against a block of references at a time (at most ``QUERY_BLOCK x REF_BLOCK``
distances in memory, 64 MB) and keep per query only a running shortlist or a count.

:func:`nearest` is two-pass for speed. Pass 1 ranks references by ``||r||^2 - 2 q.r`` (the squared
distance less the query's own ``||q||^2``) with one fused ``addmm`` per block and keeps ``SHORTLIST``
candidates per query; pass 2 computes the exact float32 distances ``||q - r||`` of the candidates and keeps
the k smallest, so an exact copy has distance 0 exactly whatever pass 1 ran in.

Pass 1's matmul dtype is chosen from the hardware it runs on (:func:`choose_kernel`), never assumed:
bfloat16 where the CPU multiplies it natively (AMX / AVX-512 BF16: 415 vs 52 GFLOP/s float32 on 2 cores
of such a CPU) or on a CUDA GPU with tensor cores (Ampere on), float32 elsewhere: on an AVX2-only CPU
torch's bf16 matmul is 5-7x *slower* than float32 (docs/benchmarks.md, "Pass 1 kernels"). bf16's error is
the rounding of q.r to 8 bits of mantissa (~0.4% of q.r); the points are centred on the reference mean
first, which shrinks q.r, and the shortlist is far deeper than the k wanted, so both kernels give the same
neighbours but for near-ties (tests/test_audit.py checks the two agree). :func:`ball_counts` compares
float32 squared distances with squared radii directly (no shortlist: it counts every reference in reach).

:func:`on_ray` spreads either over Ray tasks by contiguous query rows (the reference shared once through
the object store; why tasks: :mod:`vaedist.evaluate.spread`) and concatenates the parts in row order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vaedist import hardware

QUERY_BLOCK = 1024  # query rows per block
REF_BLOCK = 16384  # reference rows per block: a block of distances is QUERY_BLOCK x REF_BLOCK float32 (64 MB)
SHORTLIST = 32  # pass-1 candidates per query, re-ranked exactly in pass 2
PASS1_DTYPES = ("bfloat16", "float32")
# Forces pass 1's dtype (bfloat16 | float32) instead of the hardware's choice: for comparing the kernels
# (benchmarks/audit_throughput.py --compare-kernels) and for a CPU whose flags mislead.
DTYPE_ENV = "VAEDIST_SEARCH_DTYPE"


@dataclass(frozen=True)
class Kernel:
    """Where a search runs and pass 1's matmul dtype (pass 2 is exact float32 everywhere)."""

    device: str  # "cpu" or "cuda[:i]"
    dtype: str  # one of PASS1_DTYPES

    @property
    def name(self) -> str:
        """``cpu/float32``, ``cuda/bfloat16``: what the audit's JSON and MLflow run record."""
        return f"{self.device.split(':')[0]}/{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def choose_kernel(device: str = "cpu", forced: str | None = None, flags: frozenset[str] | None = None) -> Kernel:
    """Pass 1's kernel on ``device``: ``forced`` (one of PASS1_DTYPES) if given, else bfloat16 where it is
    native (a CPU with ``flags`` of :data:`vaedist.hardware.NATIVE_BF16_FLAGS`, this CPU's when None; a CUDA
    GPU of compute capability 8.0 on), float32 elsewhere. Pure but for reading this machine's flags."""
    if forced:
        if forced not in PASS1_DTYPES:
            raise ValueError(f"{DTYPE_ENV}={forced!r} is not one of {', '.join(PASS1_DTYPES)}")
        return Kernel(device, forced)
    if device.startswith("cuda"):
        return Kernel(device, "bfloat16" if hardware.cuda_fast_matmul(torch.device(device)) else "float32")
    return Kernel(device, "bfloat16" if hardware.native_bf16_matmul(flags) else "float32")


def kernel_here(use_gpu: bool = False) -> Kernel:
    """The kernel for this process: its GPU where asked and present, else its CPU; $VAEDIST_SEARCH_DTYPE wins."""
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return choose_kernel(device, os.environ.get(DTYPE_ENV) or None)


def as_points(x: np.ndarray) -> torch.Tensor:
    """float32 (N, D): uint8 images (N, H, W, C) become pixels in [0, 1] (k/255), features stay as they are."""
    flat = np.asarray(x).reshape(len(x), -1)
    if flat.dtype == np.uint8:
        return torch.from_numpy(flat.astype(np.float32)).div_(255.0)
    return torch.from_numpy(
        np.array(flat, dtype=np.float32)
    )  # a writable copy (Ray hands out read-only arrays)


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(dim=1)  # (N,)


@dataclass(frozen=True)
class Reference:
    """The reference set of a search, centred and on its device: exact float32 for pass 2, and pass 1's copy
    (with its squared norms) in the kernel's dtype."""

    centre: torch.Tensor  # (D,) the mean the points are centred on: distances do not change, q.r shrinks
    exact: torch.Tensor  # (R, D) float32
    low: torch.Tensor  # (R, D) pass 1's dtype
    low_norms: torch.Tensor  # (R,) pass 1's dtype

    @classmethod
    def of(cls, reference: np.ndarray, kernel: Kernel) -> Reference:
        r = as_points(reference).to(kernel.device)
        centre = r.mean(dim=0)
        r -= centre
        return cls(centre, r, r.to(kernel.torch_dtype), squared_norms(r).to(kernel.torch_dtype))

    def queries(self, rows: np.ndarray) -> torch.Tensor:
        """float32 (Q, D) query rows, centred like the reference, on its device."""
        return as_points(rows).to(self.centre.device) - self.centre


def shortlist(q: torch.Tensor, ref: Reference, depth: int) -> torch.Tensor:
    """Pass 1: indices (Q, depth) of the references with the smallest ``||r||^2 - 2 q.r``, scanning the
    reference in blocks of REF_BLOCK rows; one fused ``addmm`` per block in pass 1's dtype, then a top-k."""
    ql = q.to(ref.low.dtype)
    best_score = torch.full((len(q), 0), float("inf"), dtype=ref.low.dtype, device=q.device)
    best_index = torch.zeros((len(q), 0), dtype=torch.int64, device=q.device)
    for start in range(0, len(ref.low), REF_BLOCK):
        block, norms = ref.low[start : start + REF_BLOCK], ref.low_norms[start : start + REF_BLOCK]
        score = torch.addmm(norms, ql, block.T, beta=1.0, alpha=-2.0)  # (Q, B): ||r||^2 - 2 q.r
        top = torch.topk(score, min(depth, score.shape[1]), dim=1, largest=False)
        best_score = torch.cat([best_score, top.values], dim=1)
        best_index = torch.cat([best_index, top.indices + start], dim=1)
        if best_score.shape[1] > depth:  # merge the running shortlist with this block's
            keep = torch.topk(best_score, depth, dim=1, largest=False)
            best_score, best_index = keep.values, best_index.gather(1, keep.indices)
    return best_index


def nearest_block(q: torch.Tensor, ref: Reference, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of the reference to each row of ``q`` (Q, D), centred float32: (distances (Q, k)
    float32 ascending, indices (Q, k) int64). Pass 1 shortlists, pass 2 measures exactly."""
    candidates = shortlist(q, ref, max(SHORTLIST, 2 * k))  # (Q, S)
    exact = (q[:, None, :] - ref.exact[candidates]).pow_(2).sum(dim=2)  # (Q, S, D) -> (Q, S) squared distances
    top = torch.topk(exact, k, dim=1, largest=False)  # sorted ascending
    return top.values.sqrt_().cpu().numpy(), candidates.gather(1, top.indices).cpu().numpy()


def nearest(queries: np.ndarray, reference: np.ndarray, k: int,
            kernel: Kernel | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(distances float32 (Q, k) ascending, indices int64 (Q, k)) of the k nearest reference rows to each
    query row, Euclidean. ``queries`` (Q, ...) and ``reference`` (R, ...): uint8 images or float features.
    A query that is also in ``reference`` finds itself at distance 0 (ask for k + 1 to skip it).
    ``kernel``: where and in which dtype pass 1 runs (default :func:`kernel_here`)."""
    if k > len(reference):
        raise ValueError(f"k={k} nearest neighbours asked of {len(reference)} reference points")
    ref = Reference.of(reference, kernel or kernel_here())
    dist, index = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        q = ref.queries(queries[start : start + QUERY_BLOCK])
        dist[start : start + len(q)], index[start : start + len(q)] = nearest_block(q, ref, k)
    return dist, index


def ball_counts(queries: np.ndarray, reference: np.ndarray, radii: np.ndarray,
                kernel: Kernel | None = None) -> np.ndarray:  # fmt: skip
    """int64 (Q,): for each query, the number of reference rows j with ``||q - r_j|| < radii[j]`` (strict,
    as in Naeem et al.'s reference implementation), float32 squared distances in blocks on the kernel's
    device (its pass-1 dtype plays no part: a count has no second pass to correct it)."""
    device = (kernel or kernel_here()).device
    r = as_points(reference).to(device)
    centre = r.mean(dim=0)
    r -= centre
    r_norms = squared_norms(r)
    radii_sq = torch.from_numpy(np.asarray(radii, np.float32)).to(device).pow(2)  # (R,)
    counts = np.zeros(len(queries), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        q = as_points(queries[start : start + QUERY_BLOCK]).to(device) - centre
        q_norms, total = squared_norms(q), torch.zeros(len(q), dtype=torch.int64, device=device)
        for r0 in range(0, len(r), REF_BLOCK):
            block = r[r0 : r0 + REF_BLOCK]
            d2 = q_norms[:, None] + r_norms[None, r0 : r0 + REF_BLOCK] - 2.0 * (q @ block.T)  # (Q, B)
            total += (d2 < radii_sq[None, r0 : r0 + REF_BLOCK]).sum(dim=1)
        counts[start : start + len(q)] = total.cpu().numpy()
    return counts


# --------------------------------------------------------------------------------------------------
# Spread over Ray: contiguous query rows per task, the reference shared once


def run_task(fn: Callable, queries: np.ndarray, reference: np.ndarray, start: int, stop: int, args: tuple,
             threads: int, use_gpu: bool) -> tuple[int, float, str, tuple]:  # fmt: skip
    """One Ray task: ``fn`` on query rows [start, stop) with the kernel of the node it landed on; returns
    (start, seconds, the kernel's name, fn's arrays)."""
    torch.set_num_threads(threads)
    kernel = kernel_here(use_gpu)
    t0 = time.perf_counter()
    out = fn(queries[start:stop], reference, *args, kernel=kernel)
    return start, time.perf_counter() - t0, kernel.name, out if isinstance(out, tuple) else (out,)


def on_ray(fn: Callable, queries: np.ndarray, reference: np.ndarray, args: tuple, plan,
           what: str) -> tuple[tuple, set[str]]:  # fmt: skip
    """``fn(queries, reference, *args)`` (:func:`nearest` or :func:`ball_counts`), computed as one Ray
    task per worker of ``plan`` over contiguous query rows (each holding the plan's CPUs and GPU, as the
    feature extraction does) and put back together in row order: (the same arrays as one call, the
    kernels that ran). ``what`` names the search in an error."""
    import ray

    from vaedist.evaluate import spread

    q_ref, r_ref = spread.share(queries, reference)
    rows = np.array_split(np.arange(len(queries)), max(1, min(plan.workers, len(queries))))
    task = ray.remote(run_task).options(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)
    pending = [task.remote(fn, q_ref, r_ref, int(p[0]), int(p[-1]) + 1, args, plan.torch_threads, plan.use_gpu)
               for p in rows if len(p)]  # fmt: skip
    parts = sorted(spread.as_done(pending, f"{what} failed in a Ray task"), key=lambda part: part[0])
    arrays = tuple(np.concatenate([part[3][i] for part in parts]) for i in range(len(parts[0][3])))
    return arrays, {part[2] for part in parts}
