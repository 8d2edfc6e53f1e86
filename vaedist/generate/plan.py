"""The plan: everything that decides a generated folder's bytes, and what to do with the folder. Pure.

Determinism. A sample is a pure function of (model, plan, sample_id):
- its label comes from a fixed interleave of the label-major sequence (:meth:`Plan.label_index`), a
  permutation of ``0..N-1``, so the rows per label are exact and every shard holds every class in
  proportion;
- its z comes from a counter-based generator keyed by (seed, sample_id, dim) (:func:`latents`), not
  from a worker's RNG state, so neither the shard size, nor the workers, nor the decoder batch change
  which z a sample gets.

The output folder's state (what :func:`vaedist.generate.writer.inspect_output` found) decides the action
(:func:`decide_action`): a new folder, an unfinished one of the same plan to resume, one to overwrite, or a
complete one with the same plan (nothing to do); anything else is refused before a byte is written.
No Ray, no MLflow, no file access here: every function is unit-tested on plain values.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from vaedist.config import GenerateConfig, ResourcesConfig, section_from_dict
from vaedist.errors import UsageError
from vaedist.generate.format import PLAN_FILE, UNCONDITIONAL_LABEL, part_name, shard_of

MAX_ROWS = 2**32  # sample ids and the label interleave are computed in uint64: (N - 1)^2 < 2^64


@dataclass(frozen=True)
class Plan:
    """What to generate. Its hash guards resumes (a different plan never mixes into a folder)."""

    model_uri: str
    model_version: str
    model_sha256: str  # of the checkpoint file: an alias that moved is a different plan
    dataset: str
    labels: tuple[int, ...]  # class indices; (-1,) for an unconditional model
    label_names: tuple[str, ...]  # same order as labels; ("",) for an unconditional model
    counts: tuple[int, ...]  # rows per label, same order as labels
    seed: int
    temperature: float
    shard_rows: int
    image_format: str  # one of config.IMAGE_FORMATS
    image_shape: tuple[int, int, int]  # (H, W, C)
    latent_dim: int
    class_names: tuple[str, ...] = ()  # every class of the model by index (the ClassLabel); () unconditional

    @property
    def conditional(self) -> bool:
        return self.labels != (UNCONDITIONAL_LABEL,)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.shard_rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists), the form kept in ``_plan.json`` and the manifest."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}  # plans before 0.5: no class_names
        for key in ("labels", "label_names", "counts", "image_shape", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(first sample id, rows) of a shard: contiguous ranges of ``0..N-1``."""
        start = shard * self.shard_rows
        return start, min(self.shard_rows, self.total - start)

    @property
    def stride(self) -> int:
        """A multiplier coprime to N near N / golden ratio: ``j -> j * stride mod N`` permutes 0..N-1 and
        spreads consecutive ids evenly over it (three-distance theorem), so shards mix the classes."""
        n = self.total
        a = max(1, round(n * (math.sqrt(5.0) - 1.0) / 2.0))
        while math.gcd(a, n) != 1:
            a += 1
        return a

    def label_index(self, start: int, rows: int) -> np.ndarray:
        """Position in ``labels`` of samples ``start..start+rows-1`` (int64 (rows,)).

        Sample j takes position ``p = j * stride mod N`` of the label-major sequence (counts[0] times
        the first label, then the second, ...); p is a permutation of 0..N-1, so the counts are exact.
        """
        j = np.arange(start, start + rows, dtype=np.uint64)
        p = (j * np.uint64(self.stride)) % np.uint64(self.total)
        return np.searchsorted(np.cumsum(self.counts), p.astype(np.int64), side="right")

    def shard_label_counts(self, shard: int) -> list[int]:
        start, rows = self.shard_range(shard)
        return np.bincount(self.label_index(start, rows), minlength=len(self.labels)).tolist()

    def shard_labels(self, shard: int) -> np.ndarray | None:
        """The class index of each of a shard's rows, int64 (rows,), as the decoder takes them; None for
        an unconditional model."""
        if not self.conditional:
            return None
        return np.asarray(self.labels, dtype=np.int64)[self.label_index(*self.shard_range(shard))]


# --------------------------------------------------------------------------------------------------
# What the request asks for: labels, rows per label


