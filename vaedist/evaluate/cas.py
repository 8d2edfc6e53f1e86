"""Classification Accuracy Score of generated data (``vaedist evaluate cas``), Ravuri & Vinyals 2019.

One fixed classifier (:class:`CASClassifier`) is trained on the generated images only (in one Ray task
on one worker, with Ray Train DDP on several) and tested on the real test set; its accuracy is the CAS.
The same classifier with the same budget (epochs, batch size, lr, seed *and* number of training images:
a seeded random subset of the real training split as large as the generated set, or all of it if the
generated set is larger) trained on real images gives the ceiling. Reported: CAS, ceiling, CAS / ceiling, per-class accuracy (recall of each true class), and
the confusion matrix, logged to an MLflow run of kind ``evaluate`` in ``vaedist/<dataset>`` tagged with
the generating model (by :mod:`vaedist.evaluate.entry`). Why a task on one worker, Ray Train on several
and Ray tasks for the likelihood: :mod:`vaedist.evaluate.spread`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedist import console, loop
from vaedist.config import EvaluateConfig
from vaedist.data import get_spec, load_split
from vaedist.errors import UsageError, VaedistError, first_line
from vaedist.evaluate import spread
from vaedist.evaluate.sets import read_set
from vaedist.generate.format import UNCONDITIONAL_LABEL, shape_text
from vaedist.generate.reader import GeneratedSet
from vaedist.models import to_model_input

# Bump when CASClassifier or its training changes: CAS numbers are only comparable within one version.
CLASSIFIER_VERSION = 1
CAS_ARTIFACT = "evaluation/cas.json"
TEST_BATCH = 1000  # test images per forward pass when counting the confusion matrix
RESULT_FILE = "classifier.json"  # a finished classifier's report, under <storage>/<run name>/classifier/


def matching_dataset(gen: GeneratedSet, dataset: str | None):
    """(the dataset a set is judged against: the given one, else its manifest's; its spec), after checking
    the two agree and the images have the dataset's shape. CAS and the audit both start here."""
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
            f"generated images in {gen.folder} are {shape_text(shape)} but {dataset} images are {shape_text(spec.image_shape)}"
        )
    return dataset, spec


def check_generated(gen: GeneratedSet, dataset: str | None) -> str:
    """The dataset to test on, after checking the generated set matches it: image shape, label set
    (every class present, no other), label names, and the manifest's dataset."""
    dataset, spec = matching_dataset(gen, dataset)
    present = sorted(set(np.unique(gen.labels).tolist()))
    if UNCONDITIONAL_LABEL in present:
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


# --------------------------------------------------------------------------------------------------
# The classifier and its Ray Train loop


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


def _train_epochs(net, train_x: torch.Tensor, train_y: torch.Tensor, config: dict, rank: int, world: int,
                  device) -> int:  # fmt: skip
    """This rank's share of every epoch (the DistributedSampler scheme); returns its optimizer steps."""
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    per_rank_batch = max(1, config["batch_size"] // world)
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
    return steps_done


def _confusion(
    net, test_x: torch.Tensor, test_y: torch.Tensor, k: int, rank: int, world: int, device
) -> torch.Tensor:
    """(K, K) counts, rows = true class, over the whole test set: each rank counts its shard, all-reduced."""
    net.eval()
    cm = torch.zeros(k * k, dtype=torch.int64)  # flat (K * K,): index true * K + predicted
    shard = loop.shard_range(len(test_x), rank, world)
    with torch.no_grad():
        for start in range(0, len(shard), TEST_BATCH):
            idx = torch.from_numpy(shard[start : start + TEST_BATCH])
            pred = net(to_model_input(test_x[idx]).to(device)).argmax(dim=1).cpu()  # (B,)
            cm += torch.bincount(test_y[idx] * k + pred, minlength=k * k)
    if world > 1:
        cm = cm.to(device)
        torch.distributed.all_reduce(cm)
        cm = cm.cpu()
    return cm.view(k, k)


@dataclass
class WorkerFit:
    """One rank's CAS classifier, trained and tested: the model (DDP-wrapped when world > 1), the test
    confusion matrix (K, K) all-reduced over the ranks, this rank's optimizer steps, the seconds it took."""

    net: torch.nn.Module
    confusion: torch.Tensor
    steps: int
    seconds: float


def fit_classifier(config: dict[str, Any], rank: int, world: int, device, wrap) -> WorkerFit:
    """The CAS recipe on one rank of ``world``: seeded init, ``wrap`` (DDP, or moving to ``device``),
    :func:`_train_epochs`, then the test confusion. ``config``: data refs (train images/labels, test
    images/labels), image_shape, num_classes, epochs, batch_size (global), lr, seed, torch_threads. CAS
    and the audit's feature extractor both train here."""
    import ray

    console.quiet_worker_console()
    torch.set_num_threads(config["torch_threads"])
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(ray.get(r))) for r in config["data_refs"])
    loop.seed_everything(config["seed"])  # same init on every rank
    net = wrap(CASClassifier(tuple(config["image_shape"]), config["num_classes"]))
    torch.manual_seed(loop.derive_seed(config["seed"], rank))  # dropout masks differ per rank
    t0 = time.perf_counter()
    steps = _train_epochs(net, train_x, train_y, config, rank, world, device)
    cm = _confusion(net, test_x, test_y, config["num_classes"], rank, world, device)
    return WorkerFit(net, cm, steps, time.perf_counter() - t0)


