"""Loading an image folder: vaedist's first load (list, decode in a process pool, cache) and its cached
load, against a plain single-process Pillow loop, side by side on the same folder.

    .venv/bin/python benchmarks/data_loading.py                      # the 60,000 CIFAR-10 JPEGs in ../shared/data
    .venv/bin/python benchmarks/data_loading.py --folder DIR         # any image folder

Goals (ratios, so they hold on any machine): first load >= 1.3x the plain loop's rate on 2+ cores (the
pool); cached load >= 20x it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from vaedist.hardware import machine_line


def plain_loop(folder: Path) -> tuple[int, float]:
    """What a user writes without vaedist: walk the folder, decode each file with Pillow, stack."""
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    images = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    np.stack(images)
    return len(images), time.perf_counter() - t0


def vaedist_load(folder: Path) -> tuple[int, float]:
    from vaedist.data import load_split
    from vaedist.data.custom import spec_for

    spec_for.cache_clear()
    t0 = time.perf_counter()
    x_train, _ = load_split(str(folder), "train_full")
    x_test, _ = load_split(str(folder), "test")
    return len(x_train) + len(x_test), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
    ap.add_argument("--folder", type=Path, default=default, help=f"an image folder (default {default})")
    args = ap.parse_args()
    os.environ["VAEDIST_CACHE_DIR"] = tempfile.mkdtemp(prefix="vaedist-cache-")  # a cold cache
    print(machine_line(), flush=True)
    print(f"run: folder {args.folder}; cache {os.environ['VAEDIST_CACHE_DIR']}")

    n_plain, t_plain = plain_loop(args.folder)
    n_first, t_first = vaedist_load(args.folder)
    n_cached, t_cached = vaedist_load(args.folder)
    assert n_plain == n_first == n_cached, (n_plain, n_first, n_cached)
    plain, first, cached = n_plain / t_plain, n_first / t_first, n_cached / t_cached
    print(f"images: {n_plain}")
    print(f"plain_pillow_loop_images_per_s: {plain:,.0f} ({t_plain:.1f} s)")
    print(f"vaedist_first_load_images_per_s: {first:,.0f} ({t_first:.1f} s: list, decode in a pool, cache)")
    print(f"vaedist_cached_load_images_per_s: {cached:,.0f} ({t_cached:.2f} s)")
    print(f"first_load_ratio: {first / plain:.2f} (goal >= 1.3)")
    print(f"cached_load_ratio: {cached / plain:.1f} (goal >= 20)")
    return 0 if first / plain >= 1.3 and cached / plain >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
