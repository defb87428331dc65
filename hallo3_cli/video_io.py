"""Streaming mp4 writing with PyAV (docs/model.md §7.5).

:class:`VideoWriter` encodes frames as they arrive (H.264, yuv420p) and interleaves the speech track
(AAC) alongside, trimmed to the video's length, so memory does not grow with the video. The file
appears under its final name only when :meth:`VideoWriter.close` succeeds.

Float frames in [-1, 1] become bytes as ``((x + 1) / 2 * 255).round().clamp(0, 255)``. The official
code truncates (``astype(uint8)``) instead of rounding, which darkens every pixel by half a level on
average; rounding is the exact conversion and the difference is far below H.264's own error.
Colours are converted with the BT.601 matrix, limited range, and tagged as such in the stream
(the standard for SD-sized video, so players agree on the colours).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from hallo3_cli.errors import InputError, OutputError, reason
from hallo3_cli.fsutil import atomic_path, require_file

AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_AVCOL_SMPTE170M = 6  # BT.601 (525-line) for colorspace, primaries and transfer
_AVCOL_RANGE_MPEG = 1  # limited range (16..235)


def tensor_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Float frames ``(n, 3, H, W)`` in [-1, 1] → uint8 ``(n, H, W, 3)``."""
    values = ((frames.detach().float().cpu() + 1) / 2 * 255).round().clamp(0, 255)
    return values.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


ENCODER_THREADS = 2


