"""Evaluation: test-set likelihood of a model, and the Classification Accuracy Score of its synthetic data.

Likelihood (``vaedist evaluate likelihood``)
    Negative ELBO (one z per image) and the importance-weighted NLL (Burda et al. 2016, eq. 8, ``k``
    samples) on the real test set, in nats per image and in bits per dimension (``nats / (D ln 2)``).
    The protocol follows the likelihood, so the numbers compare with the literature:
    - Bernoulli models see the test set *dynamically binarized once with a fixed seed* (each pixel a
      Bernoulli(intensity) draw), the protocol of the MNIST numbers of Burda et al. 2016 (VAE 86.76 nats,
      IWAE k=50 84.78);
    - discretized logistic/Gaussian models see the 8-bit images as they are: bits/dim compare with the
      CIFAR-10 literature.
    A conditional model is scored as ``-log p(x | y)`` with the true test label: label-conditioned,
    lower than an unconditional ``-log p(x)`` by at most ``log K`` nats.
    The test set is split into contiguous, batch-aligned shards, one Ray task per worker; each task loads
    the model once. Every batch draws its z from a generator seeded by (seed, first row of the batch), so
    the split evaluation gives exactly the numbers of one unsplit pass (:func:`score_images`).

CAS (``vaedist evaluate cas``), Ravuri & Vinyals 2019
    One fixed classifier (:class:`CASClassifier`) is trained with Ray Train on the generated images only
    and tested on the real test set; its accuracy is the CAS. The same classifier with the same budget
    (epochs, batch size, lr, seed *and* number of training images: a seeded random subset of the real
    training split as large as the generated set, or all of it if the generated set is larger) trained on
    real images gives the ceiling. Reported: CAS, ceiling, CAS / ceiling, per-class accuracy (recall of
    each true class), and the confusion matrix, logged to an MLflow run of kind ``evaluate`` in
    ``vaedist/<dataset>`` tagged with the generating model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from vaedist import __version__, loop, tracking
from vaedist.checkpoint import load_model
from vaedist.config import EvaluateConfig, ResourcesConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.models import BaseVAE, binarize, bits_per_dim, to_model_input

WHATS = ("likelihood", "cas", "all")
MANIFEST = "_manifest.json"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
META_PREFIX = "vaedist."  # generate.py prefixes its Parquet key-value metadata with this


def run_evaluate(
    cfg: EvaluateConfig,
    resources: ResourcesConfig,
    what: str,
    echo=print,
    *,
    limit: int | None = None,
    reuse: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the evaluations ``what`` asks for: 'likelihood' (needs ``cfg.model``), 'cas' (needs
    ``cfg.generated``) or 'all' (both). Returns ``{"likelihood": {...}, "cas": {...}}`` with the keys run.

    ``limit``: score only the first ``limit`` test images in the likelihood (smoke runs, tests).
    ``reuse``: an evaluation MLflow already holds for the same model (or generated folder), data, k and
    seed is returned instead of recomputed (a pipeline's rerun; an IW-NLL at k=1000 of MNIST takes ~17 min on 2 cores).
    Inputs are checked before Ray starts, so bad input fails in a second with one line.
    """
    if what not in WHATS:
        raise UsageError(f"evaluate: what {what!r} is not one of {', '.join(WHATS)}")
    if what in ("likelihood", "all") and not cfg.model:
        raise UsageError(
            "evaluate likelihood needs a model (--model models:/vaedist-mnist@champion or a checkpoint)"
        )
    if what in ("cas", "all") and not cfg.generated:
        raise UsageError(
            "evaluate cas needs a generated folder (--generated DIR, written by vaedist generate)"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UsageError(f"evaluate: limit must be a positive number of test images, got {limit!r}")
    out: dict[str, dict[str, Any]] = {}
    if what in ("likelihood", "all"):
        out["likelihood"] = evaluate_likelihood(cfg, resources, echo=echo, limit=limit, reuse=reuse)
    if what in ("cas", "all"):
        out["cas"] = evaluate_cas(cfg, resources, echo=echo, reuse=reuse)
    return out


# ==================================================================================================
# Likelihood


def prepare_test_images(images: np.ndarray, binarized: bool, seed: int) -> np.ndarray:
    """Test images in the model's protocol, still uint8 (N, H, W, C).

    Bernoulli models: one dynamic binarization of the whole set, drawn with ``seed`` (the same seed
    gives the same set, whatever the number of workers), stored as {0, 255} so that
    ``to_model_input`` yields exactly {0., 1.}. Other likelihoods: the 8-bit images unchanged.
    """
    if not binarized:
        return images
    x = to_model_input(torch.from_numpy(np.array(images)))  # (N, C, H, W) in [0, 1]
    xb = binarize(x, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W) in {0, 1}
    return (xb * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)


def batch_aligned_shards(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) covering ``range(n)``, one per worker, each starting on a
    multiple of ``batch_size`` so every shard forms the same batches as one unsplit pass."""
    n_batches = math.ceil(n / batch_size)
    parts = np.array_split(np.arange(n_batches), max(1, min(workers, n_batches)))
    return [(int(p[0]) * batch_size, min(n, (int(p[-1]) + 1) * batch_size)) for p in parts if len(p)]


@torch.no_grad()
def score_images(
    model: BaseVAE,
    images: np.ndarray,
    labels: np.ndarray,
    start: int,
    stop: int,
    *,
    k: int,
    k_batch: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Per-image ``neg_elbo``, ``recon``, ``kl`` and ``iw_nll`` (nats, float64 (stop - start,)) of rows
    [start, stop) of prepared test images (:func:`prepare_test_images`); ``labels`` int64 (N,).

    Plain PyTorch: the Ray tasks call this on their shard, tests on the whole set. Batch ``b`` covers
    rows [b, b + batch_size) and draws its z (the ELBO's one sample, then the k importance samples)
    from a generator seeded by (seed, b): results do not depend on how rows are sharded.
    """
    if start % batch_size:
        raise ValueError(f"start {start} is not a multiple of batch_size {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {"neg_elbo": [], "recon": [], "kl": [], "iw_nll": []}
    for b0 in range(start, stop, batch_size):
        b1 = min(b0 + batch_size, stop)
        x = to_model_input(torch.from_numpy(np.array(images[b0:b1]))).to(device)  # (B, C, H, W)
        y = (
            torch.from_numpy(np.array(labels[b0:b1], dtype=np.int64)).to(device)
            if model.conditional
            else None
        )
        g = torch.Generator(device=device).manual_seed(loop.derive_seed(seed, b0))
        mu, logvar = model.encode(x, y)  # (B, L) each
        z = model.reparameterize(mu, logvar, generator=g)  # (B, L)
        out = model.loss_from_forward(x, {"params": model.decode(z, y), "mu": mu, "logvar": logvar, "z": z})
        iw = model.iw_nll(x, y, k=k, chunk=k_batch, generator=g)  # (B,)
        for key, value in (("neg_elbo", out.neg_elbo), ("recon", out.recon), ("kl", out.kl), ("iw_nll", iw)):
            parts[key].append(value.double().cpu().numpy())
    return {key: np.concatenate(v) if v else np.zeros(0) for key, v in parts.items()}


def _model_from_bytes(blob: bytes) -> BaseVAE:
    with tempfile.TemporaryDirectory(prefix="vaedist-eval-") as d:
        path = Path(d) / tracking.CHECKPOINT_FILE
        path.write_bytes(blob)
        model, _ = load_model(path)
    return model


@ray.remote
def _score_shard(
    checkpoint: bytes, images: np.ndarray, labels: np.ndarray, start: int, stop: int, options: dict
) -> dict[str, Any]:
    """One worker: load the model once, score rows [start, stop). Runs as a Ray task."""
    torch.set_num_threads(options["threads"])
    device = torch.device("cuda" if options["use_gpu"] and torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = _model_from_bytes(checkpoint)
    scores = score_images(
        model, images, labels, start, stop,
        k=options["k"], k_batch=options["k_batch"], batch_size=options["batch_size"], seed=options["seed"],
        device=device,
    )  # fmt: skip
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - t0, "scores": scores}


def _trained_dataset(ckpt: dict) -> str | None:
    cfg = ckpt.get("config") or {}
    hparams = ckpt.get("hparams") or {}
    return cfg.get("data.dataset") or hparams.get("dataset")


def load_for_likelihood(uri: str, dataset: str | None) -> tuple[Path, BaseVAE, dict, str]:
    """(checkpoint path, model, checkpoint dict, dataset) after checking the model can be scored on it."""
    path = tracking.resolve_checkpoint(uri)
    model, ckpt = load_model(path)
    variant = getattr(model, "variant", "?")
    if not model.stochastic:
        raise UsageError(
            f"model {uri} is a plain autoencoder (variant {variant!r}): it has no posterior and no likelihood "
            "bound, so there is no ELBO or IW-NLL to report; evaluate a 'vae' or 'cvae'"
        )
    trained_on = _trained_dataset(ckpt)
    dataset = dataset or trained_on
    if dataset is None:
        raise UsageError(f"model {uri} does not record the dataset it was trained on: pass --dataset")
    spec = get_spec(dataset)
    if tuple(model.image_shape) != tuple(spec.image_shape):
        raise UsageError(
            f"model {uri} takes {_shape(model.image_shape)} images but {dataset} images are "
            f"{_shape(spec.image_shape)}"
        )
    if model.conditional and model.num_classes != spec.num_classes:
        raise UsageError(
            f"model {uri} is conditioned on {model.num_classes} classes but {dataset} has {spec.num_classes}"
        )
    return path, model, ckpt, dataset


def _shape(s) -> str:
    return "x".join(str(int(d)) for d in s)


def evaluate_likelihood(
    cfg: EvaluateConfig, resources: ResourcesConfig, echo=print, limit: int | None = None, reuse: bool = False
) -> dict[str, Any]:
    """Test -ELBO, IW-NLL(k) and bits/dim of ``cfg.model`` on Ray; logged on the model's MLflow run."""
    from vaedist.train import connect_ray, plan_workers

    uri = cfg.model
    path, model, ckpt, dataset = load_for_likelihood(uri, cfg.dataset)
    trained_on = _trained_dataset(ckpt)
    spec = get_spec(dataset)
    images, labels = load_split(dataset, "test")
    binarized = bool(model.likelihood.binarized)
    prepared = prepare_test_images(images, binarized, cfg.seed)
    n = len(labels) if limit is None else min(limit, len(labels))
    num_dims = int(np.prod(spec.image_shape))
    protocol = (
        f"dynamically binarized with seed {cfg.seed}" if binarized else "8-bit discretized (images as stored)"
    )
    likelihood_name = model.hparams.get("likelihood", type(model.likelihood).__name__)
    conditioning = (
        "label-conditioned: -log p(x|y) with the true test label" if model.conditional else "-log p(x)"
    )

    artifact = f"evaluation/likelihood-{dataset}-k{cfg.k}-seed{cfg.seed}-n{n}.json"
    run_id = tracking.model_run_id(uri)
    prior = tracking.load_dict(run_id, artifact) if reuse and run_id else None
    if prior is not None:
        echo(f"likelihood of {uri} on {n} {dataset} test images (k={cfg.k}, seed {cfg.seed}) is already on MLflow "
             f"run {run_id}: reusing it")  # fmt: skip
        return {**prior, "checkpoint": str(path), "run_id": run_id}

    connect_ray(resources.address)
    plan = plan_workers(resources)
    shards = batch_aligned_shards(n, cfg.batch_size, plan.workers)
    echo(
        f"likelihood of {uri} ({model.hparams.get('variant')} {model.hparams.get('arch')}, {likelihood_name}) "
        f"on {dataset} test: {n} images, {protocol}; {conditioning}"
    )
    echo(f"  k={cfg.k} importance samples ({cfg.k_batch} per pass), batch {cfg.batch_size}, seed {cfg.seed}; "
         f"{len(shards)} Ray task(s) x {plan.cpus_per_worker:g} CPU"
         f"{f' x {plan.gpus_per_worker:g} GPU' if plan.use_gpu else ''}")  # fmt: skip

    options = {
        "k": cfg.k, "k_batch": cfg.k_batch, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "threads": plan.torch_threads, "use_gpu": plan.use_gpu,
    }  # fmt: skip
    t0 = time.perf_counter()
    blob, x_ref, y_ref = ray.put(path.read_bytes()), ray.put(prepared[:n]), ray.put(np.asarray(labels[:n]))
    task = _score_shard.options(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)
    pending = [task.remote(blob, x_ref, y_ref, start, stop, options) for start, stop in shards]
    done: list[dict] = []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            part = ray.get(ready[0])
            done.append(part)
            echo(f"  rows {part['start']}-{part['stop'] - 1} scored in {part['seconds']:.1f}s "
                 f"({len(done)}/{len(shards)})")  # fmt: skip
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VaedistError(f"likelihood evaluation of {uri} failed in a Ray task: {first}") from None
    done.sort(key=lambda p: p["start"])
    scores = {key: np.concatenate([p["scores"][key] for p in done]) for key in done[0]["scores"]}
    seconds = time.perf_counter() - t0

    metrics = likelihood_metrics(scores, cfg.k, num_dims)
    # Numbers on another dataset than the training one, or on part of the test set, must not pose as the
    # model's test numbers: their MLflow names say what they are (test_fashion_mnist_..., test_first500_...).
    prefix = "test_" if dataset == trained_on else f"test_{dataset.replace('-', '_')}_"
    prefix += f"first{n}_" if n < len(labels) else ""
    logged = {prefix + key[len("test_") :]: value for key, value in metrics.items()}
    iw_key = f"test_iw_nll_k{cfg.k}"
    echo(f"  -ELBO        {metrics['test_neg_elbo']:9.2f} nats   {metrics['test_elbo_bits_per_dim']:.4f} bits/dim"
         f"   (recon {metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f})")  # fmt: skip
    echo(f"  IW-NLL k={cfg.k:<4d}{metrics[iw_key]:9.2f} nats   {metrics['test_bits_per_dim']:.4f} bits/dim"
         f"   (+/- {metrics[iw_key + '_stderr']:.2f} std. error over images)   [{seconds:.1f}s]")  # fmt: skip

    result = {
        "model": uri,
        "checkpoint": str(path),
        "dataset": dataset,
        "trained_on": trained_on,
        "images": n,
        "k": cfg.k,
        "seed": cfg.seed,
        "protocol": protocol,
        "likelihood": likelihood_name,
        "conditional": bool(model.conditional),
        "conditioning": conditioning,
        "metrics": metrics,  # test_neg_elbo, test_iw_nll_k<k>, test_bits_per_dim, ...
        "logged_metrics": logged,  # the same under the names logged to MLflow
        "seconds": seconds,
        "run_id": None,
    }
    if run_id is None:
        echo(
            "  not logged to MLflow: a checkpoint path has no run (evaluate a models:/ or runs:/ URI to log)"
        )
        return result
    logger = tracking.RunLogger(run_id, tracking.tracking_uri())
    logger.log_metrics(logged, step=0)
    tag = f"vaedist.eval.likelihood.{dataset}"
    logger.set_tags({
        f"{tag}.protocol": protocol, f"{tag}.conditioning": conditioning,
        f"{tag}.images": n, f"{tag}.seed": cfg.seed, f"{tag}.k": cfg.k,
    })  # fmt: skip
    logger.log_dict(
        {key: value for key, value in result.items() if key != "checkpoint"},
        artifact,
    )
    result["run_id"] = run_id
    echo(f"  logged to MLflow run {run_id} in {tracking.shown_uri()}")
    return result


def likelihood_metrics(scores: dict[str, np.ndarray], k: int, num_dims: int) -> dict[str, float]:
    """Means over images of per-image scores; bits/dim = nats / (D ln 2). ``test_bits_per_dim`` is the
    IW-NLL's (the tighter estimate), ``test_elbo_bits_per_dim`` the bound's."""
    n = len(scores["iw_nll"])
    iw, neg_elbo = float(scores["iw_nll"].mean()), float(scores["neg_elbo"].mean())
    stderr = float(scores["iw_nll"].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "test_neg_elbo": neg_elbo,
        "test_recon": float(scores["recon"].mean()),
        "test_kl": float(scores["kl"].mean()),
        "test_elbo_bits_per_dim": float(bits_per_dim(torch.tensor(neg_elbo, dtype=torch.float64), num_dims)),
        f"test_iw_nll_k{k}": iw,
        f"test_iw_nll_k{k}_stderr": stderr,
        "test_bits_per_dim": float(bits_per_dim(torch.tensor(iw, dtype=torch.float64), num_dims)),
    }


# ==================================================================================================
# Generated Parquet (the contract of DESIGN.md "Generated Parquet"), read with plain pyarrow


@dataclass
class GeneratedSet:
    """A generated folder, read and checked: images uint8 (N, H, W, C), labels int64 (N,)."""

    folder: str
    images: np.ndarray
    labels: np.ndarray
    dataset: str | None
    model_uri: str | None
    model_version: str | None
    model_run_id: str | None
    image_format: str
    manifest: dict = field(default_factory=dict)
    manifest_sha1: str = ""
    label_names: dict[int, list[str]] = field(default_factory=dict)  # label -> the names its rows carry


def _first(mapping: dict, *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value not in (None, ""):
            return value
    return None


def _filesystem(folder: str):
    import pyarrow.fs as pafs

    if "://" in folder:
        try:
            return pafs.FileSystem.from_uri(folder)
        except Exception as exc:  # pyarrow raises several types for unsupported / unreachable URIs
            raise UsageError(f"cannot open generated folder {folder}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(folder).expanduser().resolve())


def _shard_names(manifest: dict) -> list[str] | None:
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return None
    names = []
    for entry in shards:  # {"file": "part-00000.parquet", "rows": ..., "sha256": ...} or a bare name
        name = _first(entry, "file", "path", "name") if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            return None
        names.append(name.rsplit("/", 1)[-1])
    return names


def read_generated(folder: str) -> GeneratedSet:
    """Read a generated folder: checks it is complete (``_manifest.json`` present, listed shards present)
    and non-empty, and decodes the image column (fixed-shape tensor, or PNG bytes)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = _filesystem(folder)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"generated folder {folder} does not exist (write one with vaedist generate)")
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"generated data {folder} is not a folder (pass the folder vaedist generate wrote)")
    entries = {f.base_name for f in fs.get_file_info(pafs.FileSelector(root)) if f.type == pafs.FileType.File}
    parts = sorted(name for name in entries if PART_RE.match(name))
    if MANIFEST not in entries:
        if not parts:
            raise UsageError(
                f"generated folder {folder} is empty: no {MANIFEST} and no part-NNNNN.parquet files"
            )
        raise UsageError(
            f"generated folder {folder} is incomplete: {len(parts)} shard(s) but no {MANIFEST} (written last), "
            "so generation did not finish; rerun the same vaedist generate command to complete it"
        )
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise UsageError(f"{folder}/{MANIFEST} is not a readable manifest ({exc})") from None
    listed = _shard_names(manifest)
    if listed is not None:
        missing = sorted(set(listed) - entries)
        if missing:
            raise UsageError(
                f"generated folder {folder} is incomplete: {MANIFEST} lists {missing[0]} but the file is missing "
                f"({len(missing)} missing)"
            )
        parts = sorted(listed)
    if not parts:
        raise UsageError(f"generated folder {folder} is empty: its manifest lists no shards")

    images, labels, names_seen, formats = [], [], {}, set()
    meta: dict[str, str] = {}
    for name in parts:
        path = f"{root}/{name}"
        try:
            schema = pq.read_schema(path, filesystem=fs)
            missing_cols = [c for c in ("label", "image") if c not in schema.names]
            if missing_cols:
                raise UsageError(
                    f"{folder}/{name} has no {missing_cols[0]!r} column: not vaedist generated data"
                )
            cols = ["label", "image"] + (["label_name"] if "label_name" in schema.names else [])
            table = pq.read_table(path, columns=cols, filesystem=fs)
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            first = first_line(exc)
            raise UsageError(f"{folder}/{name} is not readable Parquet ({first})") from None
        meta = {
            k.decode(errors="replace").removeprefix(META_PREFIX): v.decode(errors="replace")
            for k, v in (schema.metadata or {}).items()
        }
        image_array, fmt = _decode_images(table.column("image"), meta, manifest, f"{folder}/{name}")
        formats.add(fmt)
        images.append(image_array)
        y = table.column("label").to_numpy().astype(np.int64)
        labels.append(y)
        if "label_name" in cols:
            for label, label_name in set(
                zip(y.tolist(), table.column("label_name").to_pylist(), strict=True)
            ):
                names_seen.setdefault(label, set()).add(label_name)
    shapes = {a.shape[1:] for a in images if len(a)}
    if len(shapes) > 1:
        raise UsageError(
            f"generated folder {folder} mixes image shapes {', '.join(_shape(s) for s in sorted(shapes))}"
        )
    all_images = np.concatenate(images) if images else np.zeros((0, 0, 0, 0), np.uint8)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if len(all_labels) == 0:
        raise UsageError(f"generated folder {folder} is empty: its shards hold no rows")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}  # generate.py's manifest
    return GeneratedSet(
        folder=folder,
        images=all_images,
        labels=all_labels,
        dataset=_first(manifest, "dataset") or _first(meta, "dataset"),
        model_uri=_str(_first(model, "uri") or _first(manifest, "model_uri") or _first(meta, "model_uri")),
        model_version=_str(
            _first(model, "version") or _first(manifest, "model_version") or _first(meta, "model_version")
        ),
        model_run_id=_str(_first(model, "run_id")),
        image_format="+".join(sorted(formats)),
        manifest=manifest,
        manifest_sha1=hashlib.sha1(raw).hexdigest(),
        label_names={label: sorted(names) for label, names in names_seen.items()},
    )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _decode_images(column, meta: dict, manifest: dict, where: str) -> tuple[np.ndarray, str]:
    """The image column -> uint8 (N, H, W, C): a fixed-shape tensor (``arrow.fixed_shape_tensor``, or its
    storage list type when the extension is not registered), or PNG bytes (``image_format=png``)."""
    import pyarrow as pa

    declared = (meta.get("image_format") or str(manifest.get("image_format") or "")).lower() or None
    typ = column.type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        if declared not in (None, "png"):
            raise UsageError(
                f"{where}: image column holds bytes but the metadata says image_format={declared}"
            )
        return _decode_pngs(column.to_pylist(), where), "png"
    if declared == "png":
        raise UsageError(f"{where}: metadata says image_format=png but the image column is {typ}")
    chunks = []
    for chunk in column.chunks:
        if isinstance(chunk.type, pa.FixedShapeTensorType):
            arr = chunk.to_numpy_ndarray()  # (n, *shape) in logical (H, W, C) order
        else:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            if not (
                pa.types.is_list(storage.type)
                or pa.types.is_fixed_size_list(storage.type)
                or pa.types.is_large_list(storage.type)
            ):
                raise UsageError(f"{where}: image column of type {typ} is neither a tensor nor PNG bytes")
            shape = _declared_shape(meta, manifest)
            if shape is None:
                raise UsageError(
                    f"{where}: image column of type {typ} has no shape (no image_shape in the manifest)"
                )
            flat = storage.flatten().to_numpy(zero_copy_only=False)
            arr = flat.reshape(len(chunk), *shape)
        chunks.append(arr)
    arr = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 0), np.uint8)
    if arr.dtype != np.uint8:
        raise UsageError(f"{where}: images are {arr.dtype}, expected uint8")
    if arr.ndim == 3:  # (N, H, W): greyscale without a channel axis
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UsageError(f"{where}: images have shape {arr.shape[1:]}, expected H x W x C")
    return arr, "raw"


def _declared_shape(meta: dict, manifest: dict) -> tuple[int, ...] | None:
    shape = manifest.get("image_shape")
    if shape is None and meta.get("image_shape"):  # "28,28,1"
        try:
            shape = [int(d) for d in meta["image_shape"].strip("[]() ").split(",")]
        except ValueError:
            return None
    if isinstance(shape, list | tuple) and all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return None


def _decode_pngs(blobs: list, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = []
    for blob in blobs:
        try:
            img = np.asarray(Image.open(io.BytesIO(blob)))
        except (UnidentifiedImageError, OSError, TypeError):
            raise UsageError(f"{where}: an image is not a readable PNG") from None
        out.append(img[..., None] if img.ndim == 2 else img)
    try:
        return np.stack(out).astype(np.uint8, copy=False) if out else np.zeros((0, 0, 0, 0), np.uint8)
    except ValueError:
        raise UsageError(f"{where}: PNG images of different sizes") from None


def check_generated(gen: GeneratedSet, dataset: str | None) -> str:
    """The dataset to test on, after checking the generated set matches it: image shape, label set
    (every class present, no other), label names, and the manifest's dataset."""
    if dataset and gen.dataset and dataset != gen.dataset:
        raise UsageError(
            f"{gen.folder} was generated for {gen.dataset}, not {dataset} (drop --dataset or fix it)"
        )
    dataset = dataset or gen.dataset
    if dataset is None:
        raise UsageError(f"{gen.folder} does not say which dataset it imitates: pass --dataset")
    spec = get_spec(dataset)
    shape = tuple(gen.images.shape[1:])
    if shape != tuple(spec.image_shape):
        raise UsageError(
            f"generated images in {gen.folder} are {_shape(shape)} but {dataset} images are {_shape(spec.image_shape)}"
        )
    present = sorted(set(np.unique(gen.labels).tolist()))
    if -1 in present:  # generate.py's label for every row of an unconditional model
        raise UsageError(
            f"{gen.folder} holds unlabelled images (label -1: an unconditional model); CAS needs images generated "
            "for given labels, by a 'cvae'"
        )
    outside = [v for v in present if not 0 <= v < spec.num_classes]
    if outside:
        raise UsageError(
            f"generated label {outside[0]} in {gen.folder} is not a {dataset} class (0..{spec.num_classes - 1})"
        )
    absent = sorted(set(range(spec.num_classes)) - set(present))
    if absent:
        raise UsageError(
            f"generated data in {gen.folder} has no images of class(es) {', '.join(map(str, absent))}: CAS needs every "
            f"{dataset} class (0..{spec.num_classes - 1}) so the classifier can predict each"
        )
    for label, names in sorted(gen.label_names.items()):
        if names != [spec.class_names[label]]:
            raise UsageError(
                f"generated label {label} in {gen.folder} is named {', '.join(map(repr, names))} but {dataset} calls "
                f"it {spec.class_names[label]!r} (generated for another dataset?)"
            )
    return dataset


# ==================================================================================================
# CAS: the classifier and its Ray Train loop

CLASSIFIER_VERSION = (
    1  # bump when CASClassifier or its training changes: CAS numbers are only comparable within one
)


class CASClassifier(nn.Module):
    """The one classifier of every CAS number: small, fixed, works for 28x28x1 and 32x32x3.

    ``conv3x3(C->32) ReLU maxpool2 -> conv3x3(32->64) ReLU maxpool2 -> dropout(0.25) ->
    linear(64 * H/4 * W/4 -> 128) ReLU -> dropout(0.5) -> linear(128 -> K)`` (the classic Keras MNIST
    CNN; ~99% on real MNIST with the full train split and 5 epochs). Input: uint8 images scaled to [0, 1].
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        h, w, c = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K) logits


def classifier_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train the CAS classifier (DDP), test it on the real test set.

    ``config``: data refs (train images/labels, test images/labels), image_shape, num_classes, epochs,
    batch_size (global), lr, seed, torch_threads. Rank 0 reports accuracy and the confusion matrix
    (all-reduced over the ranks' test shards) with a small checkpoint, so a rerun of the same name finds
    the finished result and trains nothing.
    """
    import ray.train.torch

    from vaedist.train import is_rank_zero

    if ray.train.get_checkpoint() is not None:
        return  # finished before under this name: Ray Train hands back the reported result
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(ray.get(r))) for r in config["data_refs"])
    k = config["num_classes"]

    loop.seed_everything(config["seed"])  # same init on every rank
    net = ray.train.torch.prepare_model(CASClassifier(tuple(config["image_shape"]), k))
    torch.manual_seed(loop.derive_seed(config["seed"], rank))  # dropout masks differ per rank
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    per_rank_batch = max(1, config["batch_size"] // world)
    t0 = time.perf_counter()
    steps_done = 0
    for epoch in range(config["epochs"]):
        net.train()
        indices = loop.epoch_indices(len(train_x), epoch, config["seed"], rank, world)
        for step in range(len(indices) // per_rank_batch):
            idx = torch.from_numpy(indices[step * per_rank_batch : (step + 1) * per_rank_batch])
            x = to_model_input(train_x[idx]).to(device)  # (B, C, H, W) in [0, 1]
            loss = nn.functional.cross_entropy(net(x), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps_done += 1

    net.eval()
    cm = torch.zeros(k * k, dtype=torch.int64)
    shard = loop.shard_range(len(test_x), rank, world)
    with torch.no_grad():
        for start in range(0, len(shard), 1000):
            idx = torch.from_numpy(shard[start : start + 1000])
            pred = net(to_model_input(test_x[idx]).to(device)).argmax(dim=1).cpu()
            cm += torch.bincount(test_y[idx] * k + pred, minlength=k * k)
    if world > 1:
        cm = cm.to(device)
        torch.distributed.all_reduce(cm)
        cm = cm.cpu()
    cm = cm.view(k, k)
    metrics = {
        "accuracy": float(cm.trace()) / max(1, int(cm.sum())),
        "confusion": cm.tolist(),
        "train_images": len(train_x),
        "steps_per_rank": steps_done,
        "train_seconds": time.perf_counter() - t0,
    }
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if is_rank_zero():
            (Path(d) / "classifier.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="classifier")


@dataclass
class ClassifierResult:
    accuracy: float
    confusion: np.ndarray  # (K, K) counts, rows = true class
    train_images: int
    seconds: float

    @property
    def per_class(self) -> np.ndarray:
        """Accuracy on each true class (recall), (K,)."""
        rows = self.confusion.sum(axis=1)
        return np.divide(np.diag(self.confusion), rows, out=np.zeros(len(rows)), where=rows > 0)


def train_classifier(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    image_shape: tuple[int, int, int],
    num_classes: int,
    cfg: EvaluateConfig,
    plan,
    storage: str,
) -> ClassifierResult:
    """Fit :class:`CASClassifier` on ``train`` with a TorchTrainer (Ray Train DDP), test on ``test``."""
    import ray.train.torch

    t0 = time.perf_counter()
    trainer = ray.train.torch.TorchTrainer(
        classifier_loop_per_worker,
        train_loop_config={
            "data_refs": [ray.put(np.ascontiguousarray(a)) for a in (*train, *test)],
            "image_shape": list(image_shape),
            "num_classes": num_classes,
            "epochs": cfg.classifier_epochs,
            "batch_size": cfg.classifier_batch_size,
            "lr": cfg.classifier_lr,
            "seed": cfg.seed,
            "torch_threads": plan.torch_threads,
        },
        scaling_config=plan.scaling_config(),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first = first_line(exc)
        raise VaedistError(f"CAS classifier {name} failed: {first} (logs under {storage}/{name})") from None
    metrics = result.metrics or {}
    if "confusion" not in metrics:
        raise VaedistError(f"CAS classifier {name} reported no result (see {storage}/{name})")
    return ClassifierResult(
        accuracy=float(metrics["accuracy"]),
        confusion=np.asarray(metrics["confusion"], dtype=np.int64),
        train_images=int(metrics["train_images"]),
        seconds=time.perf_counter() - t0,
    )


CAS_ARTIFACT = "evaluation/cas.json"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def evaluate_cas(cfg: EvaluateConfig, resources: ResourcesConfig, echo=print, reuse: bool = False) -> dict[str, Any]:
    """CAS of ``cfg.generated`` against the real test set, with the real-data ceiling; logged to MLflow."""
    from vaedist.figures import confusion_matrix_image
    from vaedist.train import check_storage_shared, connect_ray, plan_workers, storage_path

    folder = str(cfg.generated)
    gen = read_generated(folder)
    dataset = check_generated(gen, cfg.dataset)
    spec = get_spec(dataset)
    n_gen = len(gen.labels)
    if n_gen < cfg.classifier_batch_size:
        raise UsageError(
            f"{folder} holds {n_gen} images, fewer than one classifier batch ({cfg.classifier_batch_size}): "
            "generate more or lower --batch-size"
        )
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    storage = storage_path(None)

    real_x, real_y = load_split(dataset, "train_full")
    test_x, test_y = load_split(dataset, "test")
    # Same budget for the ceiling: as many real images as generated ones (a seeded random subset of the
    # official train split), or all of them when the generated set is larger.
    n_real = min(n_gen, len(real_y))
    rows = np.sort(np.random.default_rng([cfg.seed, n_real]).choice(len(real_y), n_real, replace=False))
    real_x, real_y = real_x[rows], real_y[rows]

    budget = {
        "epochs": cfg.classifier_epochs, "batch_size": cfg.classifier_batch_size, "lr": cfg.classifier_lr,
        "seed": cfg.seed, "classifier_version": CLASSIFIER_VERSION,
    }  # fmt: skip
    where = str(Path(folder).expanduser().resolve()) if "://" not in folder else folder
    name = f"cas-{Path(where).name}-{_digest({'generated': where, 'manifest': gen.manifest_sha1, **budget})}"
    ceiling_name = f"cas-ceiling-{dataset}-{_digest({'dataset': dataset, 'images': n_real, **budget})}"
    done = tracking.finished_run(dataset, name) if reuse else None
    prior = tracking.load_dict(done.info.run_id, CAS_ARTIFACT) if done is not None else None
    if prior is not None:
        echo(f"CAS of {folder} (same images, same classifier budget) is already on MLflow run {done.info.run_id}: "
             f"reusing it: CAS {prior['cas']:.4f} / real {prior['real_accuracy']:.4f}")  # fmt: skip
        return {**prior, "run_id": done.info.run_id}
    connect_ray(resources.address)
    plan = plan_workers(resources)
    check_storage_shared(storage)  # rank 0's report carries a checkpoint, written where every node can see it
    model_run = gen.model_run_id or (tracking.model_run_id(gen.model_uri) if gen.model_uri else None)
    params = {
        "evaluate.generated": where,
        "evaluate.dataset": dataset,
        "evaluate.seed": cfg.seed,
        "evaluate.classifier_epochs": cfg.classifier_epochs,
        "evaluate.classifier_batch_size": cfg.classifier_batch_size,
        "evaluate.classifier_lr": cfg.classifier_lr,
        "cas.classifier": f"CASClassifier v{CLASSIFIER_VERSION} (2 conv + dropout + 2 linear)",
        "cas.generated_images": n_gen,
        "cas.real_train_images": n_real,
        "cas.test_images": len(test_y),
        "cas.image_format": gen.image_format,
        "generated.model_uri": gen.model_uri or "",
        "generated.model_version": gen.model_version or "",
    }
    run_id = tracking.find_or_create_run(dataset, name, params, kind="evaluate")
    logger = tracking.RunLogger(run_id, uri)
    logger.set_tags({
        "vaedist.model_uri": gen.model_uri or "", "vaedist.model_version": gen.model_version or "",
        "vaedist.model_run_id": model_run or "", "vaedist.generated": where,
        "vaedist.evaluate": "cas", "vaedist.version": __version__,
    })  # fmt: skip
    echo(f"CAS of {folder}: {n_gen} generated images ({gen.image_format}) from {gen.model_uri or 'an unknown model'}, "
         f"tested on {len(test_y)} real {dataset} test images")  # fmt: skip
    echo(f"  classifier CASClassifier v{CLASSIFIER_VERSION}: {cfg.classifier_epochs} epoch(s), batch "
         f"{cfg.classifier_batch_size}, lr {cfg.classifier_lr:g}, seed {cfg.seed}; {plan.workers} worker(s) x "
         f"{plan.cpus_per_worker:g} CPU; MLflow run {run_id} in {tracking.shown_uri(uri)}")  # fmt: skip
    try:
        shape, k = spec.image_shape, spec.num_classes
        synthetic = train_classifier(
            name, (gen.images, gen.labels), (test_x, test_y), shape, k, cfg, plan, storage
        )
        echo(f"  trained on generated  : accuracy {synthetic.accuracy:.4f}  [{synthetic.seconds:.0f}s]")
        real = train_classifier(
            ceiling_name, (real_x, real_y), (test_x, test_y), shape, k, cfg, plan, storage
        )
        echo(f"  trained on real ({n_real}): accuracy {real.accuracy:.4f}  [{real.seconds:.0f}s]")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    ratio = synthetic.accuracy / real.accuracy if real.accuracy > 0 else float("nan")
    metrics = {"cas": synthetic.accuracy, "cas_real_accuracy": real.accuracy, "cas_ratio": ratio}
    for i in range(k):
        metrics[f"cas_class_{i}"] = float(synthetic.per_class[i])
        metrics[f"cas_real_class_{i}"] = float(real.per_class[i])
    logger.log_metrics(metrics, step=0)
    names = list(spec.class_names)
    logger.log_image(
        "cas_confusion_matrix",
        confusion_matrix_image(
            synthetic.confusion, names, title=f"CAS: trained on generated, tested on real {dataset}"
        ),
        step=0,
    )
    logger.log_image(
        "cas_real_confusion_matrix",
        confusion_matrix_image(
            real.confusion, names, title=f"ceiling: trained on {n_real} real {dataset} images"
        ),
        step=0,
    )
    result = {
        "generated": where,
        "dataset": dataset,
        "model_uri": gen.model_uri,
        "model_version": gen.model_version,
        "generated_images": n_gen,
        "real_train_images": n_real,
        "test_images": int(len(test_y)),
        "cas": synthetic.accuracy,
        "real_accuracy": real.accuracy,
        "ratio": ratio,
        "per_class": {names[i]: float(synthetic.per_class[i]) for i in range(k)},
        "real_per_class": {names[i]: float(real.per_class[i]) for i in range(k)},
        "confusion": synthetic.confusion.tolist(),
        "real_confusion": real.confusion.tolist(),
        "budget": budget,
        "run_id": run_id,
    }
    logger.log_dict({key: v for key, v in result.items() if key != "run_id"}, CAS_ARTIFACT)
    tracking.end_run(run_id, "FINISHED")
    echo(f"  CAS {synthetic.accuracy:.4f} / real {real.accuracy:.4f} = {ratio:.3f}")
    echo("  per class: " + "  ".join(f"{names[i]}={synthetic.per_class[i]:.2f}" for i in range(k)))
    return result