def split_rows(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to integer ``weights``, exactly (largest remainder, Hamilton's
    method; ties go to the earlier label)."""
    whole = sum(weights)
    if whole <= 0:
        raise UsageError("cannot split rows by class frequencies that are all zero")
    quotas = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def parse_labels(value: Any) -> tuple[int, ...] | None:
    """``'all'``/None -> None; ``'0,3,7'`` or ``[0, 3, 7]`` -> (0, 3, 7)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise UsageError(f"--labels: expected class indices like 0,3,7 or 'all', got {value!r}")
        value = [int(p) for p in parts]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise UsageError(f"generate.labels: expected a list of class indices or 'all', got {value!r}")
    if len(set(value)) != len(value):
        raise UsageError(f"labels: {list(value)} lists a class twice")
    return tuple(value)


def configs_from_spec(sections: dict[str, Any]) -> tuple[GenerateConfig, ResourcesConfig]:
    """A generate job spec's ``generate:`` and ``resources:`` sections (``labels: all`` allowed)."""
    gen = dict(sections.get("generate") or {})
    if "labels" in gen:
        gen["labels"] = parse_labels(gen["labels"])
    cfg = section_from_dict(GenerateConfig, gen, "generate")
    return cfg, section_from_dict(ResourcesConfig, sections.get("resources"), "resources")


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about the model (read from its checkpoint by the driver)."""

    uri: str
    dataset: str
    conditional: bool
    num_classes: int
    class_names: tuple[str, ...]  # the dataset's, or "0".."K-1" where they do not match the model
    variant: str
    dataset_fingerprint: str = ""  # of the training data, as the checkpoint keeps it ("" before 0.5)


def plan_labels(
    requested: tuple[int, ...] | None, model: ModelFacts
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(labels, their names) to generate: the requested classes (all by default) of a conditional
    model; ``(-1,), ("",)`` for an unconditional one, which cannot be given labels."""
    if not model.conditional:
        if requested is not None:
            raise UsageError(
                f"{model.uri} is an unconditional model ({model.variant}): it cannot generate given "
                "labels; omit --labels (its rows get label -1)"
            )
        return (UNCONDITIONAL_LABEL,), ("",)
    labels = requested if requested is not None else tuple(range(model.num_classes))
    bad = [k for k in labels if not 0 <= k < model.num_classes]
    if bad:
        raise UsageError(
            f"label {bad[0]} is not a class of the model ({model.dataset} has classes 0..{model.num_classes - 1})"
        )
    return tuple(labels), tuple(model.class_names[k] for k in labels)


def label_counts(
    cfg: GenerateConfig, labels: tuple[int, ...], conditional: bool, train_freq: Callable[[], Sequence[int]]
) -> tuple[int, ...]:
    """Rows per label: ``per_label`` each, or ``total`` split evenly or (``class_balance: as-train``) in
    proportion to the training split's class frequencies, which ``train_freq()`` gives (int per class
    index; called only when needed, since it reads the dataset)."""
    if cfg.per_label is not None:
        if cfg.class_balance != "uniform":
            raise UsageError(
                "--class-balance applies to --total only (--per-label gives every label the same rows)"
            )
        counts = (cfg.per_label,) * len(labels)
    elif cfg.class_balance == "uniform" or not conditional:
        counts = tuple(split_rows(cfg.total, [1] * len(labels)))
    else:
        freq = train_freq()
        counts = tuple(split_rows(cfg.total, [int(freq[i]) for i in labels]))
    if sum(counts) > MAX_ROWS:
        raise UsageError(
            f"{sum(counts):,} rows is more than one generation run holds ({MAX_ROWS:,}); split it"
        )
    return counts


# --------------------------------------------------------------------------------------------------
# Latents: z ~ N(0, T^2 I) as a pure function of (seed, sample id)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014) on uint64 arrays: a bijective, well-mixed hash."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def latents(seed: int, start: int, rows: int, dim: int, temperature: float = 1.0) -> np.ndarray:
    """z ~ N(0, T^2 I) for samples ``start..start+rows-1``: float32 (rows, dim).

    Counter-based, as in Salmon et al. (2011), "Parallel random numbers: as easy as 1, 2, 3": the
    counter (sample_id, dim, k) is hashed with the seed into uniform bits, and Box-Muller turns the
    pair k = 0, 1 into one normal. No generator state: any worker computes any sample's z alone.
    """
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    ids = np.arange(start, start + rows, dtype=np.uint64)[:, None]  # (rows, 1)
    counter = (ids * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) * np.uint64(2)  # (rows, dim)
    h1 = _splitmix64(_splitmix64(counter) ^ key)
    h2 = _splitmix64(_splitmix64(counter + np.uint64(1)) ^ key)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1): log is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (z * temperature).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The output folder: its state -> the action