class VideoWriter:
    """Write frames to an H.264 mp4, optionally muxing a speech recording as AAC.

    ``width`` × ``height`` is the size of the frames given to :meth:`write`. ``crop`` = ``(x0, y0, x1,
    y1)`` keeps only that region (e.g. :func:`hallo3_cli.image_io.crop_box_for_output`). H.264 in
    yuv420p needs even sizes: an odd output width or height loses its last column or row.
    ``audio`` is any file FFmpeg can decode; it is muxed from ``audio_offset`` seconds on, at its own
    sample rate (48 kHz if AAC cannot store that rate), mono or stereo as the input (more channels are
    downmixed to stereo), and cut at the video's duration (frames / fps).

    Use as a context manager; on an exception, or :meth:`abort`, no file is left behind::

        with VideoWriter("out.mp4", 720, 480, audio="speech.wav", crop=(120, 0, 600, 480)) as writer:
            for clip in clips:
                writer.write(clip)
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: int | Fraction = 25,
        audio: str | Path | None = None,
        crop: tuple[int, int, int, int] | None = None,
        audio_offset: float = 0.0,
        crf: int = 18,
        preset: str = "medium",
        tag: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tag = dict(tag or {})
        self.width, self.height = int(width), int(height)
        self.fps = Fraction(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if audio_offset < 0:
            raise ValueError(f"audio_offset must be >= 0, got {audio_offset}")
        x0, y0, x1, y1 = crop if crop is not None else (0, 0, self.width, self.height)
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValueError(f"crop {crop} is not inside the {self.width}×{self.height} frame")
        out_w, out_h = (x1 - x0) // 2 * 2, (y1 - y0) // 2 * 2
        if out_w < 2 or out_h < 2:
            raise ValueError(f"output size {x1 - x0}×{y1 - y0} is too small for H.264")
        self._crop = (slice(y0, y0 + out_h), slice(x0, x0 + out_w))
        self.output_size = (out_w, out_h)
        self.frames_written = 0

        self._audio: _AudioFeed | None = None
        self._container = None
        self._closed = False
        if audio is not None:
            self._audio = _AudioFeed(audio, audio_offset)
        try:
            self._atomic = atomic_path(self.path)
            try:
                self._tmp = self._atomic.__enter__()
            except OSError as err:
                raise OutputError(
                    f"cannot create a file in the output folder ({err.strerror or err})", self.path
                ) from None
        except BaseException:
            if self._audio is not None:
                self._audio.close()
            raise
        try:
            self._open(crf, preset)
        except BaseException as err:
            self._abort(err)
            if isinstance(err, (av.FFmpegError, OSError)):
                raise OutputError(f"cannot write video ({err})", self.path) from None
            raise

    def _open(self, crf: int, preset: str) -> None:
        container_format = _CONTAINER_FORMATS.get(self.path.suffix.lower(), "mp4")
        options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
        self._container = av.open(str(self._tmp), "w", format=container_format, options=options)
        if self.tag:
            self._container.metadata["comment"] = format_render_tag(self.tag)
        # A fixed thread count: x264's output depends on it, and "auto" follows the machine (and the
        # process's CPU set), so identical frames would not always give identical files.
        video = self._container.add_stream("libx264", rate=self.fps,
                                           options={"crf": str(crf), "preset": preset, "threads": str(ENCODER_THREADS)})
        video.width, video.height = self.output_size
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = 1 / self.fps
        context = video.codec_context
        context.colorspace = context.color_primaries = context.color_trc = _AVCOL_SMPTE170M
        context.color_range = _AVCOL_RANGE_MPEG
        self._video = video
        if self._audio is not None:
            self._audio.add_output_stream(self._container)

    # -----------------------------------------------------------------------------------------

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode frames now: uint8 numpy ``(n, H, W, 3)`` or float torch ``(n, 3, H, W)`` in [-1, 1].
        The speech is muxed up to the same point, so nothing accumulates between calls."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        if isinstance(frames, torch.Tensor):
            if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
                raise ValueError(f"expected float frames (n, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
            as_uint8 = (tensor_to_uint8(frames[i : i + 1])[0] for i in range(frames.shape[0]))
            size = tuple(frames.shape[2:])
        else:
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
                raise ValueError(f"expected uint8 frames (n, H, W, 3), got {frames.dtype} {frames.shape}")
            as_uint8 = iter(frames)
            size = frames.shape[1:3]
        if size != (self.height, self.width):
            raise ValueError(f"frames are {size[1]}×{size[0]}, the writer expects {self.width}×{self.height}")
        try:
            for frame in as_uint8:
                self._encode_frame(frame)
            if self._audio is not None:
                self._audio.encode_until(self._audio_samples_for_video(), self._mux)
        except BaseException as err:
            self._fail(err)

    def close(self) -> None:
        """Flush the encoders, finish the audio and move the file to its final name."""
        if self._closed:
            return
        if self.frames_written == 0:
            self._fail(OutputError("no frames were written", self.path))
        try:
            self._mux(self._video.encode(None))
            if self._audio is not None:
                self._audio.encode_until(self._audio_samples_for_video(), self._mux)
                self._audio.flush(self._mux)
                self._audio.close()
            self._container.close()
            self._closed = True
            self._atomic.__exit__(None, None, None)
        except BaseException as err:
            self._fail(err)

    def abort(self) -> None:
        """Stop writing and remove the partial file."""
        if not self._closed:
            self._abort(RuntimeError("aborted"))

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        elif not self._closed:
            self._abort(exc)

    # -----------------------------------------------------------------------------------------

    def _encode_frame(self, rgb: np.ndarray) -> None:
        rgb = np.ascontiguousarray(rgb[self._crop])
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame = frame.reformat(
            format="yuv420p", dst_colorspace=av.video.reformatter.Colorspace.ITU601, dst_color_range=_AVCOL_RANGE_MPEG
        )
        frame.pts = self.frames_written
        frame.time_base = self._video.codec_context.time_base
        self._mux(self._video.encode(frame))
        self.frames_written += 1

    def _audio_samples_for_video(self) -> int:
        return round(self.frames_written / self.fps * self._audio.rate)

    def _mux(self, packets) -> None:
        self._container.mux(packets)

    def _fail(self, err: BaseException) -> None:
        self._abort(err)
        if isinstance(err, (av.FFmpegError, OSError)) and not isinstance(err, (InputError, OutputError)):
            raise OutputError(f"cannot write video ({err})", self.path) from err
        raise err

    def _abort(self, err: BaseException) -> None:
        self._closed = True
        if self._audio is not None:
            self._audio.close()
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass  # the file is being discarded anyway
        self._atomic.__exit__(type(err), err, err.__traceback__)


class _AudioFeed:
    """Decodes the speech file lazily and hands the encoder exactly the samples the video covers."""

    def __init__(self, path: str | Path, offset_seconds: float):
        self.path = require_file(path)
        try:
            self._input = av.open(str(self.path))
        except (av.FFmpegError, OSError) as err:
            raise InputError(f"cannot read audio ({reason(err)})", self.path) from None
        if not self._input.streams.audio:
            self._input.close()
            raise InputError("has no audio stream", self.path)
        source = self._input.streams.audio[0]
        rate = source.codec_context.sample_rate
        self.rate = rate if rate in AAC_SAMPLE_RATES else 48000
        self.layout = "mono" if source.codec_context.channels == 1 else "stereo"
        self._source = source
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._to_skip = round(offset_seconds * self.rate)
        self._pending: list[np.ndarray] = []
        self._blocks = self._decoded_blocks()
        self._exhausted = False
        self.encoded = 0
        self._stream = None

    def add_output_stream(self, container) -> None:
        channels = 1 if self.layout == "mono" else 2
        self._stream = container.add_stream("aac", rate=self.rate, layout=self.layout)
        self._stream.bit_rate = 64000 * channels
        self._stream.codec_context.time_base = Fraction(1, self.rate)

    def encode_until(self, total_samples: int, mux) -> None:
        """Encode samples up to ``total_samples`` (counted from the offset), or until the audio ends."""
        while self.encoded < total_samples:
            block = self._take(min(total_samples - self.encoded, 1024))
            if block is None:
                return
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self.encoded
            frame.time_base = Fraction(1, self.rate)
            mux(self._stream.encode(frame))
            self.encoded += block.shape[1]

    def flush(self, mux) -> None:
        mux(self._stream.encode(None))

    def close(self) -> None:
        if self._input is not None:
            self._input.close()
            self._input = None

    def _take(self, count: int) -> np.ndarray | None:
        available = sum(block.shape[1] for block in self._pending)
        while available < count and not self._exhausted:
            block = next(self._blocks, None)
            if block is None:
                self._exhausted = True
                break
            if self._to_skip:
                dropped = min(self._to_skip, block.shape[1])
                block, self._to_skip = block[:, dropped:], self._to_skip - dropped
            if block.shape[1]:
                self._pending.append(block)
                available += block.shape[1]
        if available == 0:
            return None
        joined = np.concatenate(self._pending, axis=1) if len(self._pending) > 1 else self._pending[0]
        taken, rest = joined[:, :count], joined[:, count:]
        self._pending = [rest] if rest.shape[1] else []
        return np.ascontiguousarray(taken, dtype=np.float32)

    def _decoded_blocks(self):
        try:
            for frame in self._input.decode(self._source):
                frame.pts = None  # samples are taken in order; gaps or odd start times do not matter
                for out in self._resampler.resample(frame):
                    yield out.to_ndarray()
            for out in self._resampler.resample(None):
                yield out.to_ndarray()
        except (av.FFmpegError, OSError) as err:
            raise InputError(f"cannot decode audio ({reason(err)})", self.path) from None




RENDER_TAG = "hallo3-cli render"
"""How the ``comment`` of a video ``hallo3 render`` wrote begins; ``key=value`` pairs follow (``model=...``),
so that ``hallo3 eval`` can tell which preset made it."""


def format_render_tag(tag: dict[str, str]) -> str:
    """``VideoWriter(tag=...)``'s container comment: ``hallo3-cli render; key=value; ...``."""
    return "; ".join([RENDER_TAG, *(f"{key}={value}" for key, value in tag.items())])


