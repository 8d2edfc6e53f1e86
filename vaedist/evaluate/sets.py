"""What evaluation judges as a synthetic set: a folder ``vaedist generate`` wrote, or any labelled Parquet
image table another generator wrote (a Hugging Face ``Image`` column and an integer ``label`` column).

Which one a path is follows from vaedist's bookkeeping (:func:`is_vaedist`): ``_plan.json`` or
``_manifest.json`` in the folder, or ``vaedist.*`` schema metadata in its Parquet files. A vaedist folder
is read by :func:`vaedist.generate.reader.read_generated` (which refuses one without its manifest: generation
did not finish); a foreign table by :func:`vaedist.data.tables.read_image_table`. Either way evaluation
gets a :class:`~vaedist.generate.reader.GeneratedSet`; a foreign table's has no model, and its digest is
the table's fingerprint.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist.errors import UsageError
from vaedist.files import resolve_folder
from vaedist.generate.format import MANIFEST, META, PLAN_FILE
from vaedist.generate.reader import GeneratedSet, read_generated
from vaedist.names import (
    EVALUATE_TAG,
    GENERATED_TAG,
    MODEL_RUN_TAG,
    MODEL_TAG,
    VERSION_OF_VAEDIST_TAG,
    VERSION_TAG,
)

TABLE_FORMAT = "table"  # GeneratedSet.image_format of a foreign table


def _has_vaedist_metadata(fs, path: str) -> bool:
    try:
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
    except (OSError, ValueError):  # not readable Parquet: the reader that opens it says so
        return False
    return any(key.decode(errors="replace").startswith(META) for key in metadata)


def is_vaedist(source: str) -> bool:
    """Whether ``source`` is (or was meant to be) a vaedist generated folder: bookkeeping files, vaedist
    schema metadata, or nothing at all to read (then read_generated explains what is missing).
    UsageError for a single shard of a vaedist folder (pass the folder) and for a path that does not exist."""
    try:
        fs, root, _ = resolve_folder(source)
    except Exception as exc:  # pyarrow raises several types for unsupported or unreachable URIs
        raise UsageError(f"cannot open generated data {source}: {exc}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(
            f"generated data {source} does not exist (a vaedist generate folder or a Parquet table)"
        )
    if info.type == pafs.FileType.File:
        if _has_vaedist_metadata(fs, root):
            raise UsageError(f"{source} is one shard of a vaedist generated folder: pass the folder")
        return False
    entries = [e for e in fs.get_file_info(pafs.FileSelector(root)) if e.type == pafs.FileType.File]
    if {e.base_name for e in entries} & {PLAN_FILE, MANIFEST}:
        return True
    tables = sorted(e.path for e in entries if e.base_name.endswith(".parquet"))
    nested = any(e.type == pafs.FileType.Directory for e in fs.get_file_info(pafs.FileSelector(root)))
    if not tables and not nested:
        return True  # empty: read_generated says so in vaedist's words
    return bool(tables) and _has_vaedist_metadata(fs, tables[0])


def read_set(source: str) -> GeneratedSet:
    """The synthetic set at ``source``, read whole and checked readable (not yet against a dataset)."""
    if is_vaedist(source):
        return read_generated(source)
    from vaedist.data.tables import read_image_table

    table = read_image_table(source)
    # Names only where the table declares them (a ClassLabel, or string labels): "0".."K-1" is its reader's
    # default for bare integers, which say nothing about which class is which.
    declared = table.class_names != tuple(str(i) for i in range(len(table.class_names)))
    names = (
        {int(label): [table.class_names[label]] for label in set(table.labels.tolist())} if declared else {}
    )
    return GeneratedSet(
        folder=source, images=table.images, labels=table.labels, dataset=None, model_uri=None,
        model_version=None, model_run_id=None, image_format=TABLE_FORMAT, manifest={},
        manifest_sha1=table.fingerprint, label_names=names,
    )  # fmt: skip


def open_evaluation_run(dataset: str, name: str, where: str, gen: GeneratedSet, params: dict, measure: str,
                        uri: str) -> tuple[str, object, str | None]:  # fmt: skip
    """An evaluation's MLflow run (found by ``name`` on a rerun) -> (run id, its logger, the generating
    model's run or None). CAS and the audit tag it alike: the model (URI, version, run), the set judged,
    ``measure`` ("cas", "audit"); the set is the run's input under the name and digest its generate run
    logged it with."""
    import vaedist
    from vaedist import tracking
    from vaedist.generate.format import dataset_name

    model_run = gen.model_run_id or (tracking.model_run_id(gen.model_uri) if gen.model_uri else None)
    params = {**params, "generated.model_uri": gen.model_uri or "", "generated.model_version": gen.model_version or ""}
    run_id = tracking.find_or_create_run(dataset, name, params, kind="evaluate")
    logger = tracking.RunLogger(run_id, uri)
    logger.set_tags({
        MODEL_TAG: gen.model_uri or "", VERSION_TAG: gen.model_version or "",
        MODEL_RUN_TAG: model_run or "", GENERATED_TAG: where,
        EVALUATE_TAG: measure, VERSION_OF_VAEDIST_TAG: vaedist.__version__,
    })  # fmt: skip
    tracking.log_dataset(run_id, dataset_name(where), gen.manifest_sha1, where, "evaluation")
    return run_id, logger, model_run
