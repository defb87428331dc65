"""Decoding speech recordings with PyAV: any container/codec FFmpeg reads, as float32 at a fixed rate.

``load_audio`` returns exactly ``round(samples_in * rate / native_rate)`` samples, aligned with the
source: FFmpeg's sample-rate converter compensates its own filter delay, and encoder priming and
padding are removed where the file says how much there is (MP3 LAME/Xing tags and Opus pre-skip
are applied by FFmpeg itself; MP4/M4A edit lists trim the start, the track duration trims the end).
Raw ADTS ``.aac`` carries no such information: the standard 1024-sample AAC-LC priming is dropped
and the padding of the last frame (< 1024 samples at the native rate) remains.

Accepted: any sample rate from :data:`MIN_SAMPLE_RATE` (8 kHz, telephone speech) up, resampled to
16 kHz; any number of channels, averaged to mono (the separator's stereo input: the file's two
channels, mono duplicated, or more channels averaged and duplicated).

Refused, each with a one-line :class:`InputError` naming the file: missing or unreadable files, files
FFmpeg cannot parse, files without an audio stream, sample rates below 8 kHz, WAV files holding less
data than their header declares (a cut copy or recording: FFmpeg would silently decode the part that
is there, and the video would be shorter than the recording the user thinks they gave), recordings
that fail to decode part way (a silent gap would shift lip sync), empty recordings, recordings
shorter than :data:`MIN_DURATION` seconds and silent recordings.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from hallo3_cli.errors import InputError, reason
from hallo3_cli.fsutil import require_file

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 8000
MIN_DURATION = 0.5
"""Shortest accepted recording in seconds (wav2vec needs some context; Hallo3 makes 12.5 frames of it)."""
SILENCE_PEAK = 1e-4
"""Recordings whose peak amplitude stays below this (-80 dBFS) are refused as silent."""
AAC_PRIMING = 1024

_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


@dataclass(frozen=True)
class AudioInfo:
    """What a recording holds, after priming/padding removal (native rate, before any resampling)."""

    sample_rate: int
    channels: int
    num_samples: int
    codec: str
    container: str

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, *, mono: bool = True) -> np.ndarray:
    """Decode a speech recording to float32 at ``sample_rate``.

    ``mono=True`` (default) averages the channels and returns shape ``(samples,)``; ``mono=False``
    returns ``(channels, samples)``: the file's one or two channels (more are averaged into two
    identical ones). The sample count is exactly
    ``round(duration * sample_rate)``.
    """
    info, chunks = _decode(path, mono=mono, sample_rate=sample_rate)
    audio = np.concatenate(chunks, axis=-1) if chunks else np.zeros((1, 0), np.float32)
    expected = _rescaled_length(info.num_samples, info.sample_rate, sample_rate)
    audio = _fit_length(audio, expected)
    path = Path(path)
    if info.num_samples == 0:
        raise InputError("contains no audio samples", path)
    if info.duration < MIN_DURATION:
        raise InputError(f"is too short ({info.duration:.2f} s); at least {MIN_DURATION} s of speech is needed", path)
    if not np.isfinite(audio).all():
        raise InputError("decodes to invalid (non-finite) sample values", path)
    if float(np.abs(audio).max()) < SILENCE_PEAK:
        raise InputError("contains only silence", path)
    if not normalisable(audio):
        raise InputError(f"holds samples up to {float(np.abs(audio).max()):.3g}, too large to normalise in float32 "
                         "(a float recording far outside [-1, 1]: the features would be NaN); rescale it", path)
    return audio[0] if mono else audio


def normalisable(samples: np.ndarray) -> bool:
    """Whether wav2vec2's zero-mean unit-variance normalisation of ``samples`` (float32 statistics, as
    ``audio.compute_features`` and transformers compute them) stays finite: a float recording of huge
    amplitude overflows the variance (values past ~1e19 square past float32's range)."""
    samples = np.asarray(samples, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(samples.mean()) and np.isfinite(samples.var()))


def check_waveform(samples, name: str = "audio") -> np.ndarray:
    """Samples given in memory (the Python API): a 1-D array of mono float samples, finite and not empty, as
    float32; else ``TypeError``/``ValueError`` naming ``name`` and the problem."""
    from hallo3_cli.errors import ArgumentError

    if not isinstance(samples, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of mono samples, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise ArgumentError(f"{name} must be 1-D mono samples, got an array of shape {samples.shape} "
                            "(average the channels first)")
    if not (np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {samples.dtype}")
    if samples.size == 0:
        raise ArgumentError(f"{name} is empty")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise ArgumentError(f"{name} holds NaN or infinite samples")
    if not normalisable(samples):
        raise ArgumentError(f"{name} holds samples up to {float(np.abs(samples).max()):.3g}, too large to normalise in "
                            "float32 (expected float samples in about [-1, 1])")
    return samples


def audio_info(path: str | Path) -> AudioInfo:
    """Probe a recording: native rate, channels and exact sample count (decodes, does not resample)."""
    info, _ = _decode(path, mono=True, sample_rate=None, keep=False)
    return info


def audio_duration(path: str | Path) -> float:
    """Exact duration of a recording in seconds (see :func:`audio_info`)."""
    return audio_info(path).duration


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float audio ``(samples,)`` or ``(channels, samples)`` with FFmpeg's resampler.

    The result has exactly ``round(samples * to_rate / from_rate)`` samples.
    """
    audio = np.asarray(audio, dtype=np.float32)
    planar = audio if audio.ndim == 2 else audio[None]
    if from_rate == to_rate:
        return audio.copy()
    converter = _RateConverter(planar.shape[0], from_rate, to_rate)
    step = 1 << 16
    out = [converter.push(planar[:, i : i + step]) for i in range(0, planar.shape[1], step)]
    out.append(converter.flush())
    result = _fit_length(np.concatenate(out, axis=-1), _rescaled_length(planar.shape[1], from_rate, to_rate))
    return result if audio.ndim == 2 else result[0]


# ---------------------------------------------------------------------------------------------
# internals


def _rescaled_length(samples: int, from_rate: int, to_rate: int) -> int:
    """``round(samples * to_rate / from_rate)`` in exact arithmetic (Python's round: ties to even)."""
    return round(Fraction(samples * to_rate, from_rate))


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    if audio.shape[-1] >= length:
        return np.ascontiguousarray(audio[..., :length])
    pad = np.zeros((*audio.shape[:-1], length - audio.shape[-1]), dtype=audio.dtype)
    return np.concatenate([audio, pad], axis=-1)


class _RateConverter:
    """Streaming FFmpeg (libswresample) rate conversion of planar float32 blocks."""

    def __init__(self, channels: int, from_rate: int, to_rate: int):
        import av

        self.channels, self.from_rate = channels, from_rate
        self.layout = "mono" if channels == 1 else "stereo"
        self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=to_rate)

    def _collect(self, frames) -> np.ndarray:
        arrays = [frame.to_ndarray() for frame in frames]
        return np.concatenate(arrays, axis=-1) if arrays else np.zeros((self.channels, 0), np.float32)

    def push(self, block: np.ndarray) -> np.ndarray:
        import av

        if block.shape[-1] == 0:
            return np.zeros((self.channels, 0), np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, dtype=np.float32), format="fltp", layout=self.layout)
        frame.sample_rate = self.from_rate
        return self._collect(self.resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._collect(self.resampler.resample(None))


def _frame_to_float(frame) -> np.ndarray:
    """An AudioFrame as float32 ``(channels, samples)``, integer formats scaled to [-1, 1)."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name in _INT_SCALE:
        offset = 128.0 if name == "u8" else 0.0
        return ((data.astype(np.float64) - offset) / _INT_SCALE[name]).astype(np.float32)
    return data.astype(np.float32, copy=False)


def _open(path: Path):
    import av

    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise InputError(f"is not a readable audio file ({reason(err)})", path) from None


def _decode(path, *, mono: bool, sample_rate: int | None, keep: bool = True) -> tuple[AudioInfo, list[np.ndarray]]:
    """Decode (and optionally downmix and resample) a file, returning its info and output blocks."""
    import av

    path = require_file(path)
    if path.stat().st_size == 0:
        raise InputError("is empty (0 bytes)", path)
    with _open(path) as container:
        if not container.streams.audio:
            raise InputError("has no audio stream", path)
        stream = container.streams.audio[0]
        codec = stream.codec_context
        native_rate = int(codec.sample_rate or 0)
        channels = int(codec.channels or 0)
        if native_rate <= 0:
            raise InputError("has no valid sample rate", path)
        if native_rate < MIN_SAMPLE_RATE:
            raise InputError(
                f"has a sample rate of {native_rate} Hz; at least {MIN_SAMPLE_RATE} Hz is needed "
                "(speech is resampled to 16 kHz for wav2vec)",
                path,
            )
        _check_wav_length(path, container)
        skip, limit = _trim_plan(container, stream, native_rate)
        out_channels = 1 if mono else min(max(channels, 1), 2)
        converter = None
        if keep and sample_rate is not None and sample_rate != native_rate:
            converter = _RateConverter(out_channels, native_rate, sample_rate)
        blocks: list[np.ndarray] = []
        taken = 0  # native-rate samples kept so far
        seen = 0  # native-rate samples decoded so far
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    data = _frame_to_float(frame)
                    start = max(0, skip - seen)
                    seen += data.shape[1]
                    data = data[:, start:]
                    if limit is not None:
                        data = data[:, : max(0, limit - taken)]
                    if data.shape[1] == 0:
                        continue
                    taken += data.shape[1]
                    if not keep:
                        continue
                    if data.shape[0] != out_channels:  # downmix: mono, or more channels than two
                        data = data.mean(axis=0, keepdims=True)
                        if out_channels > 1:
                            data = np.repeat(data, out_channels, 0)
                    blocks.append(converter.push(data) if converter else data)
        except av.error.FFmpegError as err:
            raise InputError(
                f"is corrupt: decoding failed after {taken / native_rate:.2f} s ({reason(err)}); "
                "a gap in the speech would break lip sync, so repair or re-export the recording",
                path,
            ) from None
        if converter is not None:
            blocks.append(converter.flush())
        info = AudioInfo(native_rate, channels, taken, codec.name, container.format.name)
    return info, blocks


def _check_wav_length(path: Path, container) -> None:
    """Refuse a RIFF/WAVE file whose ``data`` chunk is shorter than its header declares."""
    if "wav" not in container.format.name.split(","):
        return
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64, W64...: FFmpeg's own checks apply
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk, declared = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                present = size - offset - 8
                # 0 and 0xFFFFFFFF: a streaming writer that never filled in the size (accepted)
                if declared not in (0, 0xFFFFFFFF) and declared > present:
                    raise InputError(
                        f"is truncated: its header declares {declared} bytes of audio but only {present} are present "
                        "(a cut copy or an interrupted recording?); re-export it, or rewrite it to keep the part "
                        "that is there (e.g. ffmpeg -i in.wav out.wav)",
                        path,
                    )
                return
            offset += 8 + declared + (declared & 1)


def _trim_plan(container, stream, rate: int) -> tuple[int, int | None]:
    """(samples to drop at the start, total samples to keep or None) for codecs with priming/padding."""
    codec = stream.codec_context.name
    container_name = container.format.name
    if codec == "aac" and container_name == "aac":
        return AAC_PRIMING, None  # raw ADTS: no edit list, no length
    if "mp4" in container_name.split(",") or "mov" in container_name.split(","):
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            exact = Fraction(stream.duration) * stream.time_base * rate
            return 0, int(round(exact))
    return 0, None
