"""Synthetic talking-head videos for the data-preparation tests, made from the shared portraits and speech.

A real portrait, its red channel dimmed, moves a little (a slow sub-pixel drift: head motion); on its face sits
a reddish patch, the "face" that the fake SCRFD of ``tests/test_face.py`` finds (it scores each 32×32 cell of its
letterboxed input by the cell's mean red, :func:`face_cell`), with a dark-red mouth whose height follows the
loudness of the speech frame by frame. The speech is muxed in (AAC) unless ``audio=False``.

The patch is 1.8 cells wide and drifts at most 0.2 cell from the centre of one cell, so that cell is always
covered and no other cell is red enough: exactly one face in every frame (``faces=0``: no patch; ``faces=2``:
a second patch two cells away, which the detector sees as a second face). :data:`DET_SIZE` is the detector's
input (the tests build it with that static size: 160 keeps the letterbox cheap at the tests' frame sizes).
"""

from __future__ import annotations

import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DET_SIZE = 160
CELL = 32  # the fake detector scores stride-32 cells
PATCH_CELLS = 1.8
DRIFT_CELLS = 0.2
FACE_RGB = (255, 150, 130)
MOUTH_RGB = (255, 20, 40)  # still red: the detector sees the patch whatever the mouth does


def det_scale(height: int, width: int) -> float:
    """insightface's letterbox scale into the detector's square input (source pixels → detector pixels)."""
    if height / width > 1:
        return DET_SIZE / height
    return int(DET_SIZE * height / width) / height


def face_cell(height: int, width: int, centre: tuple[float, float]) -> tuple[int, int]:
    """The detector cell (column, row) under a point of the source frame."""
    scale = det_scale(height, width)
    return int(centre[0] * scale // CELL), int(centre[1] * scale // CELL)


def loudness(speech: Path, fps: float, frames: int) -> np.ndarray:
    """RMS of the speech in each video frame's time span, scaled to [0, 1]."""
    with wave.open(str(speech)) as source:
        rate, channels, width = source.getframerate(), source.getnchannels(), source.getsampwidth()
        raw = source.readframes(source.getnframes())
    samples = np.frombuffer(raw, np.int16 if width == 2 else np.int8).astype(np.float64).reshape(-1, channels).mean(1)
    per_frame = rate / fps
    rms = np.array([np.sqrt(np.mean(samples[int(i * per_frame):int((i + 1) * per_frame)] ** 2) + 1e-12)
                    for i in range(frames)])
    return rms / max(rms.max(), 1e-9)


def mouth_area(frames: np.ndarray) -> np.ndarray:
    """Pixels of each RGB frame ``(n, H, W, 3)`` that show the mouth (red, hardly any green): how open it is."""
    frames = np.asarray(frames).astype(np.int16)
    return ((frames[..., 0] > 180) & (frames[..., 1] < 90)).sum(axis=(1, 2))


def portrait_frame(portrait: Path, width: int, height: int) -> Image.Image:
    """The portrait resized to cover ``width × height`` and centre-cropped, its red channel dimmed."""
    image = Image.open(portrait).convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height))).copy()
    pixels[..., 0] = (pixels[..., 0] * 0.3).astype(np.uint8)  # no cell is red enough for the fake detector
    return Image.fromarray(pixels)


def frames(portrait: Path, *, width: int, height: int, count: int, fps: float, mouth: np.ndarray,
           faces: int = 1, hidden: range = range(0)) -> list[np.ndarray]:
    """The video's RGB uint8 frames (``hidden``: frames where the face is not drawn)."""
    base = portrait_frame(portrait, width, height)
    scale = det_scale(height, width)
    cell = CELL / scale  # one detector cell in source pixels
    col, row = face_cell(height, width, (width * 0.5, height * 0.45))
    centres = [((col + 0.5) * cell, (row + 0.5) * cell)]
    if faces == 2:  # two cells away: the boxes overlap too little for NMS to merge them
        centres.append(((col - 1.5) * cell if col >= 2 else (col + 2.5) * cell, (row + 0.5) * cell))
    out = []
    for index in range(count):
        t = index / fps
        dx, dy = DRIFT_CELLS * cell * math.sin(2 * math.pi * t / 1.7), DRIFT_CELLS * cell * math.cos(2 * math.pi * t / 2.3)
        frame = base.transform(base.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.BILINEAR)
        draw = ImageDraw.Draw(frame)
        half = PATCH_CELLS * cell / 2
        for k, (cx, cy) in enumerate(centres[:faces] if index not in hidden else []):
            cx, cy = cx + dx, cy + dy
            draw.rectangle([cx - half, cy - half, cx + half - 1, cy + half - 1], fill=FACE_RGB)
            if k == 0:  # the speaker's mouth opens with the speech's loudness
                mouth_h = 1 + mouth[index] * 0.6 * half
                draw.ellipse([cx - 0.5 * half, cy + 0.3 * half - mouth_h / 2, cx + 0.5 * half,
                              cy + 0.3 * half + mouth_h / 2], fill=MOUTH_RGB)
        out.append(np.asarray(frame))
    return out


def make_video(path: Path, portrait: Path, speech: Path, *, seconds: float, width: int = 160, height: int = 160,
               fps: int | Fraction = 25, audio: bool = True, faces: int = 1, hidden: range = range(0)) -> Path:
    """Write a synthetic talking-head video: H.264 + AAC in .mp4, .mov or .mkv (the project's VideoWriter), or
    VP9 + Opus in .webm."""
    from hallo3_cli.video_io import VideoWriter

    count = int(round(seconds * float(fps)))
    mouth = loudness(speech, float(fps), count)
    pictures = frames(portrait, width=width, height=height, count=count, fps=float(fps), mouth=mouth, faces=faces,
                      hidden=hidden)
    if path.suffix == ".webm":
        return _write_webm(path, pictures, fps, speech if audio else None)
    with VideoWriter(path, width, height, fps=fps, audio=speech if audio else None) as writer:
        for frame in pictures:
            writer.write(frame[None])
    return path


def _write_webm(path: Path, pictures: list[np.ndarray], fps, speech: Path | None) -> Path:
    import av

    from hallo3_cli.audio_io import load_audio

    with av.open(str(path), "w", format="webm") as container:
        video = container.add_stream("libvpx-vp9", rate=Fraction(fps))
        video.height, video.width = pictures[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        sound = None
        if speech is not None:
            sound = container.add_stream("libopus", rate=48000, layout="mono")
        for index, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            frame.time_base = 1 / Fraction(fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            samples = load_audio(speech, 48000)[: round(len(pictures) / float(fps) * 48000)]
            for start in range(0, len(samples), 960):
                block = samples[start:start + 960]
                frame = av.AudioFrame.from_ndarray(block[None].astype(np.float32), format="flt", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
    return path
