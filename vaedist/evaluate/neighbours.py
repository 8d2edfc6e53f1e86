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
distance less the query's own ``||q||^2``) with a bfloat16 matmul, which runs ~8x faster than float32 on
these CPUs (AMX / AVX-512 BF16: 415 vs 52 GFLOP/s measured on 2 cores), and keeps ``SHORTLIST``
candidates per query. Its error is the rounding of q.r to bf16 (8 bits of mantissa, ~0.4% of q.r); the
points are centred on the reference mean first, which shrinks q.r, and the shortlist is far deeper than
the k wanted. Pass 2 computes the exact float32 distances ``||q - r||`` of the candidates and keeps the k
smallest, so an exact copy has distance 0 exactly. :func:`ball_counts` compares float32 squared distances
with squared radii directly (no shortlist: it counts every reference in reach).

:func:`on_ray` spreads either over Ray tasks by contiguous query rows (the reference shared once through
the object store; why tasks: :mod:`vaedist.evaluate.spread`) and concatenates the parts in row order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

QUERY_BLOCK = 1024  # query rows per block
REF_BLOCK = 16384  # reference rows per block: a block of distances is QUERY_BLOCK x REF_BLOCK float32 (64 MB)
SHORTLIST = 32  # pass-1 candidates per query, re-ranked exactly in pass 2


def as_points(x: np.ndarray) -> torch.Tensor:
    """float32 (N, D): uint8 images (N, H, W, C) become pixels in [0, 1] (k/255), features stay as they are."""
    flat = np.asarray(x).reshape(len(x), -1)
    if flat.dtype == np.uint8:
        return torch.from_numpy(flat.astype(np.float32)).div_(255.0)
    return torch.from_numpy(
        np.array(flat, dtype=np.float32)
    )  # a writable copy (Ray hands out read-only arrays)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(dim=1)  # (N,)


def _shortlist(q: torch.Tensor, r_bf16: torch.Tensor, r_norms_bf16: torch.Tensor, depth: int) -> torch.Tensor:
    """Pass 1: indices (Q, depth) of the references with the smallest ``||r||^2 - 2 q.r``, scanning
    ``r_bf16`` (R, D) in blocks of REF_BLOCK rows; one fused bf16 ``addmm`` per block, then a top-k."""
    qb = q.to(torch.bfloat16)
    best_score = torch.full((len(q), 0), float("inf"), dtype=torch.bfloat16)
    best_index = torch.zeros((len(q), 0), dtype=torch.int64)
    for start in range(0, len(r_bf16), REF_BLOCK):
        block, norms = r_bf16[start : start + REF_BLOCK], r_norms_bf16[start : start + REF_BLOCK]
        score = torch.addmm(norms, qb, block.T, beta=1.0, alpha=-2.0)  # (Q, B): ||r||^2 - 2 q.r
        top = torch.topk(score, min(depth, score.shape[1]), dim=1, largest=False)
        best_score = torch.cat([best_score, top.values], dim=1)
        best_index = torch.cat([best_index, top.indices + start], dim=1)
        if best_score.shape[1] > depth:  # merge the running shortlist with this block's
            keep = torch.topk(best_score, depth, dim=1, largest=False)
            best_score, best_index = keep.values, best_index.gather(1, keep.indices)
    return best_index


