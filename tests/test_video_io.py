"""VideoWriter / read_video: codecs, timing, pixels, audio alignment and trimming, failure cleanup."""

from __future__ import annotations

import os
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from hallo3_cli.errors import InputError, OutputError
from hallo3_cli.image_io import crop_box_for_output
from hallo3_cli.video_io import VideoWriter, read_video, tensor_to_uint8

FAST = {"preset": "ultrafast"}


def make_wav(path: Path, seconds: float, rate: int = 44100, channels: int = 2) -> np.ndarray:
    """A 16-bit wav of rising chirps (not periodic, so only the exact alignment correlates well).
    Returns the samples as float (channels, n)."""
    t = np.arange(int(round(seconds * rate))) / rate
    f0, f1 = 200.0, 3000.0
    signal = np.stack(
        [0.4 * np.sin(2 * np.pi * (f0 * (c + 1) * t + (f1 - f0) * t**2 / (2 * seconds))) for c in range(channels)]
    )
    pcm = np.round(signal * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.T.tobytes())
    return pcm / 32768.0


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).reshape(-1, channels).T
    return pcm / 32768.0, rate


def smooth_frames(n: int, height: int, width: int) -> np.ndarray:
    """Gradients that drift over time: compressible, so PSNR measures the pipeline, not x264 at its limit."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 200 / width + i) % 256
        frames[i, ..., 1] = y * 200 / height + 20
        frames[i, ..., 2] = 128 + 60 * np.sin((x + y) / 15 + i / 5)
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def decoded_audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
        return samples, stream.codec_context.sample_rate


def streams(path: Path) -> dict:
    with av.open(str(path)) as container:
        info = {}
        for stream in container.streams:
            ctx = stream.codec_context
            info[stream.type] = {
                "codec": ctx.name,
                "pix_fmt": getattr(ctx, "pix_fmt", None),
                "rate": getattr(ctx, "sample_rate", None),
                "channels": getattr(ctx, "channels", None),
                "size": (getattr(ctx, "width", None), getattr(ctx, "height", None)),
            }
        return info


def best_lag(decoded: np.ndarray, reference: np.ndarray, search: int = 600) -> int:
    """Shift of ``decoded`` against ``reference`` that maximises their correlation over 16k samples."""
    start, length = search + 2000, 16000
    decoded, reference = decoded[0].astype(np.float64), reference[0].astype(np.float64)
    window = reference[start : start + length]
    scores = [np.dot(decoded[start + lag : start + lag + length], window) for lag in range(-search, search + 1)]
    return int(np.argmax(scores)) - search


def assert_nothing_left(folder: Path, keep: set[str] = frozenset()) -> None:
    left = {p.name for p in folder.iterdir()} - set(keep)
    assert not left, f"left behind: {left}"


# ---------------------------------------------------------------------------------------------


def test_roundtrip_codecs_timing_pixels_and_trimmed_audio(tmp_path):
    wav = tmp_path / "speech.wav"
    source = make_wav(wav, 3.0, rate=44100, channels=2)
    frames = smooth_frames(50, 64, 96)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 96, 64, audio=wav) as writer:
        writer.write(frames[:20])
        writer.write(frames[20:])
    assert_nothing_left(tmp_path, {"speech.wav", "out.mp4"})

    decoded, fps, audio_duration = read_video(out)
    assert decoded.shape == (50, 64, 96, 3)
    assert fps == 25.0
    assert abs(audio_duration - 50 / 25) <= 1 / 25  # 3 s of speech trimmed to the 2 s of video
    assert psnr(decoded, frames) > 35
    info = streams(out)
    assert info["video"]["codec"] == "h264" and info["video"]["pix_fmt"] == "yuv420p"
    assert info["audio"]["codec"] == "aac" and info["audio"]["rate"] == 44100 and info["audio"]["channels"] == 2
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        pts = [frame.pts * video.time_base for frame in container.decode(video)]
    assert pts == [Fraction(i, 25) for i in range(50)]  # exact, evenly spaced timestamps

    audio, rate = decoded_audio(out)
    # decoding keeps the padding of the last AAC frame (< 1024 samples) but no priming delay
    assert 2.0 * rate <= audio.shape[1] < 2.0 * rate + 1024
    assert best_lag(audio, source) == 0
    error = audio[:, : int(2.0 * rate)] - source[:, : int(2.0 * rate)]
    snr = 10 * np.log10(np.mean(source[:, : int(2.0 * rate)] ** 2) / np.mean(error**2))
    assert snr > 20


def test_float_tensor_conversion_is_rounded_and_clamped():
    values = torch.tensor([-1.5, -1.0, -0.9961, 0.0, 0.00393, 0.5, 1.0, 2.0])
    frames = values.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    got = tensor_to_uint8(frames)
    assert got.shape == (1, 1, 8, 3)
    expected = np.clip(np.floor((values.numpy().astype(np.float64) + 1) / 2 * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(got[0, 0, :, 0], expected.astype(np.uint8))
    assert got[0, 0, 4, 0] == 128  # 0.00393 -> 127.999: rounded, not truncated to 127


def test_writes_float_tensors(tmp_path):
    frames = torch.from_numpy(smooth_frames(12, 64, 96)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = tmp_path / "t.mp4"
    with VideoWriter(out, 96, 64, **FAST) as writer:
        writer.write(frames.to(torch.bfloat16)[:5])
        writer.write(frames[5:])
    decoded, _, audio_duration = read_video(out)
    assert audio_duration is None
    assert decoded.shape == (12, 64, 96, 3)
    assert psnr(decoded[5:], tensor_to_uint8(frames[5:])) > 35


def test_square_crop_keeps_the_centre(tmp_path):
    frames = smooth_frames(10, 64, 96)
    frames[:, :, :16] = (255, 0, 0)  # the padding that must go
    frames[:, :, 80:] = (0, 0, 255)
    crop = crop_box_for_output("pad", 64, 96)
    out = tmp_path / "square.mp4"
    with VideoWriter(out, 96, 64, crop=crop, **FAST) as writer:
        writer.write(frames)
    decoded, _, _ = read_video(out)
    assert decoded.shape == (10, 64, 64, 3)
    assert psnr(decoded, frames[:, :, 16:80]) > 35


def test_odd_sizes_lose_one_row_and_column(tmp_path):
    frames = smooth_frames(6, 65, 97)
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 97, 65, **FAST) as writer:
        writer.write(frames)
    decoded, _, _ = read_video(out)
    assert decoded.shape == (6, 64, 96, 3)
    assert psnr(decoded, frames[:, :64, :96]) > 35


def test_audio_shorter_than_video_is_not_padded(tmp_path):
    wav = tmp_path / "short.wav"
    make_wav(wav, 1.0, rate=16000, channels=1)
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 64, 64, audio=wav, **FAST) as writer:
        writer.write(smooth_frames(50, 64, 64))
    decoded, _, audio_duration = read_video(out)
    assert len(decoded) == 50
    assert abs(audio_duration - 1.0) < 1e-3
    assert streams(out)["audio"]["rate"] == 16000 and streams(out)["audio"]["channels"] == 1


def test_audio_offset_starts_later_in_the_recording(tmp_path):
    wav = tmp_path / "s.wav"
    source = make_wav(wav, 3.0, rate=24000, channels=1)
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 64, 64, audio=wav, audio_offset=0.6, **FAST) as writer:
        writer.write(smooth_frames(25, 64, 64))
    _, _, audio_duration = read_video(out)
    assert abs(audio_duration - 1.0) < 1e-3
    audio, rate = decoded_audio(out)
    offset = round(0.6 * rate)
    assert best_lag(audio, source[:, offset:]) == 0


def test_unsupported_sample_rate_is_resampled_to_48k(tmp_path):
    wav = tmp_path / "odd_rate.wav"
    make_wav(wav, 1.0, rate=37800, channels=2)
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 64, 64, audio=wav, **FAST) as writer:
        writer.write(smooth_frames(20, 64, 64))
    assert streams(out)["audio"]["rate"] == 48000
    assert abs(read_video(out)[2] - 0.8) < 1e-3


@pytest.mark.parametrize("name, rate, channels", [("speech_0001.wav", 44100, 2), ("speech_0008.wav", 48000, 1)])
def test_real_speech_fixtures(media_dir, tmp_path, name, rate, channels):
    wav = media_dir / name
    reference, reference_rate = read_wav(wav)
    assert reference_rate == rate
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 64, 64, audio=wav, **FAST) as writer:
        writer.write(smooth_frames(100, 64, 64))
    info = streams(out)
    assert info["audio"]["rate"] == rate and info["audio"]["channels"] == channels
    assert abs(read_video(out)[2] - 4.0) < 1e-3
    audio, _ = decoded_audio(out)
    assert best_lag(audio, reference) == 0


def test_memory_does_not_grow_with_length(tmp_path):
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to read the resident set size")

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    wav = tmp_path / "long.wav"
    make_wav(wav, 80.0, rate=16000, channels=1)
    frame = smooth_frames(1, 128, 160)
    out = tmp_path / "long.mp4"
    with VideoWriter(out, 160, 128, audio=wav, **FAST) as writer:
        for i in range(2000):
            writer.write(frame.copy())  # a fresh array each time: holding on to them would show
            if i == 400:
                early = rss_mb()
        late = rss_mb()
    # 1,600 more frames are 98 MB of RGB (49 MB as yuv420p) and 64 s of audio: none may accumulate
    assert late - early < 25
    decoded, _, audio_duration = read_video(out)
    assert len(decoded) == 2000 and abs(audio_duration - 80.0) < 1e-3


# ---------------------------------------------------------------------------------------------
# failures leave nothing behind


def test_missing_output_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        VideoWriter(tmp_path / "nope" / "o.mp4", 64, 64)
    assert_nothing_left(tmp_path)


def test_output_path_is_a_folder(tmp_path):
    with pytest.raises(OutputError, match="directory"):
        VideoWriter(tmp_path, 64, 64)


def test_read_only_output_folder(tmp_path):
    if os.geteuid() == 0:
        folder = Path("/sys")  # root ignores permission bits; sysfs refuses new files even for root
        if sys.platform != "linux" or not folder.is_dir():
            pytest.skip("no folder that refuses root")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    with pytest.raises(OutputError) as err:
        VideoWriter(folder / "o.mp4", 64, 64)
    assert str(folder / "o.mp4") in str(err.value) and "\n" not in str(err.value)
    assert not (folder / "o.mp4").exists()


def test_exception_mid_stream_leaves_no_file(tmp_path):
    wav = tmp_path / "s.wav"
    make_wav(wav, 2.0, rate=16000, channels=1)
    out = tmp_path / "o.mp4"
    with pytest.raises(RuntimeError, match="render failed"):
        with VideoWriter(out, 64, 64, audio=wav, **FAST) as writer:
            writer.write(smooth_frames(10, 64, 64))
            raise RuntimeError("render failed")
    assert_nothing_left(tmp_path, {"s.wav"})


def test_failure_keeps_an_existing_file_untouched(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"previous video")
    with pytest.raises(ValueError, match="expects 64×64"):
        with VideoWriter(out, 64, 64, **FAST) as writer:
            writer.write(smooth_frames(3, 64, 64))
            writer.write(smooth_frames(3, 32, 32))
    assert out.read_bytes() == b"previous video"
    assert_nothing_left(tmp_path, {"o.mp4"})


def test_closing_without_frames_is_an_error(tmp_path):
    with pytest.raises(OutputError, match="no frames"):
        with VideoWriter(tmp_path / "o.mp4", 64, 64):
            pass
    assert_nothing_left(tmp_path)


def test_bad_audio_inputs(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    with pytest.raises(InputError, match="no such file"):
        VideoWriter(tmp_path / "o.mp4", 64, 64, audio=tmp_path / "missing.wav")
    with pytest.raises(InputError) as err:
        VideoWriter(tmp_path / "o.mp4", 64, 64, audio=text)
    assert str(text) in str(err.value) and "\n" not in str(err.value)
    assert_nothing_left(tmp_path, {"notes.wav"})


def test_read_video_rejects_non_video(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="cannot read video"):
        read_video(path)
