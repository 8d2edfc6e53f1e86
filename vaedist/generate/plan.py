"""What to generate (labels, rows per label) and what to do with the output folder. Pure.
The :class:`~vaedist.generate.format.Plan` itself, everything that decides a folder's bytes, is the format's.

Determinism. A sample is a pure function of (model, plan, sample_id):
- its label comes from a fixed interleave of the label-major sequence (:meth:`Plan.label_index`), a
  permutation of ``0..N-1``, so the rows per label are exact and every shard holds every class in
  proportion;
- its z comes from a counter-based generator keyed by (seed, sample_id, dim) (:func:`vaedist.sampling.latents`), not
  from a worker's RNG state, so neither the shard size, nor the workers, nor the decoder batch change
  which z a sample gets.

The output folder's state (what :func:`vaedist.generate.writer.inspect_output` found) decides the action
(:func:`decide_action`): a new folder, an unfinished one of the same plan to resume, one to overwrite, or a
complete one with the same plan (nothing to do); anything else is refused before a byte is written.
No Ray, no MLflow, no file access here: every function is unit-tested on plain values.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vaedist.config import GenerateConfig, ResourcesConfig, section_from_dict
from vaedist.errors import UsageError
from vaedist.generate.format import PLAN_FILE, UNCONDITIONAL_LABEL, Plan, part_name

MAX_ROWS = 2**32  # sample ids and the label interleave are computed in uint64: (N - 1)^2 < 2^64


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
# The output folder: its state -> the action


class FolderAction(enum.Enum):
    NEW = "new"  # empty or absent: write every shard
    RESUME = "resume"  # unfinished, same plan: keep the shards that verify, write the rest
    OVERWRITE = "overwrite"  # --overwrite: remove its vaedist files, write every shard
    COMPLETE = "complete"  # complete with the same plan: nothing to do
    REPAIR = "repair"  # complete with the same plan, but shards differ from the manifest: rewrite those


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


def _decide_complete(state: OutputState, new: dict[str, Any], overwrite: bool, uri: str) -> FolderAction:
    old = state.manifest.get("plan") or {}
    if overwrite:
        return FolderAction.OVERWRITE
    if old != new:
        raise UsageError(
            f"--out {uri} already holds a complete generation run of another plan "
            f"({first_difference(old, new)}); pass --overwrite to replace it, or choose another --out"
        )
    return FolderAction.COMPLETE  # the shards' checksums decide whether it needs repair (decide_repair)


def damaged_shards(manifest: dict[str, Any], digests: dict[str, str | None]) -> dict[int, str]:
    """The shards of a complete folder that are not as its manifest records them: shard index -> why
    (``digests``: each listed file's SHA-256 as found now, None where the file is missing)."""
    damaged = {}
    for i, entry in enumerate(manifest.get("shards", [])):
        found = digests.get(entry["file"])
        if found is None:
            damaged[int(entry.get("shard", i))] = "is missing"
        elif found != entry.get("sha256"):
            damaged[int(entry.get("shard", i))] = "differs from the sha256 its manifest records"
    return damaged


def decide_repair(manifest: dict[str, Any], plan: Plan, damaged: dict[int, str], uri: str) -> FolderAction:
    """A complete folder of the same plan: nothing to do, or rewrite its damaged shards. A folder of an
    earlier layout (shards at the root) is not patched into a mixed one: UsageError, pass --overwrite."""
    if not damaged:
        return FolderAction.COMPLETE
    listed = [s["file"] for s in manifest.get("shards", [])]
    if listed != [part_name(i, plan.num_shards) for i in range(plan.num_shards)]:
        first = min(damaged)
        raise UsageError(
            f"--out {uri} is complete but {listed[first] if first < len(listed) else f'shard {first}'} "
            f"{damaged[first]}; it has an earlier layout, so pass --overwrite to regenerate it"
        )
    return FolderAction.REPAIR


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
