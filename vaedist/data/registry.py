"""The datasets vaedist knows: shape, classes, official files (name, md5, size), mirrors, likelihood.

Everything else in `vaedist.data` takes its facts from here, so a test (or a private
mirror) can swap in a modified spec with `dataclasses.replace(get_spec(name), ...)` and pass
it as `spec=` to `fetch`, `verify`, `load_split` and `dataset_info`.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

from vaedist.errors import UsageError


@dataclass(frozen=True)
class FileSpec:
    """One official distribution file: its name on the mirrors, its md5 and its size in bytes."""

    filename: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset.

    `files` order matters to the readers:
      - format 'idx': (train images, train labels, test images, test labels), each a gzipped IDX file;
      - format 'cifar-pickle': (the `cifar-10-python.tar.gz` tarball,);
      - formats 'image-folder' and 'parquet' (the user's images, :mod:`vaedist.data.custom`): no files;
        `source` is the dataset string and `digest` the fingerprint of its files and options.
    `image_shape` is (H, W, C); images are always handed out as uint8 NHWC.
    Frozen and made of tuples so a spec is hashable: the in-process caches key on it.
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    format: str
    files: tuple[FileSpec, ...]
    mirrors: tuple[str, ...]
    default_likelihood: str
    train_size: int
    test_size: int
    source: str = ""  # a path dataset's string (location and options); "" for the built-in ones
    digest: str = ""  # a path dataset's fingerprint (vaedist.data.custom.fingerprint)

    @property
    def from_path(self) -> bool:
        return bool(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """16 hex digits that change whenever the data could: the official files' md5s, shape and classes.
        Runs, models and manifests record it; MLflow shows it as the dataset's digest."""
        if self.digest:
            return self.digest
        facts = [self.name, self.format, *map(str, self.image_shape), *self.class_names]
        facts += [f"{f.filename}:{f.md5}:{f.size}" for f in self.files]
        return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(md5s: tuple[str, str, str, str], sizes: tuple[int, int, int, int]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(n, m, s) for n, m, s in zip(_IDX_NAMES, md5s, sizes, strict=True))


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        image_shape=(28, 28, 1),
        class_names=tuple(str(d) for d in range(10)),
        format="idx",
        files=_idx_files(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
            (9912422, 28881, 1648877, 4542),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        # Nearly binary strokes: a Bernoulli decoder is the classic choice.
        default_likelihood="bernoulli",
        train_size=60000,
        test_size=10000,
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        image_shape=(28, 28, 1),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        format="idx",
        files=_idx_files(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
            (26421880, 29515, 4422102, 5148),
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        # Real grey levels (textures), not strokes: a discretized logistic fits them.
        default_likelihood="logistic",
        train_size=60000,
        test_size=10000,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        image_shape=(32, 32, 3),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        format="cifar-pickle",
        files=(FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        default_likelihood="logistic",
        train_size=50000,
        test_size=10000,
    ),
}


def memory_bytes() -> int:
    """This machine's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def decode_whole(train_bytes: int, memory: int) -> bool:
    """Decode a path dataset whole (into the cache) when its decoded train split takes at most a quarter
    of this machine's memory: decoding holds it in memory once, and training holds it again."""
    return memory <= 0 or train_bytes <= memory // 4


def get_spec(name: str) -> DatasetSpec:
    """The registered spec for `name`, or the spec of a path dataset; UsageError (exit 2) naming the choices
    if unknown.

    A path dataset that fits in this machine's memory is decoded into the cache the first time
    (:func:`vaedist.data.custom.spec_for`), so its facts are exactly what training sees and a bad file,
    mixed sizes or mixed channels show at once. One that does not fit is never decoded whole: its spec
    comes from the listing and the first image (:func:`vaedist.data.listed.listed_spec`), and training
    streams it (``vaedist.streaming``, issue 12)."""
    from vaedist.data.sources import is_path

    if isinstance(name, str) and is_path(name):
        from vaedist.data import custom, listed

        spec = listed.listed_spec(name)  # the cache's record once decoded; else listing + first image
        if decode_whole(spec.train_size * math.prod(spec.image_shape), memory_bytes()):
            return custom.spec_for(name)
        return spec
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown dataset {name!r} (choose from: {', '.join(DATASETS)}; or a path to an image folder or "
            "Parquet table, e.g. ./my-images)"
        ) from None
