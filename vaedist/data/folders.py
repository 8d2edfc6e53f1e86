"""Image folders: which files, which classes, which split. Listing only; decoding is :mod:`.images`'.

Layouts (torchvision ``ImageFolder``, Hugging Face ``imagefolder``):

    ROOT/<class>/<image>                        one split: vaedist carves the test split
    ROOT/{train,validation,test}/<class>/<image> given splits (validation joins train: vaedist carves its own)
    ROOT/<image>                                unlabelled (the unconditional variants train on it)

Classes are the sorted sub-folder names of the training split (the ``ImageFolder`` rule, which gives
CIFAR-10's official label order). Local folders and ``s3://`` / ``gs://`` prefixes, through pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.fs as pafs

from vaedist.data.images import IMAGE_SUFFIXES
from vaedist.errors import UsageError
from vaedist.files import resolve_folder

SPLIT_DIRS = {"train": "train", "training": "train", "validation": "train", "valid": "train", "val": "train",
              "test": "test", "testing": "test"}  # fmt: skip


@dataclass
class Listing:
    """The files of a source by split: relative paths, sizes and labels (-1: unlabelled), in a fixed order."""

    class_names: tuple[str, ...]
    files: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # split -> [(path, size, label)]

    @property
    def has_test(self) -> bool:
        return bool(self.files.get("test"))


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root) of a dataset's location (vaedist.files.resolve_folder), or one line saying why not."""
    try:
        fs, root, _ = resolve_folder(location)
        return fs, root
    except Exception as exc:  # pyarrow raises several types for unsupported or unreachable URIs
        raise UsageError(f"cannot open dataset {location}: {str(exc).splitlines()[0]}") from None


def _entries(fs, root: str) -> list[pafs.FileInfo]:
    return sorted(fs.get_file_info(pafs.FileSelector(root)), key=lambda e: e.base_name)


def _is_image(entry: pafs.FileInfo) -> bool:
    return entry.type == pafs.FileType.File and entry.base_name.lower().endswith(IMAGE_SUFFIXES)


def _visible(entry: pafs.FileInfo) -> bool:
    return not entry.base_name.startswith((".", "_"))


def _class_files(fs, folder: str, rel: str) -> list[tuple[str, int]]:
    """Every image below ``folder`` (recursively), as (path relative to the source, size), sorted."""
    found = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    files = [(e.path[len(folder) + 1 :], e.size) for e in found if _is_image(e) and "/." not in e.path[len(folder):]]
    return [(f"{rel}/{path}", size) for path, size in sorted(files)]


def _split_files(fs, root: str, base: str, rel: str, classes: tuple[str, ...], location: str) -> list[tuple[str, int, int]]:
    files = []
    for label, name in enumerate(classes):
        folder = f"{base}/{name}"
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            continue  # a split may lack a class (a test split without it)
        found = _class_files(fs, folder, f"{rel}/{name}".strip("/"))
        if not found and rel.split("/")[0] in ("", "train", "training"):
            raise UsageError(f"class folder {location}/{f'{rel}/{name}'.strip('/')} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(path, size, label) for path, size in found]
    return files


def list_folder(location: str) -> Listing:
    """The listing of an image folder; UsageError (one line) for a missing, empty or image-less one."""
    fs, root = open_location(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"dataset {location} does not exist (a built-in name, an image folder or a Parquet table)")
    entries = [e for e in _entries(fs, root) if _visible(e)]
    if not entries:
        raise UsageError(f"dataset folder {location} is empty: put images in ROOT/<class>/ (one folder per class)")
    dirs = [e for e in entries if e.type == pafs.FileType.Directory]
    splits = {e.base_name: SPLIT_DIRS[e.base_name.lower()] for e in dirs if e.base_name.lower() in SPLIT_DIRS}
    if splits:
        return _list_splits(fs, root, location, splits)
    if dirs:
        classes = tuple(e.base_name for e in dirs)
        return Listing(classes, {"train": _split_files(fs, root, root, "", classes, location)})
    images = [(e.base_name, e.size, -1) for e in entries if _is_image(e)]
    if not images:
        raise UsageError(f"dataset folder {location} has no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders")
    return Listing((), {"train": images})


def _list_splits(fs, root: str, location: str, splits: dict[str, str]) -> Listing:
    train_dirs = [d for d, s in splits.items() if s == "train"]
    if not train_dirs:
        raise UsageError(f"dataset folder {location} has a test split but no train/ folder")
    classes = sorted({e.base_name for d in train_dirs for e in _entries(fs, f"{root}/{d}")
                      if e.type == pafs.FileType.Directory and _visible(e)})  # fmt: skip
    if not classes:
        raise UsageError(f"dataset folder {location}/{train_dirs[0]} has no class folders: use train/<class>/<images>")
    listing = Listing(tuple(classes))
    for folder, split in sorted(splits.items()):
        extra = sorted({e.base_name for e in _entries(fs, f"{root}/{folder}") if e.type == pafs.FileType.Directory
                        and _visible(e)} - set(classes))  # fmt: skip
        if extra:
            raise UsageError(f"{location}/{folder} has class folder {extra[0]!r}, which train/ lacks")
        listing.files.setdefault(split, []).extend(_split_files(fs, root, f"{root}/{folder}", folder, listing.class_names, location))
    if not listing.files.get("train"):
        raise UsageError(f"dataset folder {location}/train has no images")
    return listing
