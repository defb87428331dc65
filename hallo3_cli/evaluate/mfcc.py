"""MFCCs as SyncNet was trained on them: python_speech_features 0.6 ``mfcc`` with its defaults.

At 16 kHz: 25 ms frames (400 samples) every 10 ms (160 samples), no window function, the last
frame zero-padded; pre-emphasis 0.97 over the whole signal; power spectrum ``|rfft_512|² / 512``;
26 triangular mel filters on FFT bins ``floor(513 · mel⁻¹(m) / 16000)``; log; orthonormal DCT-II,
first 13 coefficients; sinusoidal lifter 22; coefficient 0 replaced by the log frame energy. Exact
zeros become float64 eps before the logs, as there.

The samples are int16 values (SyncNet reads a 16-bit PCM wav and never rescales it; the scale
shifts coefficient 0), see :func:`to_pcm16`. Computed in blocks of frames so memory stays small
for long recordings; the result equals the one-shot computation.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 0.025 s
FRAME_STEP = 160  # 0.01 s
NFFT = 512
NUM_FILTERS = 26
NUM_CEPSTRA = 13
PREEMPHASIS = 0.97
LIFTER = 22
EPS = np.finfo(float).eps


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 as FFmpeg's ``pcm_s16le`` encoder rounds them."""
    return np.clip(np.rint(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def num_frames(num_samples: int, frame_length: int = FRAME_LENGTH, frame_step: int = FRAME_STEP) -> int:
    """MFCC frames of a signal: one if it is not longer than a frame, else enough to cover it."""
    if num_samples <= frame_length:
        return 1
    return 1 + -(-(num_samples - frame_length) // frame_step)


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int = NUM_FILTERS, nfft: int = NFFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(num_filters, nfft // 2 + 1) triangles from 0 Hz to Nyquist on whole FFT bins."""
    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), num_filters + 2)
    edges = np.floor((nfft + 1) * mel_to_hz(mels) / sample_rate)
    bins = np.arange(nfft // 2 + 1, dtype=np.float64)[None, :]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((bins >= left) & (bins < centre), (bins - left) / (centre - left), 0.0)
        falling = np.where((bins >= centre) & (bins < right), (right - bins) / (right - centre), 0.0)
    return rising + falling


def dct_matrix(n: int, keep: int) -> np.ndarray:
    """(n, keep) orthonormal DCT-II basis: ``x @ D`` gives the first ``keep`` coefficients."""
    k = np.arange(keep)[None, :]
    i = np.arange(n)[:, None]
    basis = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * np.sqrt(2.0 / n)
    basis[:, 0] /= np.sqrt(2.0)
    return basis


def mfcc(signal: np.ndarray, block_frames: int = 6000) -> np.ndarray:
    """(frames, 13) float64 MFCCs of a 16 kHz signal (int16 values, or floats on that scale)."""
    signal = np.asarray(signal)
    if signal.ndim != 1 or signal.size == 0:
        raise ValueError("mfcc expects a non-empty 1-D signal")
    signal = signal.astype(np.float64)
    total = num_frames(signal.size)
    padded_length = (total - 1) * FRAME_STEP + FRAME_LENGTH
    filters = mel_filterbank().T
    dct = dct_matrix(NUM_FILTERS, NUM_CEPSTRA)
    lift = 1.0 + (LIFTER / 2.0) * np.sin(np.pi * np.arange(NUM_CEPSTRA) / LIFTER)
    out = np.empty((total, NUM_CEPSTRA))
    offsets = np.arange(FRAME_LENGTH)[None, :]
    for first in range(0, total, block_frames):
        last = min(first + block_frames, total)
        start, stop = first * FRAME_STEP, (last - 1) * FRAME_STEP + FRAME_LENGTH
        chunk = signal[start:min(stop, signal.size)]
        emphasised = chunk.copy()
        emphasised[1:] -= PREEMPHASIS * chunk[:-1]
        if start > 0:  # the sample before the block feeds the pre-emphasis of its first sample
            emphasised[0] = chunk[0] - PREEMPHASIS * signal[start - 1]
        if stop > signal.size:
            emphasised = np.concatenate([emphasised, np.zeros(min(stop, padded_length) - signal.size)])
        frames = emphasised[(np.arange(last - first) * FRAME_STEP)[:, None] + offsets]
        power = np.square(np.abs(np.fft.rfft(frames, NFFT))) / NFFT
        energy = power.sum(1)
        energy = np.where(energy == 0, EPS, energy)
        banks = power @ filters
        banks = np.where(banks == 0, EPS, banks)
        coefficients = (np.log(banks) @ dct) * lift
        coefficients[:, 0] = np.log(energy)
        out[first:last] = coefficients
    return out
