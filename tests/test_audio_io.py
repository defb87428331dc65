"""Decoding speech with PyAV: formats, exact lengths and alignment, and every refused input."""

from __future__ import annotations

import wave

import av
import numpy as np
import pytest

from hallo3_cli.audio_io import MIN_DURATION, audio_duration, audio_info, load_audio, resample
from hallo3_cli.errors import InputError

SR = 44100


def noise(seconds: float, rate: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Band-limited-ish noise (channels, samples) in [-0.9, 0.9]; good for locating shifts."""
    rng = np.random.default_rng(seed)
    x = 0.25 * rng.standard_normal((channels, int(seconds * rate)))
    return x.clip(-0.9, 0.9).astype(np.float32)


def speechlike(t: np.ndarray) -> np.ndarray:
    """A closed-form voice-like signal at times ``t``: harmonics (< 6 kHz) of a pitch gliding
    between 120 and 180 Hz, with a syllable-rate envelope. Band-limited, so any good resampler
    must reproduce its values at the new sample times."""
    phase = 2 * np.pi * (150 * t - 30 / (2 * np.pi * 0.7) * np.cos(2 * np.pi * 0.7 * t))
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 34))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return 0.3 * envelope * harmonics


def write_audio(path, signal: np.ndarray, rate: int, codec: str, sample_format: str) -> None:
    """Encode float (channels, samples) in [-1, 1] with PyAV."""
    channels = signal.shape[0]
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    if sample_format.startswith("s16"):
        signal = np.round(signal * 32767).astype(np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        step = stream.codec_context.frame_size or 4096
        for i in range(0, signal.shape[1], step):
            block = signal[:, i : i + step]
            if not sample_format.endswith("p"):
                block = block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format=sample_format, layout=layout)
            frame.sample_rate = rate
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_wav(path, signal: np.ndarray, rate: int) -> None:
    write_audio(path, signal, rate, "pcm_s16le", "s16")


def lag_of(decoded: np.ndarray, reference: np.ndarray, search: int = 600) -> int:
    """Shift ``L`` maximising correlation of ``decoded[k + L]`` with ``reference[k]`` (0 = aligned)."""
    seg = reference[4000:12000]
    scores = [np.dot(decoded[4000 + lag : 12000 + lag], seg) for lag in range(-search, search + 1)]
    return int(np.argmax(scores)) - search


# ---------------------------------------------------------------------------------------------
# formats


FORMATS = [
    ("wav", "pcm_s16le", "s16", SR),
    ("flac", "flac", "s16", SR),
    ("mp3", "libmp3lame", "fltp", SR),
    ("m4a", "aac", "fltp", SR),
    ("ogg", "libopus", "flt", 48000),
    ("aac", "aac", "fltp", SR),
]


@pytest.mark.parametrize("suffix,codec,sample_format,rate", FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_decode_with_exact_length_and_no_shift(tmp_path, suffix, codec, sample_format, rate):
    source = noise(2.3, rate)
    path = tmp_path / f"speech.{suffix}"
    write_audio(path, source, rate, codec, sample_format)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    expected = round(source.shape[1] * 16000 / rate)
    if suffix == "aac":
        # raw ADTS has no length field: only the trailing padding of the last frame may remain
        assert expected <= len(audio) <= expected + round(1024 * 16000 / rate) + 1
    else:
        assert len(audio) == expected
    lossless = tmp_path / "lossless.wav"
    write_wav(lossless, source, rate)
    reference = load_audio(lossless)
    assert lag_of(audio, reference) == 0  # encoder priming removed
    info = audio_info(path)
    assert info.sample_rate == rate and info.channels == 1
    # FFmpeg's mp4 muxer records one sample more than it was given
    tolerance = 0.03 if suffix == "aac" else 1.5 / rate
    assert audio_duration(path) == pytest.approx(source.shape[1] / rate, abs=tolerance)


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampling_is_accurate_and_not_shifted(tmp_path, rate):
    seconds = 1.5
    path = tmp_path / "speech.wav"
    write_wav(path, speechlike(np.arange(int(seconds * rate)) / rate)[None].astype(np.float32), rate)
    audio = load_audio(path)
    reference = speechlike(np.arange(len(audio)) / 16000)
    assert len(audio) == round(int(seconds * rate) * 16000 / rate)
    inner = slice(100, -100)  # the resampler sees silence beyond both ends
    assert np.abs(audio[inner] - reference[inner]).max() < 2e-4 * np.abs(reference).max()
    # half a sample of shift would already be far off
    shifted = speechlike((np.arange(len(audio)) + 0.5) / 16000)
    assert np.abs(audio[inner] - shifted[inner]).max() > 20 * np.abs(audio[inner] - reference[inner]).max()


def test_stereo_is_averaged_and_16k_passes_through_unchanged(tmp_path):
    t = np.arange(16000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 220 * t)
    right = 0.3 * np.sin(2 * np.pi * 330 * t)
    path = tmp_path / "stereo16k.wav"
    write_wav(path, np.stack([left, right]).astype(np.float32), 16000)
    quantised = np.round(np.stack([left, right]) * 32767) / 32768
    audio = load_audio(path)
    np.testing.assert_allclose(audio, quantised.mean(axis=0), atol=1e-6)
    both = load_audio(path, mono=False)
    assert both.shape == (2, 16000)
    np.testing.assert_allclose(both, quantised, atol=1e-6)


def test_other_target_rate_and_channel_layout(tmp_path):
    path = tmp_path / "mono48k.wav"
    write_wav(path, noise(1.0, 48000), 48000)
    stereo = load_audio(path, 44100, mono=False)
    assert stereo.shape == (1, 44100)


def test_resample_helper_has_exact_length():
    x = noise(0.77, 44100)[0]
    for rate in (16000, 22050, 48000):
        y = resample(x, 44100, rate)
        assert len(y) == round(len(x) * rate / 44100)
    stereo = resample(np.stack([x, -x]), 44100, 16000)
    assert stereo.shape == (2, round(len(x) * 16000 / 44100))
    np.testing.assert_allclose(stereo[0], -stereo[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# real recordings


@pytest.mark.parametrize("name,rate,channels", [("speech_0001.wav", 44100, 2), ("speech_0008.wav", 48000, 1)])
def test_real_recordings(media_dir, name, rate, channels):
    path = media_dir / name
    info = audio_info(path)
    assert (info.sample_rate, info.channels) == (rate, channels)
    with wave.open(str(path)) as f:
        frames = f.getnframes()
    assert info.num_samples == frames
    audio = load_audio(path)
    assert len(audio) == round(frames * 16000 / rate)
    assert 0.05 < np.abs(audio).max() <= 1.0
    assert audio_duration(path) == pytest.approx(frames / rate)


# ---------------------------------------------------------------------------------------------
# refused inputs


def expect_error(path, *words):
    with pytest.raises(InputError) as caught:
        load_audio(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.wav", "no such file")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    expect_error(path, "not a readable audio file")


def test_empty_and_header_only_wav(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    expect_error(empty, "empty")
    header_only = tmp_path / "header.wav"
    with wave.open(str(header_only), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
    expect_error(header_only, "no audio samples")


def test_corrupt_mp3(tmp_path):
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).bytes(20000))
    expect_error(garbage, "not a readable audio file")
    good = tmp_path / "good.mp3"
    write_audio(good, noise(2.0), SR, "libmp3lame", "fltp")
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = np.random.default_rng(1).bytes(3000)
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(bytes(data))
    expect_error(damaged, "corrupt")


def test_silence(tmp_path):
    path = tmp_path / "silence.wav"
    write_wav(path, np.zeros((1, 32000), np.float32), 16000)
    expect_error(path, "contains only silence")


def test_too_short(tmp_path):
    path = tmp_path / "short.wav"
    write_wav(path, noise(0.1, 16000), 16000)
    expect_error(path, "too short", str(MIN_DURATION))
    ok = tmp_path / "ok.wav"
    write_wav(ok, noise(MIN_DURATION, 16000), 16000)
    assert len(load_audio(ok)) == int(MIN_DURATION * 16000)


def test_low_sample_rate(tmp_path):
    path = tmp_path / "phone.wav"
    write_wav(path, noise(1.0, 8000), 8000)  # telephone speech: accepted, resampled to 16 kHz
    assert load_audio(path).shape == (16000,)
    path = tmp_path / "too_low.wav"
    write_wav(path, noise(1.0, 6000), 6000)
    expect_error(path, "6000 Hz", "8000")


def test_six_channels(tmp_path):
    path = tmp_path / "surround.wav"
    signal = noise(1.0, 48000, channels=6)
    write_wav(path, signal, 48000)
    mono = load_audio(path, 48000)  # averaged, like stereo
    assert np.abs(mono - signal.mean(axis=0)).max() < 1e-3
    both = load_audio(path, 48000, mono=False)
    assert both.shape == (2, 48000) and np.array_equal(both[0], both[1])


def test_file_without_audio_stream(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(path)
    expect_error(path, "no audio stream")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")
