"""Untrusted image files never crash or lie (issue 29, points 2 and 4; issue 32, point 5): a PNG whose data is
shorter than its header says, damaged, or declaring gigapixels is named in one line before a decoder sees it; file
names are data; a link loop is named; hidden files are skipped and counted."""

import io
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import write_folder
from small_runs import saved_teacher
from kdcache.data import load_dataset
from kdcache.data.files import read_image
from kdcache.data.untrusted import BadImageError, TooManyPixelsError, check_image_bytes
from kdcache.errors import KdcacheError


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, rows: int | None = None, filter_byte: int = 0) -> bytes:
    """An 8-bit RGB PNG whose header says width x height, holding `rows` rows (default all) in a whole zlib
    stream, each row's filter `filter_byte`: valid when rows == height."""
    pixels = np.random.default_rng(0).integers(0, 256, (rows if rows is not None else height, width * 3), np.uint8)
    raw = b"".join(bytes([filter_byte]) + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_a_valid_png_decodes_as_torchvision_decodes_it(tmp_path):
    from torchvision.io import ImageReadMode, decode_image

    data = png(40, 30)
    (tmp_path / "a.png").write_bytes(data)
    image, _ = read_image(str(tmp_path / "a.png"))
    assert torch.equal(image, decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB))
    assert check_image_bytes(data) == (40, 30)


@pytest.mark.parametrize("damage, reason", [
    (lambda: png(40, 30, rows=12), "its image data holds 1452 bytes where its header declares 3630"),
    (lambda: png(40, 30, filter_byte=9), "row 0 of its image data has filter 9"),
    (lambda: png(40, 30)[:-12], r"ends at byte 3686 inside a chunk, before IEND \(truncated\)"),
    (lambda: png(40, 30)[:-30], r"its IDAT chunk declares 3641 bytes, more than the file holds \(truncated\)"),
    (lambda: png(40, 30)[:60] + b"\0" + png(40, 30)[61:], r"its IDAT chunk at byte 33 fails its CRC \(damaged\)"),
])
def test_a_damaged_png_is_refused_before_the_decoder_sees_it(damage, reason):
    with pytest.raises(BadImageError, match=reason):
        check_image_bytes(damage())


def test_an_image_above_the_pixel_limit_is_refused_from_its_header(tmp_path):
    # what decoders would allocate 1.2 GB for: a header of 20000 x 20000, then a few bytes of image data
    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    with pytest.raises(TooManyPixelsError, match=r"20000 x 20000 pixels \(400,000,000\), above the limit of "
                                                 r"89,478,485"):
        check_image_bytes(huge)
    Image.new("RGB", (300, 200)).save(tmp_path / "big.jpg")
    with pytest.raises(KdcacheError, match=r"big.jpg: 300 x 200 pixels \(60,000\), above the limit of 50,000; .* "
                                           r"raise the limit with --max-image-pixels N"):
        read_image(str(tmp_path / "big.jpg"), max_pixels=50_000)
    assert read_image(str(tmp_path / "big.jpg"), max_pixels=60_000)[0].shape == (3, 200, 300)


@pytest.fixture
def folder_with_a_short_png(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "train" / "dog" / "b.png").write_bytes(png(50, 120, rows=40))  # crashed torchvision's decode_png
    _, checkpoint = saved_teacher(tmp_path, num_classes=3, seed=0)
    return root, checkpoint