def fit_on_worker(config: dict[str, Any]) -> WorkerFit:
    """:func:`fit_classifier` on a Ray Train worker: its rank, world, device, and DDP."""
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    return fit_classifier(config, rank, world, ray.train.torch.get_device(), ray.train.torch.prepare_model)


def fit_in_task(config: dict[str, Any]) -> WorkerFit:
    """:func:`fit_classifier` alone in a Ray task (one worker): the GPU where the task holds one."""
    device = torch.device("cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu")
    return fit_classifier(config, 0, 1, device, lambda net: net.to(device))


def accuracy_of(cm: torch.Tensor) -> float:
    """Test accuracy from a (K, K) confusion matrix."""
    return float(cm.trace()) / max(1, int(cm.sum()))


def _report(fit: WorkerFit, config: dict[str, Any]) -> dict[str, Any]:
    """What a CAS classifier reports: test accuracy, confusion, its budget's facts."""
    import ray

    cm = fit.confusion
    return {
        "accuracy": accuracy_of(cm),
        "confusion": cm.tolist(),
        "train_images": len(ray.get(config["data_refs"][1])),
        "steps_per_rank": fit.steps,
        "train_seconds": fit.seconds,
    }


def classifier_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train the CAS classifier (DDP), test it on the real test set.

    ``config``: as :func:`fit_classifier`'s. Rank 0 reports accuracy and the confusion matrix
    (all-reduced over the ranks' test shards) with a small checkpoint, so a rerun of the same name finds
    the finished result and trains nothing.
    """
    import ray.train

    from vaedist.worker import is_rank_zero

    if ray.train.get_checkpoint() is not None:
        return  # finished before under this name: Ray Train hands back the reported result
    metrics = _report(fit_on_worker(config), config)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if is_rank_zero():
            (Path(d) / RESULT_FILE).write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=spread.RESULT_DIR)


def classifier_task(config: dict[str, Any]) -> dict[str, Any]:
    """The CAS classifier on one worker, as a Ray task (:func:`vaedist.evaluate.spread.on_one_worker`)."""
    return _report(fit_in_task(config), config)


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
    """Fit :class:`CASClassifier` on ``train``, test on ``test``: on one worker as a Ray task, on several
    with a TorchTrainer (Ray Train DDP); a result kept under ``name`` is handed back (why:
    :mod:`vaedist.evaluate.spread`)."""
    t0 = time.perf_counter()
    kept = spread.kept(storage, name, RESULT_FILE)  # written by either path when a fit of ``name`` finished
    if kept is not None:
        metrics = json.loads(kept)
    else:
        config = classifier_config(train, test, image_shape, num_classes, cfg, plan)
        fit = fit_one_worker if plan.workers == 1 else fit_ray_train
        metrics = fit(name, config, plan, storage)
    return ClassifierResult(
        accuracy=float(metrics["accuracy"]),
        confusion=np.asarray(metrics["confusion"], dtype=np.int64),
        train_images=int(metrics["train_images"]),
        seconds=time.perf_counter() - t0,
    )


def classifier_config(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], image_shape: tuple[int, int, int],
    num_classes: int, cfg: EvaluateConfig, plan,
) -> dict[str, Any]:  # fmt: skip
    """What a classifier fit reads (:func:`fit_classifier`): the arrays shared through the object store once."""
    return {
        "data_refs": spread.share(*train, *test),
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "epochs": cfg.classifier_epochs,
        "batch_size": cfg.classifier_batch_size,
        "lr": cfg.classifier_lr,
        "seed": cfg.seed,
        "torch_threads": plan.torch_threads,
        "use_gpu": plan.use_gpu,
    }


def fit_one_worker(name: str, config: dict[str, Any], plan, storage: str) -> dict[str, Any]:
    """The classifier fitted in one Ray task; its result kept where Ray Train's checkpoint of ``name`` is."""
    metrics = spread.on_one_worker(classifier_task, config, plan, f"CAS classifier {name} failed")
    spread.keep(storage, name, RESULT_FILE, json.dumps(metrics).encode())
    return metrics


def fit_ray_train(name: str, config: dict[str, Any], plan, storage: str) -> dict[str, Any]:
    """The classifier fitted by a TorchTrainer over the plan's workers (DDP); Ray Train resumes ``name``."""
    import ray.train.torch

    trainer = ray.train.torch.TorchTrainer(
        classifier_loop_per_worker,
        train_loop_config=config,
        scaling_config=plan.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            # Ray Train's own INFO lines to its log files unless -v (vaedist.console)
            logging_config=console.train_logging_config(),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first = first_line(exc)
        raise VaedistError(f"CAS classifier {name} failed: {first} (logs under {storage}/{name})") from None
    metrics = result.metrics or {}
    if "confusion" not in metrics:
        raise VaedistError(f"CAS classifier {name} reported no result (see {storage}/{name})")
    return metrics


# --------------------------------------------------------------------------------------------------
# The measure: read and check, set up, train both classifiers; vaedist.evaluate.entry records it


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class CasSetup:
    """One CAS evaluation, checked, with its data and run names; nothing started yet."""

    folder: str  # as given
    where: str  # the folder's canonical location (an absolute path, or the URI)
    gen: GeneratedSet
    dataset: str
    real: tuple[np.ndarray, np.ndarray]  # the ceiling's training images (n_real, H, W, C) and labels
    test: tuple[np.ndarray, np.ndarray]  # the real test set
    budget: dict[str, Any]
    name: str  # Ray Train run of the classifier on generated data, and the MLflow run's name
    ceiling_name: str  # Ray Train run of the classifier on real data (shared by every folder of a dataset)

    @property
    def n_real(self) -> int:
        return len(self.real[1])


def read_checked(cfg: EvaluateConfig) -> tuple[GeneratedSet, str]:
    """The generated set and the dataset it is tested on, after every check (before anything else loads)."""
    folder = str(cfg.generated)
    gen = read_set(folder)  # a vaedist folder, or another generator's labelled Parquet table
    dataset = check_generated(gen, cfg.dataset)
    if len(gen.labels) < cfg.classifier_batch_size:
        raise UsageError(
            f"{folder} holds {len(gen.labels)} images, fewer than one classifier batch ({cfg.classifier_batch_size}): "
            "generate more or lower --batch-size"
        )
    return gen, dataset


def set_up(cfg: EvaluateConfig, gen: GeneratedSet, dataset: str) -> CasSetup:
    """The real data (a training subset as large as the generated set, the test set), budget and run names."""
    folder = str(cfg.generated)
    real_x, real_y = load_split(dataset, "train_full")
    test = load_split(dataset, "test")
    # Same budget for the ceiling: as many real images as generated ones (a seeded random subset of the
    # official train split), or all of them when the generated set is larger.
    n_real = min(len(gen.labels), len(real_y))
    rows = np.sort(np.random.default_rng([cfg.seed, n_real]).choice(len(real_y), n_real, replace=False))
    budget = {
        "epochs": cfg.classifier_epochs, "batch_size": cfg.classifier_batch_size, "lr": cfg.classifier_lr,
        "seed": cfg.seed, "classifier_version": CLASSIFIER_VERSION,
    }  # fmt: skip
    where = str(Path(folder).expanduser().resolve()) if "://" not in folder else folder
    return CasSetup(
        folder=folder, where=where, gen=gen, dataset=dataset, real=(real_x[rows], real_y[rows]), test=test,
        budget=budget,
        name=f"cas-{Path(where).name}-{_digest({'generated': where, 'manifest': gen.manifest_sha1, **budget})}",
        ceiling_name=f"cas-ceiling-{dataset}-{_digest({'dataset': dataset, 'images': n_real, **budget})}",
    )  # fmt: skip


def train_both(
    s: CasSetup, cfg: EvaluateConfig, plan, storage: str, echo
) -> tuple[ClassifierResult, ClassifierResult]:
    """(the classifier trained on generated images, the same trained on real ones), both tested on real."""
    spec = get_spec(s.dataset)
    shape, k = spec.image_shape, spec.num_classes
    gen = (s.gen.images, s.gen.labels)
    synthetic = train_classifier(s.name, gen, s.test, shape, k, cfg, plan, storage)
    echo(f"  trained on generated  : accuracy {synthetic.accuracy:.4f}  [{synthetic.seconds:.0f}s]")
    real = train_classifier(s.ceiling_name, s.real, s.test, shape, k, cfg, plan, storage)
    echo(f"  trained on real ({s.n_real}): accuracy {real.accuracy:.4f}  [{real.seconds:.0f}s]")
    return synthetic, real


def cas_result(
    s: CasSetup, synthetic: ClassifierResult, real: ClassifierResult, run_id: str
) -> dict[str, Any]:
    """What a CAS evaluation reports (and keeps as its MLflow artifact, without the run id)."""
    names, k = list(get_spec(s.dataset).class_names), len(synthetic.confusion)
    ratio = synthetic.accuracy / real.accuracy if real.accuracy > 0 else float("nan")
    return {
        "generated": s.where,
        "dataset": s.dataset,
        "model_uri": s.gen.model_uri,
        "model_version": s.gen.model_version,
        "generated_images": len(s.gen.labels),
        "real_train_images": s.n_real,
        "test_images": int(len(s.test[1])),
        "cas": synthetic.accuracy,
        "real_accuracy": real.accuracy,
        "ratio": ratio,
        "per_class": {names[i]: float(synthetic.per_class[i]) for i in range(k)},
        "real_per_class": {names[i]: float(real.per_class[i]) for i in range(k)},
        "confusion": synthetic.confusion.tolist(),
        "real_confusion": real.confusion.tolist(),
        "budget": s.budget,
        "run_id": run_id,
    }
