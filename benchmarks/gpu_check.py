"""A prepared GPU check: what a lent CUDA machine should run first, with torch alone (no Ray, no MLflow).

    python benchmarks/gpu_check.py              # on a CUDA machine: every check at full size
    python benchmarks/gpu_check.py --size 20000 # the neighbour searches smaller
    python benchmarks/gpu_check.py --cpu        # the same checks on CPU, small sizes (gloo, 2 processes)

One function per check, each on the same device:
  1. a training step of every model family (ae / vae / cvae x dense / conv / resnet, the hierarchical VAE
     and CVAE) through ``loop.train_epoch``, in float32 and under bf16 autocast: both losses finite, the
     bf16 loss close to float32's at the same weights and noise;
  2. the decoder's images/s (``model.generate``: latents -> mean images), float32 and bf16 autocast;
  3. ``loop.train_epoch``'s images/s against a plain PyTorch loop over the same model and batches;
  4. a DDP step through ``torch.distributed`` (NCCL, one process per GPU; gloo and 2 processes on CPU):
     every rank ends the step with the same weights;
  5. the audit's nearest-neighbour search (``evaluate/neighbours.py``), 60,000 x 60,000 in features (D=64)
     and pixels (D=784), on the device against the CPU result.

It imports only the plain-PyTorch parts of vaedist (models, loop, hardware, evaluate.neighbours), so it
runs where Ray and MLflow are not installed. Prints the machine line first, one goal line per figure
(``<figure>: <value> (goal <op> <target>)``) and a table at the end; exit status 0 when every check
passes, 1 when one fails (named on the last line), 2 when there is no CUDA device and no ``--cpu``.
"""

from __future__ import annotations

import argparse
import copy
import math
import operator
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vaedist import loop
from vaedist.evaluate.neighbours import kernel_here, nearest
from vaedist.hardware import machine_line
from vaedist.models import BaseVAE, binarize, build_model_from_hparams, to_model_input

IMAGE = (28, 28, 1)  # MNIST: (H, W, C)
CLASSES = 10
LATENT = 16
# (variant, arch, stochastic_layers): every family a config can name (models/vae.py, models/ladder.py).
FAMILIES = [(v, a, 1) for v in ("ae", "vae", "cvae") for a in ("dense", "conv", "resnet")]
FAMILIES += [("vae", "conv", 2), ("cvae", "conv", 2)]
# bf16 keeps 8 bits of mantissa (relative rounding 2**-9 per operation): a loss summed over 784 pixels
# through a few layers stays within a few tenths of a per cent of float32's; 2 % leaves room, a broken
# autocast path (a wrong dtype in a likelihood, a KL in bf16) is far outside it.
BF16_LOSS_RTOL = 0.02
LOOP_VS_PLAIN_GOAL = 0.95  # the loop's bookkeeping (sums, progress hook, autocast switch) costs under 5 %
NEIGHBOUR_AGREEMENT_GOAL = 0.999  # pass 2 is exact: only near-ties may swap
NEIGHBOUR_DISTANCE_ATOL = 1e-3  # float32 distances of points in [0, 1] or unit-scale features
K = 5  # neighbours per query, as the audit asks (k + 1 with the point itself)
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "==": operator.eq}


@dataclass(frozen=True)
class Sizes:
    batch: int
    decoder_images: int
    loop_steps: int
    neighbours: int
    world: int  # DDP processes


