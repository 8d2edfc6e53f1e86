"""Training data beyond one node's memory: a path dataset streamed through Ray Data.

The in-memory path (``train.put_data``: the decoded train split whole in the object store, indexed by
each worker) stays the default: it measured faster on small images. A dataset whose decoded train split
is larger than the memory budget (``--memory-budget``, default half the cluster's object store) streams
(the one rule, ``vaedist.data.spec.decode_whole``):

    driver:  train_dataset(dataset, val_size, seed)  -> TorchTrainer(datasets={"train": ...},
                                                                     dataset_config=dataset_config())
    worker:  shard_batches(ray.train.get_dataset_shard("train"), batch, epoch, seed, rank)
             -> loop.train_epoch(..., batches, steps_per_epoch(train_rows(...), world, batch), ...)

The stream: the split's items (file, row, label; :mod:`vaedist.data.listed`) in blocks -> block order
shuffled per epoch -> decoded by tasks (``map_batches``) -> ``streaming_split(world, equal=True)`` (what
Ray Train's ``DataConfig`` does with a dataset passed to the trainer) -> each rank's local shuffle buffer
-> full batches. Only the validation and test splits are decoded whole (``listed.decode_split``).

Why not ``ray.data.read_images`` / ``read_parquet``: both paths must give the same rows and pixels. The
validation rows are carved by their position in the listing, which neither reader exposes (no row index,
their own file order); ``read_images`` resizes by stretching with a bilinear filter where vaedist covers
and centre-crops with a bicubic one (``images.fit``); and labels come from the listing (folder -> class,
string labels -> the training split's classes). So the items are the input and ``map_batches`` decodes
them with the data layer's own code; reading, decoding, backpressure and the split are still Ray Data's.

Why this shuffle: ``random_shuffle`` is an all-to-all exchange of the decoded images every epoch (each
image through the object store, spilled to disk when it does not fit): exactly what a dataset beyond
memory cannot afford. Randomizing the order of the (small) item blocks before decoding costs nothing,
and the local buffer mixes rows across the blocks it holds; the standard Ray Data recipe for large data.
The order differs per epoch (``reseed_after_execution``) but is not bit-reproducible: the split
coordinator deals blocks to ranks as they ask.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from vaedist.data import listed
from vaedist.data.sources import is_path
from vaedist.data.spec import budget_bytes, decode_whole, estimated_train_bytes

if TYPE_CHECKING:
    import ray.data
    import ray.train
    import torch

BLOCK_BYTES = 8 * 2**20  # decoded bytes per block: small enough to shuffle finely, large enough per task
BLOCK_ROWS = (32, 1024)  # a block's decode: from ~5 ms (a task's overhead) to ~0.15 s of 32x32 JPEGs
MIN_BLOCKS = 64  # per epoch, where rows allow: what the block order shuffles and the split deals out


# --------------------------------------------------------------------------------------------------
# The decision (pure)


def streams(dataset: str, memory_budget: str | None, object_store_bytes: int) -> bool:
    """Whether ``dataset`` streams: never a built-in one (tens of MB, official files); a path dataset when
    its listed spec's decoded train split does not fit the budget (``vaedist.data.spec.decode_whole``: the
    rule ``get_spec`` decodes by, with the cluster's object store). Lists the dataset, decodes one image."""
    if not is_path(dataset):
        return False
    train = estimated_train_bytes(listed.listed_spec(dataset))
    return not decode_whole(train, budget_bytes(memory_budget, object_store_bytes))


def block_rows(image_shape: tuple[int, ...], rows: int) -> int:
    """Rows per block: at most ``BLOCK_BYTES`` decoded, and enough blocks (``MIN_BLOCKS``) for the block
    order to shuffle and the split to balance, within ``BLOCK_ROWS``."""
    low, high = BLOCK_ROWS
    wanted = min(BLOCK_BYTES // int(np.prod(image_shape)), -(-rows // MIN_BLOCKS))
    return int(min(high, max(low, wanted)))


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Full batches per rank per epoch: ``streaming_split(world, equal=True)`` gives every rank
    ``rows // world`` rows (fewer, equally, where the stream skips unreadable images: never more)."""
    return (rows // world) // batch_size


# --------------------------------------------------------------------------------------------------
# The stream (Ray Data)


def object_store_bytes() -> int:
    """The connected cluster's object store memory (the budget's default is half of it)."""
    import ray

    return int(ray.cluster_resources().get("object_store_memory", 0))


def train_rows(dataset: str, val_size: int) -> int:
    """Rows of the streamed train split (train minus validation): the same on every rank's driver."""
    return len(listed.split_items(dataset, "train", val_size))


def _decode_block(items: pa.Table, dataset: str, kind: str, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """One block of items -> {"image": uint8 (n, H, W, C), "label": int64 (n,)}, in a Ray Data task.
    Unreadable images: refused (the task fails, naming the file), or skipped and logged where the dataset
    says ``skip_bad_images``; the equal split then gives every rank equally fewer rows."""
    block = listed.decode_items(dataset, kind, items, shape, workers=1)  # the task is the parallelism
    return {"image": block.images, "label": block.labels}


def train_dataset(dataset: str, val_size: int, seed: int, *, num_cpus: float = 1.0) -> ray.data.Dataset:
    """The train split (train minus the carved validation rows) of a path dataset as a Ray Dataset of
    ``image`` (uint8 H x W x C, the in-memory path's shape rule and pixels) and ``label`` (int64), its
    block order shuffled anew each epoch. ``num_cpus``: per decoding task; the training workers must leave
    that much free on some node, or the stream waits forever."""
    import ray.data

    shape = listed.image_shape(dataset)
    items = listed.split_items(dataset, "train", val_size)
    ds = ray.data.from_arrow(listed.blocks(items, block_rows(shape, len(items))))
    # Before the decode, so the shuffle moves item blocks (paths), never images.
    ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed % 2**32, reseed_after_execution=True))
    kwargs = {"dataset": dataset, "kind": listed.source(dataset).kind, "shape": shape}
    return ds.map_batches(_decode_block, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus)


def dataset_config() -> ray.train.DataConfig:
    """For ``TorchTrainer(dataset_config=...)``: split "train" among the workers (``streaming_split`` with
    ``equal=True``, so every rank runs the same number of steps); validation stays in memory."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"])


def shuffle_rows(batch_size: int) -> int:
    """The local shuffle buffer: at least a few batches and a block's worth, so rows of several blocks mix."""
    return max(4 * batch_size, BLOCK_ROWS[1])


def shard_batches(shard: ray.data.DataIterator, batch_size: int, epoch: int, seed: int, rank: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """One epoch of a rank's shard (``ray.train.get_dataset_shard("train")``) as (uint8 (B, H, W, C),
    int64 (B,)) CPU tensors, full batches only, shuffled through a local buffer seeded by (seed, epoch,
    rank): what ``loop.train_epoch`` takes. The trainer moves them to its device itself."""
    from vaedist.loop import derive_seed

    # Ray hands read-only arrays to torch.as_tensor; nothing here writes to a batch (make_input copies).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    for batch in shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, device="cpu", prefetch_batches=2,
        local_shuffle_buffer_size=shuffle_rows(batch_size), local_shuffle_seed=derive_seed(seed, epoch, rank),
    ):  # fmt: skip
        yield batch["image"], batch["label"]
