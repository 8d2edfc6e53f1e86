"""Build-time check of the vaedist image (cluster/Dockerfile runs it): did the pins hold, is torch a CUDA build?

    python cluster/check_image.py [--torch-build cuda|any] [--constraints constraints.txt]

Every runtime dependency vaedist declares must be installed at exactly the version constraints.txt pins
(local tags such as ``+cu128`` ignored), and the stack must import. With ``--torch-build cuda`` (the default)
a CPU-only torch fails the check: a GPU worker would otherwise train on its CPU without a word.
Exit status 0 when all is well, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def runtime_requirements(dist: str = "vaedist") -> list[str]:
    """Names of ``dist``'s dependencies outside any extra (``ray[train,...]>=2.60`` -> ``ray``)."""
    names = []
    for req in md.requires(dist) or []:
        if "extra ==" in req:
            continue
        names.append(re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0])
    return names


def problems(constraints: Path, torch_build: str) -> list[str]:
    pins = read_pins(constraints)
    found = []
    for name in runtime_requirements():
        pinned = pins.get(canonical(name))
        if pinned is None:
            found.append(f"{name}: no pin in {constraints}")
            continue
        try:
            have = md.version(name).split("+", 1)[0]
        except md.PackageNotFoundError:
            found.append(f"{name}: not installed (pinned {pinned})")
            continue
        if have != pinned:
            found.append(f"{name}: {have} installed, {pinned} pinned")

    import mlflow  # noqa: F401 - the stack must import, not just be present
    import ray.train.torch  # noqa: F401
    import torch

    import vaedist  # noqa: F401

    if torch_build == "cuda" and not torch.version.cuda:
        found.append(
            f"torch {torch.__version__} is a CPU build; a GPU image needs PyPI's CUDA wheel "
            "(is a CPU find-links/index in the pip config?)"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-build", choices=["cuda", "any"], default="cuda")
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    args = parser.parse_args(argv)
    found = problems(args.constraints, args.torch_build)
    for line in found:
        print(f"image check: {line}", file=sys.stderr)
    if not found:
        import torch

        print(f"image check: ok (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
