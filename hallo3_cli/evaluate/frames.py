"""Video frames for scoring: decoded one at a time (PyAV), at 25 fps, and SyncNet's mouth crops.

Frame rate: SyncNet pairs 5 frames with 20 MFCC columns, i.e. it needs 25 fps (syncnet_python
converts every video with ``ffmpeg -r 25`` first). Every video is resampled from its frames' timestamps
by holding, at each instant k/25 s, the frame on screen then (frames are dropped or repeated, nothing
is interpolated): a constant 25 fps video comes out frame for frame, a variable-rate one is resampled
even when its average rate is 25.

Crops (``run_pipeline.py`` of syncnet_python, with the release's SCRFD detector for S3FD): per
frame the box half-size ``s = max(w, h) / 2`` and centre; each smoothed over time by a 13-tap
median filter (zero-padded at the ends like ``scipy.signal.medfilt``); the crop spans
``[cy - s, cy + s(1 + 2c)]`` × ``[cx - s(1 + c), cx + s(1 + c)]`` with ``c = 0.4`` (a square of side
2.8 s below the centre, taking in the mouth and chin), grey 110 outside the frame, resized to
224×224 with bilinear interpolation (``cv2.resize``'s arithmetic, :func:`hallo3_cli.face.resize_linear`),
BGR channel order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from hallo3_cli.errors import InputError, reason
from hallo3_cli.face import resize_linear
from hallo3_cli.fsutil import require_file

FPS = 25
CROP_SCALE = 0.4
CROP_SIZE = 224
PAD_VALUE = 110
SMOOTH_KERNEL = 13


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    has_audio: bool
    duration: float | None = None  # seconds the container declares for the video stream (None: not said)


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate and whether there is an audio track; InputError for anything unreadable."""
    import av

    path = require_file(path)
    if path.stat().st_size == 0:
        raise InputError("is empty (0 bytes)", path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError("has no video stream", path)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or FPS
            width, height = stream.codec_context.width, stream.codec_context.height
            has_audio = bool(container.streams.audio)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:  # e.g. Matroska: only the container's (microseconds)
                duration = container.duration / 1e6
            else:
                duration = None
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(f"cannot read video ({reason(err)})", path) from None
    if not width or not height:
        raise InputError("video stream has no frame size", path)
    return VideoInfo(int(width), int(height), float(rate), has_audio, duration)


MAX_HOLD_SECONDS = 600.0
"""A frame whose timestamp says it stays on screen longer than this is refused (a hostile or broken file could
otherwise ask for billions of held frames)."""


def iter_frames(path: str | Path, fps: int = FPS) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) at ``fps``, decoded one at a time: at each instant ``k / fps`` the frame on
    screen then, from the frames' own timestamps. Variable-frame-rate videos are resampled whatever their
    average rate says (a VFR file averaging 25 fps is not taken frame for frame); a constant 25 fps video
    comes out frame for frame. Frames without timestamps are placed at ``index / average rate``."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(Fraction(stream.average_rate or stream.guessed_rate or fps))
            held, held_time, held_duration, start, emitted = None, 0.0, None, None, 0
            for index, frame in enumerate(container.decode(stream)):
                image = frame.to_ndarray(format="rgb24")
                time = float(frame.time) if frame.time is not None else index / rate
                start = time if start is None else start
                time -= start
                if held is not None:
                    if time - held_time > MAX_HOLD_SECONDS:
                        raise InputError(f"frame {index}'s timestamp jumps {time - held_time:.0f} s past the previous "
                                         "one; re-encode the video at a constant frame rate", path)
                    while emitted / fps < time - 1e-6:  # instants before this frame shows the held one
                        yield held
                        emitted += 1
                held, held_time = image, max(time, held_time)
                held_duration = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
            if held is not None:
                shown = held_duration if held_duration and 0 < held_duration <= MAX_HOLD_SECONDS else 1.0 / rate
                while emitted / fps < held_time + shown - 1e-6:
                    yield held
                    emitted += 1
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(f"cannot decode video ({reason(err)})", path) from None


# ---------------------------------------------------------------------------------------------
# crops


def median_filter(values: np.ndarray, kernel: int = SMOOTH_KERNEL) -> np.ndarray:
    """Sliding median with zero padding at both ends (``scipy.signal.medfilt``)."""
    values = np.asarray(values, np.float64)
    half = kernel // 2
    padded = np.concatenate([np.zeros(half), values, np.zeros(half)])
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, kernel), axis=1)


def smooth_track(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) detection boxes, NaN rows where no face was found -> (n, 3) smoothed ``s, cx, cy``.

    Missing frames are interpolated linearly between detections and held before the first and
    after the last (syncnet_python interpolates the gaps of a track the same way)."""
    boxes = np.asarray(boxes, np.float64)
    found = ~np.isnan(boxes).any(1)
    if not found.any():
        raise ValueError("no detections to smooth")
    index = np.arange(len(boxes))
    filled = np.stack([np.interp(index, index[found], boxes[found, k]) for k in range(4)], 1)
    size = np.maximum(filled[:, 3] - filled[:, 1], filled[:, 2] - filled[:, 0]) / 2
    centre_y = (filled[:, 1] + filled[:, 3]) / 2
    centre_x = (filled[:, 0] + filled[:, 2]) / 2
    return np.stack([median_filter(size), median_filter(centre_x), median_filter(centre_y)], 1)


def lip_crop(frame: np.ndarray, size: float, centre_x: float, centre_y: float) -> np.ndarray:
    """SyncNet's 224×224 mouth-region crop of an (H, W, 3) uint8 frame (channel order kept)."""
    height, width = frame.shape[:2]
    pad = int(size * (1 + 2 * CROP_SCALE))
    my, mx = centre_y + pad, centre_x + pad  # in the padded frame, as syncnet_python indexes it
    y0, y1 = int(my - size), int(my + size * (1 + 2 * CROP_SCALE))
    x0, x1 = int(mx - size * (1 + CROP_SCALE)), int(mx + size * (1 + CROP_SCALE))
    # clip to the padded frame like numpy slicing does, then fill what lies outside the frame
    y0, y1 = min(max(y0, 0), height + 2 * pad), min(max(y1, 0), height + 2 * pad)
    x0, x1 = min(max(x0, 0), width + 2 * pad), min(max(x1, 0), width + 2 * pad)
    if y1 <= y0 or x1 <= x0:
        raise ValueError("empty crop")
    crop = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, np.uint8)
    sy0, sy1 = max(y0 - pad, 0), min(y1 - pad, height)
    sx0, sx1 = max(x0 - pad, 0), min(x1 - pad, width)
    if sy1 > sy0 and sx1 > sx0:
        crop[sy0 + pad - y0 : sy1 + pad - y0, sx0 + pad - x0 : sx1 + pad - x0] = frame[sy0:sy1, sx0:sx1]
    return resize_linear(crop, CROP_SIZE, CROP_SIZE)


def whole_frame_crop(frame: np.ndarray) -> np.ndarray:
    """Without a face detector: the centred square of the frame, resized to 224×224."""
    height, width = frame.shape[:2]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    return resize_linear(np.ascontiguousarray(frame[y0 : y0 + side, x0 : x0 + side]), CROP_SIZE, CROP_SIZE)
