"""The datasets vaedist knows by name: shape, classes, official files (name, md5, size), mirrors, likelihood.

Everything else in `vaedist.data` takes their facts from here, so a test (or a private mirror) can swap
in a modified spec with `dataclasses.replace(DATASETS[name], ...)` and pass it as `spec=` to `fetch`,
`verify`, `load_split` and `dataset_info`.
"""

from __future__ import annotations

from vaedist.data.spec import DatasetSpec, FileSpec

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_dataset(
    name: str, class_names: tuple[str, ...], md5s: tuple[str, ...], sizes: tuple[int, ...], mirrors: tuple[str, ...],
    default_likelihood: str,
) -> DatasetSpec:
    """An MNIST-format dataset: 60,000 + 10,000 28x28 grey images in the four gzipped IDX files."""
    files = tuple(FileSpec(n, m, s) for n, m, s in zip(_IDX_NAMES, md5s, sizes, strict=True))
    return DatasetSpec(
        name=name, image_shape=(28, 28, 1), class_names=class_names, format="idx", files=files, mirrors=mirrors,
        default_likelihood=default_likelihood, train_size=60000, test_size=10000,
    )  # fmt: skip


DATASETS: dict[str, DatasetSpec] = {
    "mnist": _idx_dataset(
        "mnist",
        tuple(str(d) for d in range(10)),
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        (9912422, 28881, 1648877, 4542),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        "bernoulli",  # nearly binary strokes: a Bernoulli decoder is the classic choice
    ),  # fmt: skip
    "fashion-mnist": _idx_dataset(
        "fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        (26421880, 29515, 4422102, 5148),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
        "logistic",  # real grey levels (textures), not strokes: a discretized logistic fits them
    ),  # fmt: skip
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
