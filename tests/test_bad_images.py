"""Bad images in a user's folder: each one line naming the file and --skip-bad-images, never a traceback.

The bad files are made here, cheaply and for real: a 1-bit PNG of huge dimensions compresses to a few KB
(one above Pillow's own decompression-bomb guard, one between vaedist's limit and Pillow's), a JPEG cut
in half, and a .png of random bytes. Pillow's settings are left as they are.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaedist.config import check_dataset, experiment_from_dict
from vaedist.data import get_spec, listed
from vaedist.data import images as img
from vaedist.data.spec import MAX_IMAGE_PIXELS
from vaedist.errors import UsageError

LIMIT = f"{MAX_IMAGE_PIXELS:,}"  # as the messages write it: 67,108,864


pytestmark = pytest.mark.usefixtures("decoded_cache")  # conftest: a decoded-data cache of each test's own


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit greyscale PNG of ``width`` x ``height``: rows of zeros deflate to almost nothing."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row * min(1000, height - i)) for i in range(0, height, 1000)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


BAD = {  # file name -> (bytes, what its one line says)
    "bomb.png": (lambda: huge_png(20000, 20000), f"above the limit of {LIMIT} pixels per image"),  # Pillow refuses
    "big.png": (lambda: huge_png(8200, 8200), f"8200x8200 = 67,240,000 pixels, above the limit of {LIMIT}"),
    "cut.jpg": (truncated_jpeg, "truncated"),
    "noise.png": (lambda: os.urandom(2000), "cannot identify image file"),
}


def _folder(root: Path, bad: list[str]) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / cls / f"{i}.png")
    for name in bad:
        (root / "b" / name).write_bytes(BAD[name][0]())
    return root


def test_the_bad_files_are_small_and_pillow_keeps_its_own_guard():
    assert len(huge_png(20000, 20000)) < 100_000 and len(huge_png(8200, 8200)) < 20_000
    assert Image.MAX_IMAGE_PIXELS is not None and MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS  # ours is met first


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_image_is_one_line_naming_it_in_memory_and_streamed(tmp_path, name):
    folder = str(_folder(tmp_path / "pets", [name]))
    with pytest.raises(UsageError) as err:
        get_spec(folder)  # decoded whole into the cache
    message = str(err.value)
    assert "\n" not in message and f"pets/b/{name} is not a readable image" in message
    assert BAD[name][1] in message and "pass --skip-bad-images to skip such files (1 found)" in message
    with pytest.raises(UsageError, match=rf"pets/b/{name} is not a readable image .*--skip-bad-images"):
        listed.decode_split(folder, "train_full", 5000)  # the stream decodes by block: the same line
    skipping = folder + "?skip_bad_images=true"
    spec = get_spec(skipping)
    assert spec.train_size + spec.test_size == 8  # the 8 good ones; the bad one skipped
    assert len(listed.decode_split(skipping, "train_full", 5000)[1]) + len(listed.decode_split(skipping, "test", 5000)[1]) == 8


def test_a_huge_image_is_refused_before_a_pixel_is_decoded():
    decoded = img.decode_all([huge_png(20000, 20000), huge_png(8200, 8200), huge_png(8192, 8)], workers=1)
    assert decoded.kept == [2] and [i for i, _ in decoded.bad] == [0, 1]  # 8192x8 is well within the limit


def test_a_config_for_a_bad_folder_reads_nothing_and_the_drivers_check_names_the_file(tmp_path, decoded_cache):
    """Building (and rebuilding) the config opens no file of the folder; the driver's check then does."""
    folder = _folder(tmp_path / "pets", ["bomb.png"])
    opened: list[str] = []
    watching = [True]

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event in ("open", "os.scandir", "os.listdir") and str(folder) in str(args[0] if args else ""):
            opened.append(f"{event} {args[0]}")

    sys.addaudithook(audit)  # hooks cannot be removed: this one goes quiet below
    try:
        cfg = experiment_from_dict({"data": {"dataset": str(folder)}, "model": {"arch": "dense"}})
        cfg.replace(**{"model.latent_dim": 4}).likelihood  # noqa: B018 - a trial's rebuild, and its likelihood
    finally:
        watching[0] = False
    assert opened == [] and not decoded_cache.exists()
    assert listed.source.cache_info().currsize == 0  # not listed either
    with pytest.raises(UsageError, match=r"pets/b/bomb.png is not a readable image \(.*pixels per image\); pass --skip-bad-images"):
        check_dataset(cfg)


# --------------------------------------------------------------------------------------------------
# The real CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'm.db'}", "VAEDIST_CACHE_DIR": str(cwd / "decoded")}
    return subprocess.run([sys.executable, "-m", "vaedist", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def test_the_cli_refuses_bad_images_in_one_line_and_skips_and_counts_them_when_asked(tmp_path):
    folder = str(_folder(tmp_path / "pets", sorted(BAD)))
    for args in (("data", "info", folder), ("train", "--dataset", folder, "--arch", "dense", "--dry-run")):
        out = _cli(*args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert f"pets/b/{sorted(BAD)[0]} is not a readable image" in out.stderr  # big.png, the first listed
        assert f"{LIMIT} pixels" in out.stderr and "--skip-bad-images" in out.stderr and "(4 found)" in out.stderr
    from click.testing import CliRunner

    from vaedist.cli import main  # in this process from here: no new interpreter per command

    out = CliRunner(env={"VAEDIST_CACHE_DIR": str(tmp_path / "decoded")}).invoke(main, ["data", "info", folder, "--skip-bad-images"])
    assert out.exit_code == 0, out.output
    assert "skipped 4 unreadable image(s), e.g. b/big.png" in out.stdout  # the count, in one line
    out = CliRunner().invoke(main, ["train", "--dataset", folder, "--skip-bad-images", "--arch", "dense", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "skip_bad_images=true" in out.stdout  # the option travels in the dataset string
    help_text = CliRunner().invoke(main, ["train", "--help"]).stdout
    assert f"more than {LIMIT} pixels" in " ".join(help_text.split())  # the limit, documented with the flag