@dataclass(frozen=True)
class Figure:
    """One figure and its goal; ``speed`` figures are timings (on a shared CPU they may miss by load)."""

    check: str
    name: str
    value: float
    op: str
    target: float
    speed: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        return not math.isnan(self.value) and OPS[self.op](self.value, self.target)

    def line(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"{self.name}: {self.value:.4g} (goal {self.op} {self.target:g}{note})"


def hparams(variant: str, arch: str, layers: int) -> dict:
    """A small model of the family, as ``model.hparams`` records it (the knobs a checkpoint carries)."""
    hp = {"variant": variant, "arch": arch, "image_height": IMAGE[0], "image_width": IMAGE[1],
          "image_channels": IMAGE[2], "num_classes": CLASSES, "likelihood": "bernoulli",
          "latent_dim": LATENT, "base_channels": 16, "width": 256, "depth": 2}  # fmt: skip
    if layers > 1:
        hp["stochastic_layers"] = layers
    return hp


def fake_batches(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of uint8 (B, H, W, C) images and int64 labels, as ``loop.index_batches`` yields them."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, *IMAGE), generator=gen, dtype=torch.uint8),
             torch.randint(0, CLASSES, (batch,), generator=gen)) for _ in range(n)]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(model: BaseVAE, batches, device: torch.device, dtype: torch.dtype | None) -> float:
    """The mean loss of one ``loop.train_epoch`` step (computed before the optimizer moves the weights)."""
    torch.manual_seed(0)  # the same reparameterization noise for float32 and bf16 (CPU and CUDA)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sums = loop.train_epoch(loop.ElboObjective(model), model, optimizer, batches, 1, lambda _: 1.0, 0.0,
                            torch.Generator().manual_seed(0), device, autocast_dtype=dtype)  # fmt: skip
    return sums.loss / max(sums.count, 1)


def check_training_steps(device: torch.device, sizes: Sizes) -> list[Figure]:
    """A float32 and a bf16-autocast step of every family from the same weights: finite, and close."""
    bf16 = loop.autocast_dtype("bf16", device)
    batches = fake_batches(1, sizes.batch, seed=1)
    finite, worst, rows = 0, 0.0, []
    for variant, arch, layers in FAMILIES:
        torch.manual_seed(0)
        model = build_model_from_hparams(hparams(variant, arch, layers)).to(device)
        twin = copy.deepcopy(model)
        fp32, low = one_step(model, batches, device, None), one_step(twin, batches, device, bf16)
        steps_ok = all(math.isfinite(v) for v in (fp32, low))
        weights_ok = all(torch.isfinite(p).all() for m in (model, twin) for p in m.parameters())
        finite += steps_ok and weights_ok
        rel = abs(low - fp32) / max(abs(fp32), 1e-9)
        worst = max(worst, rel if math.isfinite(rel) else math.inf)
        rows.append(f"{variant}/{arch}/{layers}: fp32 {fp32:.2f}, bf16 {low:.2f}, rel {rel:.2e}")
    for row in rows:
        print("   ", row)
    return [
        Figure("training step", "families_finite_in_fp32_and_bf16", finite, "==", len(FAMILIES),
               note=f"of {len(FAMILIES)}"),
        Figure("training step", "bf16_vs_fp32_loss_max_rel_diff", worst, "<=", BF16_LOSS_RTOL),
    ]  # fmt: skip


def timed(fn: Callable[[], object], device: torch.device, rounds: int = 3, warm_up: bool = True) -> float:
    """The best of ``rounds`` wall times of ``fn`` (after one warm-up call), synchronized on the device."""
    if warm_up:
        fn()
    best = math.inf
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def check_decoder(device: torch.device, sizes: Sizes) -> list[Figure]:
    """Images/s of the conv CVAE's decoder (latents -> mean images), float32 and under bf16 autocast."""
    model = build_model_from_hparams(hparams("cvae", "conv", 1)).to(device).eval()
    n, batch = sizes.decoder_images, sizes.batch * 4
    z = torch.randn(n, LATENT, device=device)
    y = torch.arange(n, device=device) % CLASSES

    def decode_all(dtype: torch.dtype | None) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(0, n, batch):
                model.generate(z[i : i + batch], y[i : i + batch])

    bf16 = loop.autocast_dtype("bf16", device)
    return [
        Figure("decoder", "decoder_fp32_images_per_s", n / timed(lambda: decode_all(None), device), ">", 0, True),
        Figure("decoder", "decoder_bf16_images_per_s", n / timed(lambda: decode_all(bf16), device), ">", 0, True),
    ]