def nearest_block(q: torch.Tensor, r: torch.Tensor, r_bf16: torch.Tensor, r_norms_bf16: torch.Tensor,
                  k: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The k nearest of ``r`` (R, D) to each row of ``q`` (Q, D), both centred float32: (distances (Q, k)
    float32 ascending, indices (Q, k) int64). Pass 1 shortlists, pass 2 measures exactly."""
    candidates = _shortlist(q, r_bf16, r_norms_bf16, max(SHORTLIST, 2 * k))  # (Q, S)
    exact = (q[:, None, :] - r[candidates]).pow_(2).sum(dim=2)  # (Q, S, D) -> (Q, S) squared distances
    top = torch.topk(exact, k, dim=1, largest=False)  # sorted ascending
    return top.values.sqrt_().numpy(), candidates.gather(1, top.indices).numpy()


def nearest(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances float32 (Q, k) ascending, indices int64 (Q, k)) of the k nearest reference rows to each
    query row, Euclidean. ``queries`` (Q, ...) and ``reference`` (R, ...): uint8 images or float features.
    A query that is also in ``reference`` finds itself at distance 0 (ask for k + 1 to skip it)."""
    if k > len(reference):
        raise ValueError(f"k={k} nearest neighbours asked of {len(reference)} reference points")
    r = as_points(reference)
    centre = r.mean(dim=0)
    r -= centre  # distances do not change; q.r and its bf16 rounding shrink
    r_bf16, r_norms_bf16 = r.to(torch.bfloat16), _squared_norms(r).to(torch.bfloat16)
    dist, index = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        q = as_points(queries[start : start + QUERY_BLOCK]) - centre
        part = nearest_block(q, r, r_bf16, r_norms_bf16, k)
        dist[start : start + len(q)], index[start : start + len(q)] = part
    return dist, index


def ball_counts(queries: np.ndarray, reference: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """int64 (Q,): for each query, the number of reference rows j with ``||q - r_j|| < radii[j]`` (strict,
    as in Naeem et al.'s reference implementation), float32 squared distances in blocks."""
    r = as_points(reference)
    centre = r.mean(dim=0)
    r -= centre
    r_norms = _squared_norms(r)
    radii_sq = torch.from_numpy(np.asarray(radii, np.float32)).pow(2)  # (R,)
    counts = np.zeros(len(queries), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        q = as_points(queries[start : start + QUERY_BLOCK]) - centre
        q_norms, total = _squared_norms(q), torch.zeros(len(q), dtype=torch.int64)
        for r0 in range(0, len(r), REF_BLOCK):
            block = r[r0 : r0 + REF_BLOCK]
            d2 = q_norms[:, None] + r_norms[None, r0 : r0 + REF_BLOCK] - 2.0 * (q @ block.T)  # (Q, B)
            total += (d2 < radii_sq[None, r0 : r0 + REF_BLOCK]).sum(dim=1)
        counts[start : start + len(q)] = total.numpy()
    return counts


# --------------------------------------------------------------------------------------------------
# Spread over Ray: contiguous query rows per task, the reference shared once


def _task(fn: Callable, queries: np.ndarray, reference: np.ndarray, start: int, stop: int, args: tuple,
          threads: int) -> tuple[int, float, tuple]:  # fmt: skip
    """One Ray task: ``fn`` on query rows [start, stop); returns (start, seconds, fn's arrays)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = fn(queries[start:stop], reference, *args)
    return start, time.perf_counter() - t0, out if isinstance(out, tuple) else (out,)


def on_ray(fn: Callable, queries: np.ndarray, reference: np.ndarray, args: tuple, plan, what: str) -> tuple:
    """``fn(queries, reference, *args)`` (:func:`nearest` or :func:`ball_counts`), computed as one Ray
    task per worker of ``plan`` over contiguous query rows and put back together in row order: the same
    arrays as one call. ``what`` names the search in an error."""
    import ray

    from vaedist.evaluate import spread

    q_ref, r_ref = spread.share(queries, reference)
    rows = np.array_split(np.arange(len(queries)), max(1, min(plan.workers, len(queries))))
    task = ray.remote(_task).options(num_cpus=plan.cpus_per_worker)
    pending = [task.remote(fn, q_ref, r_ref, int(p[0]), int(p[-1]) + 1, args, plan.torch_threads)
               for p in rows if len(p)]  # fmt: skip
    parts = sorted(spread.as_done(pending, f"{what} failed in a Ray task"), key=lambda part: part[0])
    return tuple(np.concatenate([part[2][i] for part in parts]) for i in range(len(parts[0][2])))
