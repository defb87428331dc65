"""load_image (modes, orientation, huge and bad inputs) and the docs/model.md §7.1 framing."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hallo3_cli.errors import InputError
from hallo3_cli.image_io import (
    MIN_SIDE,
    crop_box_for_output,
    frame_box,
    frame_image,
    framing_for,
    load_image,
)


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth RGB content with some texture, uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    planes = [np.sin(6 * x + 2 * y + p) * 0.5 + 0.5 for p in rng.uniform(0, 6, 3)]
    image = np.stack(planes, axis=-1) * 200 + rng.uniform(0, 40, (height, width, 3))
    return image.round().astype(np.uint8)


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# load_image


def test_loads_fixture_portrait_unchanged(media_dir):
    path = media_dir / "face_0001.jpg"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (480, 480)
    with Image.open(path) as reference:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


@pytest.mark.parametrize("orientation, rotate", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    stored = gradient(120, 80)
    stored[:10, :10] = (255, 0, 0)  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif)
    shown = np.asarray(load_image(path))
    np.testing.assert_array_equal(shown, np.rot90(stored, k=rotate))


def test_grayscale_and_bilevel(tmp_path):
    gray = gradient(100, 70)[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    loaded = np.asarray(load_image(tmp_path / "g.png"))
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], gray)
    Image.fromarray(gray > 128).convert("1").save(tmp_path / "b.png")
    assert set(np.unique(np.asarray(load_image(tmp_path / "b.png")))) == {0, 255}


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 80 * 90).reshape(80, 90).round().astype(np.uint16)
    values[0, :4] = (0, 257 * 100, 32768, 65535)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # the file really is 16-bit
    loaded = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(loaded[0, :4], (0, 100, 128, 255))
    expected = np.floor(values / 257.0 + 0.5)
    assert np.abs(loaded - expected).max() == 0
    assert len(np.unique(loaded)) == 256  # the whole range survives (PIL's convert would clip at 255)


def test_transparency_is_composited_on_black(tmp_path):
    rgba = np.zeros((70, 70, 4), np.uint8)
    rgba[..., :3] = (200, 100, 255)
    rgba[:, :20, 3] = 0  # transparent, with colour hiding underneath
    rgba[:, 20:40, 3] = 128
    rgba[:, 40:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    loaded = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert (loaded[:, :20] == 0).all()
    np.testing.assert_allclose(loaded[:, 20:40], np.broadcast_to([100, 50, 128], (70, 20, 3)), atol=1)
    assert (loaded[:, 40:] == (200, 100, 255)).all()


def test_palette_with_transparent_index(tmp_path):
    indices = np.zeros((64, 80), np.uint8)
    indices[:, 40:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 255, 255, 0, 200, 0] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = np.asarray(load_image(tmp_path / "p.png"))
    assert (loaded[:, :40] == 0).all() and (loaded[:, 40:] == (0, 200, 0)).all()


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((64, 64, 4), np.uint8)
    cmyk[..., 1] = cmyk[..., 2] = 255  # magenta + yellow = red
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=95)
    loaded = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    np.testing.assert_allclose(loaded.mean(axis=(0, 1)), (255, 0, 0), atol=4)


def test_large_images_are_reduced_while_decoding_and_stay_faithful(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(1600, 1200, seed=5)).save(path, quality=95)
    reduced = load_image(path, max_pixels=500_000)
    assert reduced.width * reduced.height <= 500_000
    assert reduced.width / reduced.height == pytest.approx(4 / 3, rel=1e-2)
    full = load_image(path, max_pixels=None)
    assert full.size == (1600, 1200)
    framed_reduced, _ = frame_image(reduced, 240, 360)
    framed_full, _ = frame_image(full, 240, 360)
    difference = (framed_reduced - framed_full).abs() * 127.5  # in 8-bit levels
    assert difference.mean() < 1.0 and difference.max() < 12


_GENERATE_HUGE = """
import sys
import numpy as np
from PIL import Image
w, h = 12000, 9000
x = np.linspace(0, 255, w, dtype=np.float32)
y = np.linspace(0, 255, h, dtype=np.float32)
rgb = np.empty((h, w, 3), np.uint8)
rgb[..., 0] = x[None, :]
rgb[..., 1] = y[:, None]
rgb[..., 2] = 128
Image.fromarray(rgb).save(sys.argv[1], quality=90)
"""

_LOAD_HUGE = """
import json, resource, sys, warnings
warnings.simplefilter("error")  # a DecompressionBombWarning would fail the load
from hallo3_cli.image_io import load_image, frame_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
framed, framing = frame_image(image, 480, 720)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": image.size, "load_growth_mb": (loaded - before) / 1024,
                  "peak_growth_mb": (after - before) / 1024, "framing": framing,
                  "corner": framed[:, 0, 0].tolist()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_huge_jpeg_with_bounded_memory(tmp_path):
    path = tmp_path / "huge.jpg"
    subprocess.run([sys.executable, "-c", _GENERATE_HUGE, str(path)], check=True)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_HUGE), str(path)], check=True, capture_output=True, text=True
    )
    report = json.loads(result.stdout)
    width, height = report["size"]
    assert width * height <= 4096 * 4096 and width / height == pytest.approx(12000 / 9000, rel=1e-3)
    # decoding the full 12000×9000 RGB image alone would take 324 MB
    assert report["load_growth_mb"] < 60, report
    assert report["peak_growth_mb"] < 150, report
    assert report["framing"] == "crop"
    # 4:3 into 3:2: full width kept, 1/18 of the height cropped at the top (green = row / 9000)
    red, green, _ = report["corner"]
    assert red == pytest.approx(-1, abs=0.02) and green == pytest.approx(-1 + 2 * 500 / 9000, abs=0.02)


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_absurd_dimensions_are_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 40000, 40000)
    with pytest.raises(InputError, match="1600 megapixels") as err:
        load_image(path)
    assert_one_line_naming(err, path)


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(gradient(300, 200)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_png(path: Path) -> None:
    Image.fromarray(gradient(300, 200)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("definitely not a picture\n"), "not an image"),
        (lambda p: p.write_bytes(b""), "not an image"),
        (_truncated_jpeg, "cannot decode"),
        (_corrupt_png, "cannot decode"),
        (lambda p: Image.fromarray(gradient(16, 16)).save(p, format="PNG"), "too small"),
        (lambda p: Image.fromarray(gradient(400, MIN_SIDE - 1)).save(p, format="PNG"), "too small"),
    ],
    ids=["missing", "folder", "text", "empty", "truncated", "corrupt", "16x16", "thin"],
)
def test_bad_inputs(tmp_path, make, message):
    path = tmp_path / "portrait.png"
    make(path)
    with pytest.raises(InputError, match=message) as err:
        load_image(path)
    assert_one_line_naming(err, path)