def plain_epoch(model: BaseVAE, optimizer, batches, device: torch.device) -> None:
    """What a user writes without vaedist: images to [0, 1], a Bernoulli draw, the loss, a step."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    for images, labels in batches:
        x = binarize(to_model_input(images), generator=gen).to(device, non_blocking=True)
        loss = model.loss(x, labels.to(device, non_blocking=True)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def check_loop_vs_plain(device: torch.device, sizes: Sizes) -> list[Figure]:
    """``loop.train_epoch``'s images/s over the plain loop's, same model, same batches, alternated."""
    torch.manual_seed(0)
    model = build_model_from_hparams(hparams("cvae", "conv", 1)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = fake_batches(sizes.loop_steps, sizes.batch, seed=2)
    objective, steps = loop.ElboObjective(model), len(batches)
    gen = torch.Generator().manual_seed(0)

    def ours() -> None:
        loop.train_epoch(objective, model, optimizer, batches, steps, lambda _: 1.0, 0.0, gen, device)

    def theirs() -> None:
        plain_epoch(model, optimizer, batches, device)

    images = steps * sizes.batch
    plain, vaedist = [], []
    theirs(), ours()  # warm-up (kernels chosen, allocator filled) of both, then alternated: speeds drift
    for _ in range(3):
        plain.append(images / timed(theirs, device, 1, warm_up=False))
        vaedist.append(images / timed(ours, device, 1, warm_up=False))
    return [
        Figure("loop", "plain_loop_images_per_s", max(plain), ">", 0, True),
        Figure("loop", "vaedist_loop_images_per_s", max(vaedist), ">", 0, True),
        Figure("loop", "vaedist_loop_vs_plain", max(vaedist) / max(plain), ">=", LOOP_VS_PLAIN_GOAL, True),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank: int, world: int, port: int, use_cuda: bool, batch: int, queue) -> None:
    """One DDP process: the same model on every rank, a step on its own batch, then every rank's weights
    gathered: a correct all-reduce leaves them identical."""
    import torch.distributed as dist

    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)  # fmt: skip
    try:
        torch.manual_seed(0)
        core = build_model_from_hparams(hparams("cvae", "conv", 1)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            loop.ElboObjective(core), device_ids=[rank] if use_cuda else None
        )
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        sums = loop.train_epoch(ddp, core, optimizer, fake_batches(1, batch, seed=10 + rank), 1,
                                lambda _: 1.0, 0.0, torch.Generator().manual_seed(rank), device)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - t0
        flat = torch.cat([p.detach().flatten() for p in core.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        spread = max(float((g - flat).abs().max()) for g in gathered)
        queue.put((rank, sums.loss / max(sums.count, 1), spread, seconds))
    finally:
        dist.destroy_process_group()


def check_ddp(device: torch.device, sizes: Sizes) -> list[Figure]:
    """A DDP step in ``sizes.world`` spawned processes: all finish, losses finite, weights in sync."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port, use_cuda = ctx.SimpleQueue(), free_port(), device.type == "cuda"
    procs = [ctx.Process(target=ddp_rank, args=(r, sizes.world, port, use_cuda, sizes.batch, queue))
             for r in range(sizes.world)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    results = [queue.get() for _ in range(sum(p.exitcode == 0 for p in procs))]
    for p in procs:
        if p.is_alive():
            p.kill()
    finished = sum(1 for _, loss, _, _ in results if math.isfinite(loss))
    spread = max((s for _, _, s, _ in results), default=math.nan)
    backend = "nccl" if use_cuda else "gloo"
    return [
        Figure("ddp", "ddp_ranks_finished_finite", finished, "==", sizes.world,
               note=f"{backend}, world of {sizes.world}"),
        Figure("ddp", "ddp_weights_max_diff_across_ranks", spread if results else math.nan, "<=", 0.0),
        Figure("ddp", "ddp_step_s", max((s for *_, s in results), default=math.nan), ">", 0, True),
    ]  # fmt: skip


def nearest_on(device: torch.device, queries: np.ndarray, reference: np.ndarray, k: int):
    """The audit's search on ``device`` with the kernel the audit would choose there (bf16 pass 1 on a GPU
    with tensor cores, float32 elsewhere): (its answer, the kernel's name)."""
    kernel = kernel_here(use_gpu=device.type == "cuda")
    return nearest(queries, reference, k, kernel=kernel), kernel.name


def search_points(n: int, dim: int, pixels: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, reference) of ``n`` points each: uint8 images or float features; a tenth of the queries
    are exact copies of reference rows, which must find that row at distance 0."""
    rng = np.random.default_rng(seed)
    if pixels:
        reference = rng.integers(0, 256, (n, dim), dtype=np.uint8)
        queries = rng.integers(0, 256, (n, dim), dtype=np.uint8)
    else:
        reference = rng.standard_normal((n, dim), dtype=np.float32)
        queries = rng.standard_normal((n, dim), dtype=np.float32)
    queries[: n // 10] = reference[: n // 10]
    return queries, reference


def check_neighbours(device: torch.device, sizes: Sizes) -> list[Figure]:
    """The search of N x N on the device against the CPU search: same neighbours, same distances."""
    figures = []
    for space, dim, pixels in (("features", 64, False), ("pixels", 784, True)):
        queries, reference = search_points(sizes.neighbours, dim, pixels, seed=dim)
        t0 = time.perf_counter()
        (dist, index), where = nearest_on(device, queries, reference, K)
        sync(device)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        cpu_dist, cpu_index = nearest(queries, reference, K, kernel=kernel_here())
        cpu_seconds = time.perf_counter() - t0
        copies = sizes.neighbours // 10
        found_self = np.mean(index[:copies, 0] == np.arange(copies))
        figures += [
            Figure("neighbours", f"neighbours_{space}_index_agreement", float(np.mean(index == cpu_index)),
                   ">=", NEIGHBOUR_AGREEMENT_GOAL, note=f"{sizes.neighbours:,} x {sizes.neighbours:,}, on {where}"),
            Figure("neighbours", f"neighbours_{space}_exact_copies_found", float(found_self), "==", 1.0),
            Figure("neighbours", f"neighbours_{space}_distance_max_diff", float(np.abs(dist - cpu_dist).max()),
                   "<=", NEIGHBOUR_DISTANCE_ATOL),
            Figure("neighbours", f"neighbours_{space}_speedup_vs_cpu", cpu_seconds / seconds, ">", 0, True,
                   note=f"{seconds:.1f} s vs {cpu_seconds:.1f} s"),
        ]  # fmt: skip
    return figures


CHECKS = [check_training_steps, check_decoder, check_loop_vs_plain, check_ddp, check_neighbours]


def run_check(check, device: torch.device, sizes: Sizes) -> list[Figure]:
    """A check's figures; a check that raises is one failed figure naming the error (the others still run)."""
    name = check.__name__.removeprefix("check_")
    print(f"{name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        return check(device, sizes)
    except Exception as exc:  # noqa: BLE001 -- the table must name every check, a broken one included
        return [Figure(name, f"{name}_ran", math.nan, "==", 1, note=f"{type(exc).__name__}: {exc}")]
    finally:
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


def table(figures: list[Figure]) -> str:
    width = max(len(f.name) for f in figures)
    rows = [f"{'check':14s} {'figure':{width}s} {'value':>12s}  goal        result"]
    for f in figures:
        verdict = "pass" if f.ok else ("miss (timing)" if f.speed else "FAIL")
        rows.append(f"{f.check:14s} {f.name:{width}s} {f.value:12.4g}  {f.op} {f.target:<8g}  {verdict}")
    return "\n".join(rows)


def sizes_for(args) -> Sizes:
    if args.cpu:
        return Sizes(batch=16, decoder_images=1024, loop_steps=4, neighbours=args.size or 2000, world=2)
    return Sizes(batch=256, decoder_images=200_000, loop_steps=50, neighbours=args.size or 60_000,
                 world=torch.cuda.device_count())  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run every check on CPU at small sizes (gloo, 2 processes)")
    ap.add_argument("--size", type=int, help="points of each neighbour search (default 60,000; 2,000 with --cpu)")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --cpu for the same checks on CPU")
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    sizes = sizes_for(args)
    figures = [f for check in CHECKS for f in run_check(check, device, sizes)]
    print()
    for f in figures:
        print(f.line())
    print()
    print(table(figures))
    failed = [f.name for f in figures if not f.ok]
    print("failed: " + ", ".join(failed) if failed else "every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