def read_render_tag(path: str | Path) -> dict[str, str] | None:
    """The ``key=value`` pairs of a video written with ``VideoWriter(tag=...)`` (reads the container header
    only), or ``None`` for any other or unreadable file."""
    try:
        with av.open(str(path)) as container:
            comment = str(container.metadata.get("comment", ""))
    except (av.FFmpegError, OSError, ValueError):
        return None
    parts = [part.strip() for part in comment.split(";")]
    if not parts or parts[0] != RENDER_TAG:
        return None
    return dict(part.split("=", 1) for part in parts[1:] if "=" in part)


def read_video(path: str | Path) -> tuple[np.ndarray, float, float | None]:
    """Decode a whole video (for tests and checks): uint8 frames ``(n, H, W, 3)``, the frame rate and
    the audio duration in seconds (``None`` without audio). Loads everything into memory.

    The audio duration is the presented one (the container's edit list removes the AAC encoder's
    priming samples and the padding of its last frame); decoding alone would count the padding too.
    """
    path = require_file(path)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            audio_duration = None
            if container.streams.audio:
                audio = container.streams.audio[0]
                if audio.duration is not None:
                    audio_duration = float(audio.duration * audio.time_base)
                else:  # containers without per-stream durations (e.g. Matroska)
                    samples = sum(frame.samples for frame in container.decode(audio))
                    audio_duration = samples / audio.codec_context.sample_rate
    except (av.FFmpegError, OSError, IndexError) as err:
        raise InputError(f"cannot read video ({reason(err)})", path) from None
    if not frames:
        raise InputError("video holds no frames", path)
    return np.stack(frames), fps, audio_duration
