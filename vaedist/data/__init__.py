"""Datasets: registry (shapes, classes, files, md5, mirrors), download + verify, readers, splits.

No Ray and no MLflow here: this package is plain numpy + stdlib so every layer can use it.
"""

from vaedist.data.download import default_data_dir, fetch, verify
from vaedist.data.readers import dataset_info, load_split
from vaedist.data.registry import DATASETS, DatasetSpec, FileSpec, get_spec

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "FileSpec",
    "dataset_info",
    "default_data_dir",
    "fetch",
    "get_spec",
    "load_split",
    "verify",
]
