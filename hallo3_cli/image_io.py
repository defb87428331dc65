"""Portrait loading and framing (docs/model.md §7.1).

``load_image`` turns any reasonable image file into an 8-bit RGB ``PIL.Image``; ``frame_image`` fits it
to the model's frame exactly as the official sampler does:

- square source (width == height): resize to a ``side × side`` square, ``side = min(height, width)``
  (bilinear, antialiased: torchvision ``Resize`` defaults), then pad the remaining width (or height)
  with zeros split evenly, the extra pixel on the right/bottom. Zero is black in [0, 1], so the pad
  is -1 after ``×2 - 1``. Framing ``"pad"``.
- any other shape: bicubic (antialiased) resize so the image covers the frame, the long side scaled to
  ``int(side * frame / short)`` exactly as the official code truncates, then a centre crop.
  Framing ``"crop"``. Like the official code this path is not clamped, so bicubic overshoot can leave
  values slightly outside [-1, 1].
- training's rule (``framing="squash"``, docs/model.md §10.2), for every shape: bicubic (antialiased)
  resize to a ``side × side`` square whatever the aspect ratio, then the same zero padding as ``"pad"``.
  Not clamped either (the release resizes uint8 frames, which clamps: :func:`to_uint8` does that).

Training frames are stored compressed (:func:`encode_frame`, :func:`decode_frame`: JPEG or lossless PNG).

The official code resizes with torchvision on tensors (antialias on by default since torchvision
0.17); ``torch.nn.functional.interpolate(..., antialias=True)`` is the same computation.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from hallo3_cli.errors import InputError
from hallo3_cli.errors import reason as first_line
from hallo3_cli.fsutil import require_file

MIN_SIDE = 64
"""Smallest accepted short side in pixels: below this a face cannot be detected or rendered usefully."""

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Larger images are reduced on load (JPEG: DCT draft decoding; others: integer box filter) to at most
this many pixels, which bounds memory. The model frame is 480×720, so the framed result barely moves:
measured on a textured 24 MP JPEG, 0.12 8-bit levels on average (max 0.84) against a full decode."""

MAX_SOURCE_PIXELS = 16384 * 16384
"""Images with more pixels than this are refused (decompression-bomb guard, replaces PIL's own)."""

MAX_DECODED_PIXELS = 8192 * 8192
"""The pixel budget of one decode. JPEG decodes at 1/2, 1/4 or 1/8 scale, so a JPEG of up to
:data:`MAX_SOURCE_PIXELS` fits it; the other formats cannot reduce while decoding, so above it they are
refused (exit 3) from their header, before any pixel is decoded (a 1 MB 16384×16384 PNG would take
gigabytes). At the budget a decode holds about 256 MiB (4 bytes per pixel), its conversion as much."""

FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF", "TIFF": "TIFF"}
"""The image formats a portrait may be in (PIL plugin → what the user calls it). The file's first bytes
must say one of them before PIL sees it, and PIL is asked to try only these plugins: nothing else is
ever parsed, and no decoder that runs a program (EPS and PDF run Ghostscript) is reachable."""

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
# what a refused file most likely is, to say so (never opened)
_KNOWN_OTHERS = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"),
    (b"8BPS", "Photoshop PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_PIL_OPENERS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]  # (MPO files open through the JPEG plugin)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_PIL_LIMIT_LOCK = threading.Lock()


def image_format(path: str | Path) -> str:
    """The format of an image file from its first bytes (a :data:`FORMATS` value), before any decoder runs;
    :class:`InputError` naming the file for anything else (with what it looks like, when known)."""
    path = require_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror or err})", path) from None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    supported = ", ".join(dict.fromkeys(FORMATS.values()))
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace").strip()
        what = "HEIC/HEIF" if brand in ("heic", "heix", "mif1", "msf1", "hevc") else "AVIF" if brand.startswith("avi") else None
        if what:
            raise InputError(f"is a {what} image, which is not supported; convert it to JPEG or PNG ({supported})", path)
    if not head:
        raise InputError(f"is empty: not an image file ({supported})", path)
    for magic, name in _KNOWN_OTHERS:
        if head.lstrip().startswith(magic):
            raise InputError(f"is {name}, not an image file in a supported format ({supported}); it was not opened", path)
    raise InputError(f"not an image file, or not one of the supported formats ({supported})", path)


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as 8-bit RGB with its EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted (16-bit is scaled to 8 bits, not clipped).
    Transparent pixels are composited over black, the colour the model sees in its padding, so
    whatever colour values hide under full transparency cannot leak into the portrait.
    Images above ``max_pixels`` are reduced while decoding to keep memory bounded (``None``: never).
    Raises :class:`InputError` naming the file for anything that is not a usable image.

    The official loader (``Image.open(path).convert("RGB")``) ignores EXIF orientation, drops alpha
    without compositing and clips 16-bit values; for ordinary 8-bit RGB files the pixels are identical.
    """
    path = require_file(path)
    image_format(path)  # by content, before PIL parses anything
    try:
        with _pil_bomb_check_disabled(), Image.open(path, formats=_PIL_OPENERS) as source:
            image = _decode(source, path, max_pixels)
            if image is source:
                image = source.copy()  # closing the source releases its pixels too
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not an image file, or a format PIL cannot read", path) from None
    except MemoryError:
        raise
    except Exception as err:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError, ...) for bad data
        reason = first_line(err)
        raise InputError(f"cannot decode image ({reason})", path) from None
    return image


def rgb_array(image, name: str = "image") -> np.ndarray:
    """A portrait given in memory (the Python API) as a uint8 ``(H, W, 3)`` RGB array: a PIL image (any mode),
    or an array ``(H, W, 3)`` / ``(H, W)`` (grey) / ``(H, W, 4)`` (alpha dropped) of uint8, or of floats in
    [0, 1] (scaled to 0..255 and rounded). Anything else: ``TypeError``/``ValueError`` naming ``name``."""
    from hallo3_cli.errors import ArgumentError

    if isinstance(image, Image.Image):
        return np.array(_to_rgb(image), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a file path, a PIL image or an (H, W, 3) array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ArgumentError(f"{name} must be an (H, W, 3) RGB array, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ArgumentError(f"{name} is too small ({image.shape[1]}×{image.shape[0]}); the short side must be at "
                            f"least {MIN_SIDE} pixels")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ArgumentError(f"{name} is a float array: its values must be finite and in [0, 1] "
                                f"(got {np.nanmin(image):g} to {np.nanmax(image):g}); pass uint8 for 0..255")
        return np.round(image * 255).astype(np.uint8)
    raise TypeError(f"{name} must be uint8 (0..255) or float in [0, 1], got dtype {image.dtype}")


def _decode(image: Image.Image, path: Path, max_pixels: int | None) -> Image.Image:
    width, height = image.size
    if width * height > MAX_SOURCE_PIXELS:
        raise InputError(
            f"image is {width}×{height} ({width * height / 1e6:.0f} megapixels), more than the "
            f"{MAX_SOURCE_PIXELS / 1e6:.0f} megapixels accepted; downscale it first",
            path,
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"image is too small ({width}×{height}); the short side must be at least {MIN_SIDE} pixels", path
        )
    factor = _reduction_factor(width, height, max_pixels)
    reducible = image.format in ("JPEG", "MPO")
    if factor > 1 and reducible:
        # libjpeg decodes directly at 1/2, 1/4 or 1/8 scale: take the power of two that is enough
        scale = min(8, 1 << (factor - 1).bit_length())
        image.draft(None, (math.ceil(width / scale), math.ceil(height / scale)))
    decoded = image.size[0] * image.size[1]  # after draft: what load() will allocate
    if decoded > MAX_DECODED_PIXELS:
        kind = FORMATS.get(image.format or "", image.format)
        raise InputError(
            f"image is {width}×{height} ({width * height / 1e6:.0f} megapixels); {kind} images cannot be reduced "
            f"while decoding and at most {MAX_DECODED_PIXELS / 1e6:.0f} megapixels are decoded; downscale it first "
            "(or save it as JPEG)",
            path,
        )
    image.load()
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a damaged EXIF block must not reject pixels that decoded fine
        pass
    image = _to_rgb(image)
    factor = _reduction_factor(*image.size, max_pixels)
    if factor > 1:
        image = image.reduce(factor)
    return image


def _reduction_factor(width: int, height: int, max_pixels: int | None) -> int:
    if max_pixels is None:
        return 1
    return max(1, math.ceil(math.sqrt(width * height / max_pixels)))


@contextlib.contextmanager
def _pil_bomb_check_disabled():
    """PIL's decompression-bomb limit warns at 89 MP and refuses at 179 MP, which would stop a
    legitimate 108 MP photo; :data:`MAX_SOURCE_PIXELS` is checked instead. The lock keeps PIL's
    global setting consistent when several threads load images."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255; scale the 0..65535 range instead.
        # round(v / 257) in integers (no ties: 257 is odd), 4 bytes per pixel instead of float64's 8
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        gray = ((2 * values + 257) // 514).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        black = Image.new("RGB", rgba.size, (0, 0, 0))
        black.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return black
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# framing (docs/model.md §7.1)


@dataclass(frozen=True)
class FrameGeometry:
    """Where the resized source lands in the frame: the source is scaled to ``resized_width ×
    resized_height`` and its top-left corner placed at ``(offset_x, offset_y)`` (negative when cropped)."""

    framing: str
    resized_width: int
    resized_height: int
    offset_x: int
    offset_y: int


FRAMINGS = ("pad", "crop", "squash")


def framing_for(source_width: int, source_height: int) -> str:
    """Inference's rule: ``"pad"`` for a square source (the official ``h == w`` test), ``"crop"`` otherwise."""
    return "pad" if source_width == source_height else "crop"


def squash_size(height: int, width: int) -> int:
    """Side of the square a ``"pad"``/``"squash"`` framing resizes to (480 in a 480×720 frame)."""
    return min(height, width)


def frame_geometry(source_width: int, source_height: int, height: int, width: int,
                   framing: str | None = None) -> FrameGeometry:
    """The resize and placement :func:`frame_image` applies to a ``source_width × source_height`` image
    (``framing``: None = inference's rule, :func:`framing_for`; ``"squash"`` = training's)."""
    framing = framing_for(source_width, source_height) if framing is None else framing
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}")
    if framing in ("pad", "squash"):
        side = squash_size(height, width)
        return FrameGeometry(framing, side, side, (width - side) // 2, (height - side) // 2)
    if source_width / source_height > width / height:
        resized_h, resized_w = height, int(source_width * height / source_height)
    else:
        resized_h, resized_w = int(source_height * width / source_width), width
    # The official code truncates; guard against a float rounding that would fall one pixel short.
    resized_h, resized_w = max(resized_h, height), max(resized_w, width)
    return FrameGeometry("crop", resized_w, resized_h, -((resized_w - width) // 2), -((resized_h - height) // 2))


def frame_image(image: Image.Image | torch.Tensor, height: int, width: int,
                framing: str | None = None) -> tuple[torch.Tensor, str]:
    """Fit a portrait to the model frame (docs/model.md §7.1; training frames: §10.2).

    ``image`` is an RGB ``PIL.Image`` or a float tensor ``(3, h, w)`` in [0, 1] (e.g. the face-masked
    image, which the official code masks at source resolution and then frames the same way).
    ``framing``: None = inference's rule (``"pad"`` for square sources, else ``"crop"``); ``"squash"`` =
    training's (any aspect resized to the square, then padded). Returns the framed float32 tensor
    ``(3, height, width)`` in [-1, 1] and the framing.
    """
    pixels = _to_unit_tensor(image)
    _, source_h, source_w = pixels.shape
    geometry = frame_geometry(source_w, source_h, height, width, framing)
    size = (geometry.resized_height, geometry.resized_width)
    if geometry.framing in ("pad", "squash"):
        squash = geometry.framing == "squash"  # training resizes bicubic (DV:152-173), inference bilinear
        resized = _resize(pixels, size, "bicubic" if squash else "bilinear")
        pad_x, pad_y = geometry.offset_x, geometry.offset_y
        framed = F.pad(resized, (pad_x, width - size[1] - pad_x, pad_y, height - size[0] - pad_y), value=0.0)
        if not squash:
            framed = framed.clamp(0, 1)
    else:
        top, left = -geometry.offset_y, -geometry.offset_x
        if size[0] * size[1] > MAX_COVER_FACTOR * height * width:
            framed = _resize_window(pixels, size, top, left, height, width)
        else:
            resized = _resize(pixels, size, "bicubic")
            framed = resized[:, top : top + height, left : left + width]
    return (framed * 2.0 - 1.0).contiguous(), geometry.framing


def frame_box(
    box: tuple[float, float, float, float], source_width: int, source_height: int, height: int, width: int,
    framing: str | None = None,
) -> tuple[float, float, float, float]:
    """Map a box ``(x0, y0, x1, y1)`` in source-pixel edge coordinates to the framed image, clipped
    to the frame. Round outwards (floor/ceil) if integer pixels are needed."""
    geometry = frame_geometry(source_width, source_height, height, width, framing)
    scale_x = geometry.resized_width / source_width
    scale_y = geometry.resized_height / source_height
    x0, y0, x1, y1 = box
    mapped = (
        x0 * scale_x + geometry.offset_x,
        y0 * scale_y + geometry.offset_y,
        x1 * scale_x + geometry.offset_x,
        y1 * scale_y + geometry.offset_y,
    )
    return (
        min(max(mapped[0], 0.0), width),
        min(max(mapped[1], 0.0), height),
        min(max(mapped[2], 0.0), width),
        min(max(mapped[3], 0.0), height),
    )


def crop_box_for_output(framing: str, height: int, width: int) -> tuple[int, int, int, int]:
    """The part of each generated frame that goes into the video (docs/model.md §7.5): the centre square for
    a padded (square) source, the full frame otherwise. Returns ``(x0, y0, x1, y1)``."""
    if framing == "pad":
        side = min(height, width)
        x0, y0 = (width - side) // 2, (height - side) // 2
        return x0, y0, x0 + side, y0 + side
    if framing == "crop":
        return 0, 0, width, height
    raise ValueError(f"unknown framing {framing!r}")


def _to_unit_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = _to_rgb(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    return image.float()


MAX_COVER_FACTOR = 4
"""A cover resize larger than this many frames (a very thin or very wide source: 64×100000 would make a
720×1125000 image, 9.7 GB in float32) computes only the frame's window (:func:`_resize_window`)."""


def _aa_weights(in_size: int, out_size: int, start: int, count: int) -> tuple[int, torch.Tensor]:
    """The antialiased bicubic weights (Keys, a = -0.5: PIL's and torch's ``antialias=True``) of output pixels
    ``start .. start + count`` of an ``in_size`` → ``out_size`` resize: ``(first input index, (count, n))``."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(start, start + count, dtype=np.float64) + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # truncation, as torch computes it
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    first, last = int(lo.min()), int(hi.max())
    taps = np.arange(first, last, dtype=np.float64)
    x = np.abs((taps[None, :] - centre[:, None] + 0.5) * invscale)
    a = -0.5
    weights = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    weights *= (taps[None, :] >= lo[:, None]) & (taps[None, :] < hi[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    return first, torch.from_numpy(weights)


def _resize_window(pixels: torch.Tensor, size: tuple[int, int], top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``_resize(pixels, size, "bicubic")[:, top:top + height, left:left + width]`` without building the whole
    resized image: the separable weights of the window's rows and columns only, applied to the source
    pixels they reach (the same maths in another summation order, in float64; tests compare to 1e-6)."""
    _, source_h, source_w = pixels.shape
    y0, rows = _aa_weights(source_h, size[0], top, height)
    x0, cols = _aa_weights(source_w, size[1], left, width)
    region = pixels[:, y0 : y0 + rows.shape[1], x0 : x0 + cols.shape[1]].double()
    return (rows @ (region @ cols.T)).float()


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(pixels.shape[1:]) == size:
        return pixels  # torchvision returns the input untouched when the size already matches
    return F.interpolate(pixels[None], size=size, mode=mode, align_corners=False, antialias=True)[0]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` image in [-1, 1] as uint8 ``(H, W, 3)``, rounded and clamped (what resizing a uint8 frame
    with torchvision gives, as the release does for its training frames)."""
    return ((image.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


FRAME_CODECS = ("jpeg", "png")


def encode_frame(rgb: np.ndarray, codec: str = "jpeg", quality: int = 95) -> bytes:
    """An RGB uint8 ``(H, W, 3)`` frame as JPEG (``quality``, full-resolution chroma) or lossless PNG bytes."""
    import io

    if codec not in FRAME_CODECS:
        raise ValueError(f"unknown frame codec {codec!r}; use one of {', '.join(FRAME_CODECS)}")
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if codec == "jpeg":
        picture.save(buffer, format="JPEG", quality=int(quality), subsampling=0)
    else:
        picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_frame(data: bytes | np.ndarray) -> np.ndarray:
    """Bytes of :func:`encode_frame` → RGB uint8 ``(H, W, 3)``; ``ValueError`` for undecodable data."""
    import io

    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        with Image.open(io.BytesIO(raw)) as picture:
            if picture.format not in ("JPEG", "PNG"):
                raise ValueError(f"not a JPEG or PNG frame ({picture.format})")
            return np.array(picture.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"undecodable frame ({first_line(err)})") from None


def preview_image(framed: torch.Tensor, inside: torch.Tensor, box: list[int]) -> Image.Image:
    """The framed image with the face box drawn and the area outside the face mask dimmed."""
    from PIL import ImageDraw

    image = ((framed.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    inside = inside.numpy()
    image = np.where(inside[..., None], image, (image * 0.45).astype(np.uint8))
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    draw.rectangle([box[0], box[1], max(box[0], box[2] - 1), max(box[1], box[3] - 1)], outline=(0, 255, 0), width=2)
    return picture


def write_preview(path: str | Path, framed: torch.Tensor, inside: torch.Tensor, box: list[int]) -> Path:
    """:func:`preview_image` written as a PNG (atomically)."""
    from hallo3_cli import fsutil

    picture = preview_image(framed, inside, box)
    with fsutil.atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