def test_minimum_size_is_accepted(tmp_path):
    Image.fromarray(gradient(MIN_SIDE, MIN_SIDE)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").size == (MIN_SIDE, MIN_SIDE)


# ---------------------------------------------------------------------------------------------
# framing, checked against an independent derivation with PIL's resampling (the algorithm that
# torch's antialiased interpolation reproduces)


def pil_resize(unit: np.ndarray, width: int, height: int, method) -> np.ndarray:
    """Resize a float (H, W, 3) image channel by channel with PIL; returns (3, height, width)."""
    return np.stack(
        [np.asarray(Image.fromarray(unit[..., c], mode="F").resize((width, height), method)) for c in range(3)]
    )


def derive_pad(source: np.ndarray, height: int, width: int) -> np.ndarray:
    side = min(height, width)
    resized = pil_resize(source.astype(np.float32) / 255, side, side, Image.BILINEAR)
    left, top = (width - side) // 2, (height - side) // 2
    framed = np.zeros((3, height, width), np.float32)
    framed[:, top : top + side, left : left + side] = np.clip(resized, 0, 1)
    return framed * 2 - 1


def derive_crop(source: np.ndarray, height: int, width: int) -> np.ndarray:
    src_h, src_w = source.shape[:2]
    if src_w * height > width * src_h:  # wider than the frame: match heights
        new_h, new_w = height, int(src_w * height / src_h)
    else:
        new_h, new_w = int(src_h * width / src_w), width
    resized = pil_resize(source.astype(np.float32) / 255, new_w, new_h, Image.BICUBIC)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, top : top + height, left : left + width] * 2 - 1


def test_native_square_is_placed_unchanged_between_black_bars(media_dir):
    image = load_image(media_dir / "face_0003.jpg")
    framed, framing = frame_image(image, 480, 720)
    assert framing == "pad" and framed.shape == (3, 480, 720) and framed.dtype == torch.float32
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(framed[:, :, 120:600], source, atol=1e-6, rtol=0)
    assert (framed[:, :, :120] == -1).all() and (framed[:, :, 600:] == -1).all()