@pytest.mark.parametrize("workers", [0, 2])
def test_dump_teacher_names_a_png_shorter_than_its_header_in_one_line(folder_with_a_short_png, tmp_path, workers):
    root, checkpoint = folder_with_a_short_png
    done = subprocess.run([sys.executable, "-m", "kdcache", "dump-teacher", "--checkpoint", str(checkpoint),
                           "--teacher", "resnet8", "--dataset", "imagefolder", "--data-root", str(root),
                           "--image-size", "32", "--views", "1", "--workers", str(workers), "--out",
                           str(tmp_path / "c.zarr"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    # before: signal 11 (returncode -11) with --workers 0, a DataLoader traceback naming no file with 2
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr  # the error is the last line, below the progress bar
    assert done.stderr.strip().splitlines()[-1:] == [
        f"kdcache: error: {root / 'train' / 'dog' / 'b.png'}: not a decodable image (its image data holds 6040 "
        f"bytes where its header declares 18120 (truncated or damaged)); put a readable image under the same name and "
        f"rerun the same command (a file a dump read before must be restored as it was), or delete it and rerun (a "
        f"dump begun over the folder then needs --overwrite, which starts it anew)"]


def test_distill_names_a_png_that_became_short_in_one_line(tmp_path, capsys):
    from console import run_cli

    root = write_folder(tmp_path / "pets")
    _, checkpoint = saved_teacher(tmp_path, num_classes=3, seed=0)
    common = ["--dataset", "imagefolder", "--data-root", root, "--image-size", 32, "--workers", 0, "--device", "cpu"]
    code, _, err = run_cli(["dump-teacher", "--checkpoint", checkpoint, "--teacher", "resnet8", "--views", 1,
                            "--out", tmp_path / "c.zarr", *common], capsys)
    assert code == 0, err
    (root / "train" / "cat" / "b.png").write_bytes(png(50, 120, rows=40))
    done = subprocess.run([sys.executable, "-m", "kdcache", "distill", "--cache", str(tmp_path / "c.zarr"),
                           "--student", "resnet8", "--loss", "kd", "--epochs", "1", "--out", str(tmp_path / "runs"),
                           *map(str, common)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"kdcache: error: {root / 'train' / 'cat' / 'b.png'}: not a decodable image" in done.stderr
    assert "Traceback" not in done.stderr


def test_max_image_pixels_reaches_the_workers(tmp_path, capsys):
    from console import run_cli

    root = write_folder(tmp_path / "pets")  # images up to 120 x 50 = 6000 pixels
    _, checkpoint = saved_teacher(tmp_path, num_classes=3, seed=0)
    code, _, err = run_cli(["dump-teacher", "--checkpoint", checkpoint, "--teacher", "resnet8", "--dataset",
                            "imagefolder", "--data-root", root, "--image-size", 32, "--views", 1, "--workers", 1,
                            "--max-image-pixels", 5000, "--out", tmp_path / "c.zarr", "--device", "cpu"], capsys)
    assert code == 2 and "above the limit of 5,000" in err and err.count("\n") == 1


def test_eval_takes_max_image_pixels_as_the_commands_that_train_do(tmp_path, capsys):
    from console import run_cli

    root = write_folder(tmp_path / "pets")  # images up to 120 x 50 = 6000 pixels
    _, checkpoint = saved_teacher(tmp_path, num_classes=3, seed=0)
    common = [checkpoint, "--model", "resnet8", "--dataset", "imagefolder", "--data-root", root, "--image-size", 32,
              "--workers", 0, "--device", "cpu"]
    code, _, err = run_cli(["eval", *common, "--max-image-pixels", 5000], capsys)
    assert code == 2 and "above the limit of 5,000" in err and err.count("\n") == 1
    code, out, err = run_cli(["eval", *common, "--max-image-pixels", 6000], capsys)
    assert code == 0 and "top-1" in out, err


def test_a_file_name_with_a_line_break_is_refused_when_the_folder_is_listed(tmp_path):
    root = write_folder(tmp_path / "pets")
    Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "a\nb.png")
    with pytest.raises(KdcacheError, match=r"'.*a\\nb.png': a file name with a line break cannot be recorded in a "
                                           r"cache's listing \(1 such files\); rename it"):
        load_dataset("imagefolder", root, "train")


def test_a_link_loop_is_named_instead_of_listed_for_ever(tmp_path):
    root = write_folder(tmp_path / "pets")
    loop = root / "train" / "cat" / "again"
    os.symlink(root / "train" / "cat", loop)
    with pytest.raises(KdcacheError, match=f"{loop} is a link to {root / 'train' / 'cat'}, a folder already listed "
                                           r"\(a link loop"):
        load_dataset("imagefolder", root, "train")


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path, caplog):
    root = write_folder(tmp_path / "pets")
    plain = load_dataset("imagefolder", root, "train")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "dog" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    (root / "train" / ".hidden_class").mkdir()  # a dot-folder is no class
    (root / "train" / ".hidden_class" / "y.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        listed = load_dataset("imagefolder", root, "train")
    assert listed.fingerprint == plain.fingerprint and listed.num_classes == 3
    assert "skipped 2 hidden files and folders (names starting with a dot: .DS_Store, .ipynb_checkpoints)" in \
        caplog.text
    (root / "train" / "cat" / "notes.txt").write_text("mine")  # any other file is still refused by name
    with pytest.raises(KdcacheError, match=r"1 files in its class folders are not images by their extension "
                                           r"\(.*notes.txt\)"):
        load_dataset("imagefolder", root, "train")


def test_the_listing_keeps_torchvision_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_folder(tmp_path / "pets")
    (root / "train" / "owl" / "nested" / "deeper").mkdir(parents=True)
    for name in ("z.png", "a.png"):
        Image.new("RGB", (20, 20)).save(root / "train" / "owl" / "nested" / name)
    Image.new("RGB", (20, 20)).save(root / "train" / "owl" / "nested" / "deeper" / "m.png")
    listed = load_dataset("imagefolder", root, "train")
    expected = [(os.path.relpath(path, root / "train"), label) for path, label in ImageFolder(root / "train").samples]
    assert [(os.fsdecode(path), int(label)) for path, label in zip(listed.paths, listed.labels)] == expected


def test_the_size_read_from_a_jpeg_or_png_header_is_pillows(tmp_path):
    from PIL import Image as PILImage

    from kdcache.data.untrusted import header_size

    for size, mode, suffix in (((77, 41), "RGB", "jpg"), ((30, 200), "L", "jpg"), ((64, 9), "RGBA", "png")):
        path = tmp_path / f"a.{suffix}"
        PILImage.new(mode, size, 90).save(path, **({"progressive": True} if mode == "L" else {}))
        raw = path.read_bytes()
        with PILImage.open(path) as image:
            assert header_size(raw) == image.size == size
    with pytest.raises(BadImageError, match=r"its JPEG header ends before its frame header \(truncated\)"):
        header_size((tmp_path / "a.jpg").read_bytes()[:20])
