"""Typed, frozen configuration, validated on creation.

YAML lives only at the edge (job specs under ``jobs/``); everything inside vaedist passes these
dataclasses around. ``flatten`` turns a config into ``{"model.latent_dim": 16, ...}`` for
``mlflow.log_params`` and for Tune search spaces; ``from_flat`` goes back.

Every invalid value raises a one-line :class:`ConfigError` that names the field and what is allowed;
the CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from vaedist.choices import (  # the vocabularies: named here too for the CLI and the jobs
    ACTIVATIONS,
    ARCHS,
    CONDITIONINGS,
    IMAGE_FORMATS,
    LIKELIHOODS,
    PRECISIONS,
    VARIANTS,
)
from vaedist.data.builtin import DATASETS
from vaedist.data.sources import absolute, is_path
from vaedist.data.spec import PATH_LIKELIHOOD, parse_bytes
from vaedist.errors import UsageError
from vaedist.names import VAL_METRIC

__all__ = ["ACTIVATIONS", "ARCHS", "CONDITIONINGS", "DATASET_NAMES", "IMAGE_FORMATS", "LIKELIHOODS", "PRECISIONS",
           "VARIANTS", "parse_bytes"]  # fmt: skip

DATASET_NAMES = tuple(DATASETS)  # built-in datasets: vaedist.data.builtin


def default_help(cls: type, name: str) -> str:
    """``[default: X]`` of a --help text, read from the config dataclass's own field, so that a default has
    one home (the CLI states it, the dataclass decides it)."""
    value = next(f.default for f in fields(cls) if f.name == name)
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"[default: {shown}]"


class ConfigError(UsageError):
    """An invalid configuration value: one line naming the field and the allowed values."""


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _check_choice(value: Any, allowed: tuple, where: str) -> None:
    _check(value in allowed, where, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _check_int(value: Any, where: str, minimum: int) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        where,
        f"must be an integer >= {minimum}, got {value!r}",
    )


def _check_ints(cfg: Any, section: str, minimums: dict[str, int]) -> None:
    """``_check_int`` of each named field of a config section against its minimum, in order."""
    for name, minimum in minimums.items():
        _check_int(getattr(cfg, name), f"{section}.{name}", minimum)


def _check_float(value: Any, where: str, minimum: float, *, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    _check(ok, where, f"must be a number {'>' if strict else '>='} {minimum}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, and how the validation split is carved."""

    dataset: str = "mnist"
    # None: $VAEDIST_DATA_DIR or the user cache dir (see vaedist.data.default_data_dir).
    data_dir: str | None = None
    # Images carved deterministically from the official train split for validation.
    val_size: int = 5000
    # Decoded train split larger than this streams through Ray Data instead of sitting in the object
    # store whole: "512MB", "2GiB", bytes; None: half of the cluster's object store memory.
    memory_budget: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str) and is_path(self.dataset):
            # the same folder from any working directory (Ray workers, a later generate); options checked
            object.__setattr__(self, "dataset", absolute(self.dataset))
        else:
            _check(self.dataset in DATASET_NAMES, "data.dataset", f"{self.dataset!r} is neither a built-in dataset "
                   f"({', '.join(DATASET_NAMES)}) nor an image folder or Parquet table here")  # fmt: skip
        _check_int(self.val_size, "data.val_size", 1)
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except ValueError as exc:
                raise ConfigError(f"data.memory_budget: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Model family and size. The knobs Tune searches are width, base_channels, depth, latent_dim, and the
    hierarchy (stochastic_layers, latent_channels), residual blocks and the mixture size."""

    variant: str = "cvae"  # ae (plain autoencoder + latent noise) | vae | cvae (label-conditioned)
    arch: str = "conv"  # dense (MLP) | conv (strided conv / transposed conv) | resnet (residual blocks)
    latent_dim: int = 16  # the (top) latent z
    width: int = 512  # dense: hidden units per layer
    base_channels: int = 32  # conv, resnet: channels of the first block, doubled per block
    # dense: hidden layers; conv, resnet: stride-2 halvings (image side must divide by 2**depth)
    depth: int = 2
    # None: the dataset's default (bernoulli for MNIST, discretized logistic for colour / grey levels).
    likelihood: str | None = None
    latent_noise: float = 0.1  # ae only: std of Gaussian noise added to the code during training
    conditioning: str = "onehot"  # cvae: how the label enters encoder and decoder
    activation: str = "relu"  # the networks' nonlinearity
    blocks_per_level: int = 2  # resnet: residual blocks at each resolution
    # vae, cvae: latent layers; > 1 = hierarchical VAE (top-down inference), at most depth + 1
    stochastic_layers: int = 1
    latent_channels: int = 4  # hierarchical: channels of each latent map below the top latent
    mixtures: int = 10  # mol: logistic components per pixel (Salimans et al. 2017)

    def __post_init__(self) -> None:
        _check_choice(self.variant, VARIANTS, "model.variant")
        _check_choice(self.arch, ARCHS, "model.arch")
        _check_ints(self, "model", {"latent_dim": 1, "width": 1, "base_channels": 1, "depth": 1})
        if self.likelihood is not None:
            _check_choice(self.likelihood, LIKELIHOODS, "model.likelihood")
        _check_float(self.latent_noise, "model.latent_noise", 0.0)
        _check_choice(self.conditioning, CONDITIONINGS, "model.conditioning")
        _check_choice(self.activation, ACTIVATIONS, "model.activation")
        _check_ints(self, "model", {
            "blocks_per_level": 1, "latent_channels": 1, "mixtures": 1, "stochastic_layers": 1,
        })
        if self.stochastic_layers > 1:
            _check(self.variant != "ae", "model.stochastic_layers",
                   "a hierarchy of latents needs variant vae or cvae (an autoencoder has no posterior)")  # fmt: skip
            _check(self.stochastic_layers <= self.depth + 1, "model.stochastic_layers",
                   f"{self.stochastic_layers} layers need depth >= {self.stochastic_layers - 1} (one latent "
                   f"layer per level below the top), got depth {self.depth}")  # fmt: skip

    @property
    def conditional(self) -> bool:
        return self.variant == "cvae"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: how long, how fast, and the ELBO's knobs."""

    epochs: int = 10
    batch_size: int = 128  # global: split evenly across workers
    lr: float = 1e-3
    beta: float = 1.0  # weight of the KL term (beta-VAE); 1.0 is the true ELBO
    kl_warmup_epochs: int = 0  # linearly ramp beta from 0 over this many epochs (Bowman et al. 2016)
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised (Kingma et al. 2016)
    seed: int = 0
    image_every: int = 1  # log pictures every k epochs (and always after the last)
    checkpoints_to_keep: int = 2  # best N checkpoints by validation loss
    max_failures: int = 1  # worker-group restarts from the last checkpoint before the run fails
    # auto: bf16 autocast on a CUDA device that supports it, float32 elsewhere; bf16; fp32. The ELBO's
    # sums stay float32 either way.
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check_choice(self.precision, PRECISIONS, "train.precision")
        _check_ints(self, "train", {"epochs": 1, "batch_size": 1})
        _check_float(self.lr, "train.lr", 0.0, strict=True)
        _check_float(self.beta, "train.beta", 0.0)
        _check_int(self.kl_warmup_epochs, "train.kl_warmup_epochs", 0)
        _check_float(self.free_bits, "train.free_bits", 0.0)
        _check_ints(self, "train", {"seed": 0, "image_every": 1, "checkpoints_to_keep": 1, "max_failures": 0})


@dataclass(frozen=True)
class ResourcesConfig:
    """Where and how wide a job runs. Local Ray is started in-process when no address is given."""

    workers: int = 1
    # None: one GPU per worker where the cluster has a GPU for every worker (GPUs where present), else 0.
    gpus_per_worker: float | None = None
    # None: derived from the cluster (all CPUs of the node split across workers).
    cpus_per_worker: float | None = None
    address: str | None = None  # None: $RAY_ADDRESS, else local Ray in-process
    # > 0 on an autoscaling cluster: request missing CPUs/GPUs from the autoscaler and wait this long
    # before giving up (0: fail at once if the cluster cannot hold the job).
    scale_timeout_s: float = 0.0
    # What the job's driver process itself reserves under `vaedist submit` (Ray Jobs API entrypoint).
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    def __post_init__(self) -> None:
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            if getattr(self, name) is not None:
                _check_float(getattr(self, name), f"resources.{name}", 0.0)
        _check_int(self.workers, "resources.workers", 1)
        _check_float(self.scale_timeout_s, "resources.scale_timeout_s", 0.0)
        if self.gpus_per_worker is not None:
            _check_float(self.gpus_per_worker, "resources.gpus_per_worker", 0.0)
        if self.cpus_per_worker is not None:
            _check_float(self.cpus_per_worker, "resources.cpus_per_worker", 0.0, strict=True)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        # A built-in dataset's facts are constants (vaedist.data.builtin): checked here, reading nothing. A
        # path dataset's are checked by the driver (check_dataset), since learning them lists the data.
        spec = DATASETS.get(self.data.dataset)
        problem = spec and dataset_problem(self, spec.name, spec.image_shape, spec.num_classes, False)
        if problem:
            raise ConfigError(problem)

    @property
    def likelihood(self) -> str:
        """The likelihood in force: the model's, or the dataset's default (a built-in dataset's own; a path
        dataset's: ``PATH_LIKELIHOOD``). Reads no data."""
        if self.model.likelihood:
            return self.model.likelihood
        return DATASETS[self.data.dataset].default_likelihood if self.data.dataset in DATASETS else PATH_LIKELIHOOD

    def flatten(self) -> dict[str, Any]:
        return flatten(self)

    def replace(self, **flat: Any) -> ExperimentConfig:
        """A copy with dotted keys replaced, e.g. ``cfg.replace(**{"model.latent_dim": 8})``."""
        return from_flat({**flatten(self), **flat})


def _max_depth(h: int, w: int) -> int:
    depth = 0
    while h % 2 ** (depth + 1) == 0 and w % 2 ** (depth + 1) == 0:
        depth += 1
    return depth


def dataset_problem(cfg: ExperimentConfig, name: str, image_shape: tuple[int, int, int], num_classes: int,
                    from_path: bool) -> str | None:  # fmt: skip
    """What makes ``cfg`` unfit for its dataset's facts (one line naming the field), or None. Pure: the
    facts come from :func:`check_dataset`."""
    h, w, c = image_shape
    if cfg.model.arch in ("conv", "resnet"):
        side = 2**cfg.model.depth
        near = "x".join(str(max(side, round(d / side) * side)) for d in (h, w))  # the nearest that works
        resize = f", or --image-size {near}" if from_path else ""
        if h % side or w % side:
            return (f"model.depth: {cfg.model.depth} stride-2 blocks need an image side divisible by {side}, "
                    f"but {name} is {h}x{w} (use depth <= {_max_depth(h, w)}{resize})")  # fmt: skip
    if cfg.model.conditional and num_classes == 0:
        return f"model.variant: cvae needs labelled images, but {name} has none (no class folders): use vae or ae"
    if cfg.model.likelihood == "bernoulli" and c == 3:
        return ("model.likelihood: 'bernoulli' needs black-and-white images; use 'logistic' or 'gaussian' "
                f"for {cfg.data.dataset}")  # fmt: skip
    return None


def check_dataset(cfg: ExperimentConfig) -> None:
    """The cross-checks of a training config against its dataset (image shape against the architecture,
    classes against the variant, channels against the likelihood): ConfigError (exit 2) in one line.

    Run once, by the driver of the command that trains (before Ray starts), never by building a config:
    for a path dataset this lists it and may decode it (``vaedist.data.get_spec``), which a worker or a
    Tune trial that rebuilds the config must not repeat."""
    from vaedist.data.registry import get_spec

    spec = get_spec(cfg.data.dataset)
    problem = dataset_problem(cfg, spec.name, spec.image_shape, spec.num_classes, spec.from_path)
    if problem:
        raise ConfigError(problem)


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune search over ExperimentConfig keys, with ASHA stopping weak trials early.

    ``search_space`` maps dotted config keys to one distribution each, e.g.
    ``{"model.latent_dim": {"choice": [8, 16, 32]}, "train.lr": {"loguniform": [3e-4, 3e-3]}}``.
    """

    search_space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 8  # trials drawn (times each grid point)
    metric: str = VAL_METRIC
    mode: str = "min"
    max_concurrent_trials: int | None = None  # None: as many as the cluster's resources allow
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 3  # ASHA: keep the best 1/reduction_factor at each rung
    seed: int = 0  # the search's own sampling seed

    def __post_init__(self) -> None:
        _check(isinstance(self.search_space, dict) and len(self.search_space) > 0,
               "tune.search_space", "is empty: give at least one key, e.g. model.latent_dim: {choice: [8, 16]}")  # fmt: skip
        valid = set(flatten(ExperimentConfig()))
        for key, dist in self.search_space.items():
            where = f"tune.search_space.{key}"
            _check(key in valid and not key.startswith(("resources.", "data.")), where,
                   "is not a searchable key (model.* or train.*, e.g. model.latent_dim, train.lr)")  # fmt: skip
            _check(isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS, where,
                   f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")  # fmt: skip
            kind, args = next(iter(dist.items()))
            _check(isinstance(args, list) and len(args) > 0, where, f"{kind} needs a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                _check(len(args) == 2 and all(isinstance(a, int | float) for a in args) and args[0] < args[1],
                       where, f"{kind} needs [low, high] with low < high, got {args!r}")  # fmt: skip
                if kind == "loguniform":
                    _check(args[0] > 0, where, "loguniform needs low > 0")
        _check_int(self.num_samples, "tune.num_samples", 1)
        _check_choice(self.mode, ("min", "max"), "tune.mode")
        if self.max_concurrent_trials is not None:
            _check_int(self.max_concurrent_trials, "tune.max_concurrent_trials", 1)
        _check_ints(self, "tune", {"grace_period": 1, "reduction_factor": 2, "seed": 0})


@dataclass(frozen=True)
class GenerateConfig:
    """A synthetic dataset: which model, which labels, how many, where (``vaedist generate``)."""

    model: str = "models:/vaedist-mnist@champion"  # models:/name@alias, models:/name/version, runs:/..., or a checkpoint
    out: str = "out/synthetic"  # a folder or s3://... prefix; one folder per generation run
    labels: tuple[int, ...] | None = None  # None: every class of the dataset
    per_label: int | None = None  # rows per label (exclusive with total)
    total: int | None = None  # rows in all, split by class_balance
    class_balance: str = "uniform"  # uniform | as-train (the real train split's class frequencies)
    shard_rows: int = 10000  # rows per shard file (data/train-NNNNN-of-NNNNN.parquet)
    image_format: str = "png"  # one of IMAGE_FORMATS
    temperature: float = 1.0  # z ~ N(0, T^2 I)
    seed: int = 0
    batch_size: int = 1024  # decoder batch per actor call
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), "generate.model", "a model URI or checkpoint path is required")
        _check(isinstance(self.out, str) and bool(self.out), "generate.out", "an output folder is required")
        if self.labels is not None:
            _check(
                isinstance(self.labels, tuple | list) and len(self.labels) > 0
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.labels)
                and len(set(self.labels)) == len(self.labels),
                "generate.labels", f"must be distinct class indices >= 0 or 'all', got {self.labels!r}",
            )  # fmt: skip
            object.__setattr__(self, "labels", tuple(self.labels))
        _check(
            (self.per_label is None) != (self.total is None),
            "generate.per_label",
            "give exactly one of per_label (rows per label) or total (rows in all)",
        )
        if self.per_label is not None:
            _check_int(self.per_label, "generate.per_label", 1)
        if self.total is not None:
            _check_int(self.total, "generate.total", 1)
        _check_choice(self.class_balance, ("uniform", "as-train"), "generate.class_balance")
        _check_int(self.shard_rows, "generate.shard_rows", 1)
        _check_choice(self.image_format, IMAGE_FORMATS, "generate.image_format")
        _check_float(self.temperature, "generate.temperature", 0.0, strict=True)
        _check_ints(self, "generate", {"seed": 0, "batch_size": 1})


@dataclass(frozen=True)
class EvaluateConfig:
    """How good a model and its synthetic data are (``vaedist evaluate likelihood|cas``)."""

    model: str | None = None  # likelihood: the model to score on the real test set
    generated: str | None = None  # cas: a generated Parquet folder (with _manifest.json)
    dataset: str | None = None  # None: the model's / the generated data's dataset
    k: int = 1000  # importance samples for the IW-NLL (Burda et al. 2016)
    k_batch: int = 100  # importance samples per forward pass (bounds memory)
    batch_size: int = 100  # test images per forward pass
    seed: int = 0  # fixes the dynamic binarization of the test set and the z draws
    classifier_epochs: int = 5  # CAS: same budget for the synthetic-data and the real-data classifier
    classifier_batch_size: int = 256
    classifier_lr: float = 1e-3
    # audit (fidelity, diversity, memorization): run beside CAS when true; ``vaedist evaluate audit`` runs it alone
    audit: bool = False
    audit_k: int = 5  # nearest neighbours of the precision / recall / density / coverage balls
    audit_features: str | None = None  # a torch.export / TorchScript feature extractor; None: the CAS classifier's
    allow_other_data: bool = False  # score a model on data whose fingerprint differs from its training data's

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str) and is_path(self.dataset):  # a path dataset, as DataConfig takes it
            object.__setattr__(self, "dataset", absolute(self.dataset))
        elif self.dataset is not None:
            _check(self.dataset in DATASET_NAMES, "evaluate.dataset", f"{self.dataset!r} is neither a built-in "
                   f"dataset ({', '.join(DATASET_NAMES)}) nor an image folder or Parquet table here")  # fmt: skip
        _check(isinstance(self.audit, bool), "evaluate.audit", f"must be true or false, got {self.audit!r}")
        _check_ints(self, "evaluate", {
            "audit_k": 1, "k": 1, "k_batch": 1, "batch_size": 1, "seed": 0, "classifier_epochs": 1,
            "classifier_batch_size": 1,
        })
        _check_float(self.classifier_lr, "evaluate.classifier_lr", 0.0, strict=True)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "resources": ResourcesConfig,
}


def section_from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build one config section, rejecting unknown keys by name."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values, got {type(values).__name__}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return cls(**values)


def tune_config_from_section(section: dict[str, Any] | None) -> TuneConfig:
    if not section:
        raise ConfigError("tune: the spec has no 'tune' section with a search_space")
    return section_from_dict(TuneConfig, section, "tune")


def experiment_from_dict(d: dict[str, Any] | None) -> ExperimentConfig:
    d = d or {}
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    return ExperimentConfig(**{name: section_from_dict(cls, d.get(name), name) for name, cls in SECTIONS.items()})


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses to ``{"section.key": value}`` (params for MLflow, keys for Tune)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def from_flat(flat: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`flatten` for an ExperimentConfig."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, sep, name = key.partition(".")
        if not sep:
            raise ConfigError(f"{key}: expected a dotted key 'section.field' (sections: {', '.join(SECTIONS)})")
        nested.setdefault(section, {})[name] = value
    return experiment_from_dict(nested)