@pytest.mark.parametrize(
    "side, height, width", [(300, 480, 720), (1000, 480, 720), (333, 64, 96), (200, 96, 64), (250, 61, 97)]
)
def test_square_sources_match_derivation(side, height, width):
    source = gradient(side, side, seed=side)
    framed, framing = frame_image(Image.fromarray(source), height, width)
    assert framing == "pad" and framed.shape == (3, height, width)
    np.testing.assert_allclose(framed.numpy(), derive_pad(source, height, width), atol=5e-5, rtol=0)


@pytest.mark.parametrize(
    "src_w, src_h, height, width",
    [
        (1000, 500, 480, 720),
        (500, 900, 480, 720),
        (1080, 720, 480, 720),
        (641, 480, 480, 720),
        (300, 280, 64, 96),
        (120, 500, 96, 64),
    ],
)
def test_other_shapes_match_derivation(src_w, src_h, height, width):
    source = gradient(src_w, src_h, seed=src_w)
    framed, framing = frame_image(Image.fromarray(source), height, width)
    assert framing == "crop" and framed.shape == (3, height, width)
    np.testing.assert_allclose(framed.numpy(), derive_crop(source, height, width), atol=5e-5, rtol=0)


def test_tensor_input_matches_image_input():
    source = gradient(400, 300)
    as_tensor = torch.from_numpy(source).permute(2, 0, 1).float() / 255
    for image in (source, gradient(300, 300)):
        from_pil, _ = frame_image(Image.fromarray(image), 480, 720)
        from_tensor, _ = frame_image(torch.from_numpy(image).permute(2, 0, 1).float() / 255, 480, 720)
        torch.testing.assert_close(from_pil, from_tensor, atol=0, rtol=0)
    with pytest.raises(ValueError):
        frame_image(as_tensor[:2], 480, 720)


def test_framing_for():
    assert framing_for(480, 480) == "pad"
    assert framing_for(481, 480) == "crop" and framing_for(480, 720) == "crop"


@pytest.mark.parametrize(
    "src_w, src_h, box",
    [
        (300, 300, (60, 90, 180, 240)),
        (1000, 500, (400, 100, 600, 350)),
        (500, 900, (100, 300, 400, 600)),
        (300, 280, (10, 20, 200, 260)),
    ],
)
def test_frame_box_follows_the_pixels(src_w, src_h, box):
    source = np.zeros((src_h, src_w, 3), np.uint8)
    x0, y0, x1, y1 = box
    source[y0:y1, x0:x1] = 255
    framed, _ = frame_image(Image.fromarray(source), 480, 720)
    bright = (framed[0] > 0).numpy()
    rows, cols = np.nonzero(bright.any(axis=1))[0], np.nonzero(bright.any(axis=0))[0]
    found = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    mapped = frame_box(box, src_w, src_h, 480, 720)
    np.testing.assert_allclose(mapped, found, atol=1.5)


def test_frame_box_clips_to_the_frame():
    # a 1000×500 source is scaled to 960×480 and cropped 120 px on each side
    assert frame_box((0, 0, 1000, 500), 1000, 500, 480, 720) == (0, 0, 720, 480)
    assert frame_box((50, 0, 200, 100), 1000, 500, 480, 720) == pytest.approx((0, 0, 72, 96))


@pytest.mark.parametrize("height, width", [(480, 720), (64, 96), (60, 90), (96, 64)])
def test_crop_box_for_output(height, width):
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2  # the official crop: start_x = (w - min(w, h)) // 2
    assert crop_box_for_output("pad", height, width) == (x0, y0, x0 + side, y0 + side)
    assert crop_box_for_output("crop", height, width) == (0, 0, width, height)
    # the square kept is exactly where frame_image put the source
    framed, _ = frame_image(Image.fromarray(np.maximum(gradient(side, side), 8)), height, width)
    bx0, by0, bx1, by1 = crop_box_for_output("pad", height, width)
    assert (framed[:, by0:by1, bx0:bx1] > -1).all()
    outside = framed.clone()
    outside[:, by0:by1, bx0:bx1] = -1
    assert (outside == -1).all()  # every pixel outside the square is padding (exact; no float32 sums)


def test_crop_box_rejects_unknown_framing():
    with pytest.raises(ValueError):
        crop_box_for_output("stretch", 480, 720)
