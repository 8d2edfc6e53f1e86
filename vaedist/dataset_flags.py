"""The dataset's flags on the command line: a built-in name or a path, and a path's options (``--image-size``,
``--channels``, ...) written into the dataset string (:mod:`vaedist.data.sources`), which is how job specs,
MLflow params, checkpoints and manifests record them. Kept apart from ``cli.py`` so the commands stay thin;
like it, this imports only click and the configs at load (``vaedist --help`` stays instant).
"""

from __future__ import annotations

from typing import Any

import click

from vaedist.config import DATASET_NAMES
from vaedist.data.spec import MAX_IMAGE_PIXELS

DATASET_HELP = (
    f"A built-in dataset ({', '.join(DATASET_NAMES)}) or a path / URI (s3://, gs://) to an image folder "
    "(ROOT/<class>/<images>) or a Parquet image table"
)
DATASET_OPTIONS = ("image_size", "channels", "dataset_name", "image_column", "label_column", "test_size",
                   "skip_bad_images")  # fmt: skip


def dataset_options(fn):
    """Click decorator: the options of a dataset given as a path (they become part of the dataset string)."""
    options = [
        click.option("--image-size", help="Path datasets: resize every image to N or HxW (cover, then crop the centre) [default: all images must share one size]."),
        click.option("--channels", type=click.Choice(["1", "3"]), help="Path datasets: 1 (greyscale) or 3 (RGB) [default: 3 if any image is in colour, else 1]."),
        click.option("--dataset-name", help="Path datasets: the name in the experiment vaedist/<name> and the model vaedist-<name> [default: the folder or file stem]."),
        click.option("--image-column", help="Parquet datasets: the image column [default: image]."),
        click.option("--label-column", help="Parquet datasets: the label column [default: label]."),
        click.option("--test-size", type=int, help="Path datasets without a test split: images carved for test [default: a tenth, at most 10,000]."),
        click.option("--skip-bad-images", is_flag=True, default=None, help=f"Path datasets: skip (and count) unreadable images (an unknown format, a truncated file, more than {MAX_IMAGE_PIXELS:,} pixels) instead of refusing the dataset."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def dataset_string(dataset: str | None, flags: dict[str, Any]) -> str | None:
    """``dataset`` with the path options given as flags (popped from ``flags``) written into it."""
    from vaedist.data.sources import is_path, with_options
    from vaedist.errors import UsageError

    given = {key: flags.pop(key) for key in DATASET_OPTIONS if key in flags}
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        return dataset
    flag = "--" + next(iter(given)).replace("_", "-")
    if dataset is None or not is_path(dataset):
        raise UsageError(f"{flag} applies to a dataset given as a path (--dataset ./my-images), not to {dataset or 'mnist'}")
    if "dataset_name" in given:
        given["name"] = given.pop("dataset_name")
    if "channels" in given:
        given["channels"] = int(given["channels"])
    return with_options(dataset, **given)


JOB_DATASET_HELP = "Train on this dataset instead of the spec's: a built-in name or a path (train, tune, pipeline jobs)."


def dataset_override(dataset: str | None) -> dict | None:
    """``--dataset`` of a job as a spec override (a path made absolute: workers rebuild the data from it)."""
    from vaedist.data.sources import absolute, is_path

    if dataset is None:
        return None
    return {"data": {"dataset": absolute(dataset) if is_path(dataset) else dataset}}