class FolderAction(enum.Enum):
    NEW = "new"  # empty or absent: write every shard
    RESUME = "resume"  # unfinished, same plan: keep the shards that verify, write the rest
    OVERWRITE = "overwrite"  # --overwrite: remove its vaedist files, write every shard
    COMPLETE = "complete"  # complete with the same plan: nothing to do


@dataclass
class OutputState:
    """What an output folder holds, by kind of file (names only: no file handles)."""

    parts: dict[int, str] = field(default_factory=dict)  # shard index -> part file name
    tmp: list[str] = field(default_factory=list)  # temporary files a killed attempt left
    foreign: list[str] = field(default_factory=list)  # anything vaedist does not write, sorted
    extras: list[str] = field(default_factory=list)  # README.md, _evaluations.json: vaedist's beside a plan
    manifest: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None  # _plan.json

    @property
    def empty(self) -> bool:
        return not (self.parts or self.tmp or self.foreign or self.extras or self.manifest or self.plan)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in new:
        if old.get(key) != new[key]:
            return f"{key} {old.get(key)!r} there, {new[key]!r} now"
    return "a different plan"


def _absent_from_complete(state: OutputState) -> list[str]:
    """Files the manifest lists that the folder no longer holds."""
    listed = [s["file"] for s in state.manifest.get("shards", [])]
    return [f for f in listed if (i := shard_of(f)) is None or state.parts.get(i) != f]


def _decide_complete(state: OutputState, new: dict[str, Any], overwrite: bool, uri: str) -> FolderAction:
    old = state.manifest.get("plan") or {}
    if overwrite:
        return FolderAction.OVERWRITE
    if old != new:
        raise UsageError(
            f"--out {uri} already holds a complete generation run of another plan "
            f"({first_difference(old, new)}); pass --overwrite to replace it, or choose another --out"
        )
    absent = _absent_from_complete(state)
    if absent:
        raise UsageError(
            f"--out {uri} is complete but {absent[0]} is missing; pass --overwrite to regenerate it"
        )
    return FolderAction.COMPLETE


def decide_action(state: OutputState, plan: Plan, overwrite: bool, uri: str) -> FolderAction:
    """What to do with an output folder in ``state`` for ``plan``; UsageError (nothing written) for a
    folder holding other files, another plan (complete or not), or part files without their plan."""
    # a README.md without a plan or manifest beside it is somebody else's
    foreign = state.foreign + (state.extras if state.plan is None and state.manifest is None else [])
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UsageError(
            f"--out {uri} holds files that are not from vaedist generate ({foreign[0]}{more}); "
            "use an empty or new folder"
        )
    new = plan.to_dict()
    if state.manifest is not None:
        return _decide_complete(state, new, overwrite, uri)
    if overwrite and not state.empty:
        return FolderAction.OVERWRITE
    if state.plan is not None:
        if state.plan != new:
            raise UsageError(
                f"--out {uri} holds an unfinished run of another plan ({first_difference(state.plan, new)}); "
                "rerun it with the same arguments to finish it, or pass --overwrite to start over"
            )
        extra = sorted(name for i, name in state.parts.items() if name != part_name(i, plan.num_shards))
        if extra:
            raise UsageError(f"--out {uri} holds {extra[0]}, which is not in its plan; pass --overwrite")
        return FolderAction.RESUME
    if state.parts:
        raise UsageError(
            f"--out {uri} holds part files but no {PLAN_FILE}, so they cannot be verified; "
            "pass --overwrite to start over, or choose another --out"
        )
    return FolderAction.NEW
