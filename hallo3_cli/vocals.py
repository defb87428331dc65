"""Optional vocal separation (``--separate-vocals``) with an MDX-Net ONNX model, as the official pipeline does.

Hallo3 isolates the voice with ``audio_separator/Kim_Vocal_2.onnx`` (the python-audio-separator
package, MDX architecture, default settings) before wav2vec. The same inference, on onnxruntime:

1. stereo 44.1 kHz (mono is duplicated), scaled down to a peak of 0.9 if louder;
2. ``n_fft // 2`` zeros in front, zeros behind up to a whole number of chunks; chunks of
   ``hop * (dim_t - 1)`` samples every 75 % of a chunk (25 % overlap);
3. per chunk: STFT (periodic Hann, ``center=True``, reflect padding) → channels
   ``[L.re, L.im, R.re, R.im]`` → the lowest ``dim_f`` bins, the first 3 of them zeroed → model →
   zero-fill the upper bins → inverse STFT;
4. overlap-add weighted by a Hann window over each chunk, divided by the summed weights; drop the
   front padding, cut to the input length, multiply by the model's ``compensate`` factor, and scale
   down to a peak of 0.9 if louder.

``dim_f`` and ``dim_t`` are read from the ONNX input shape; ``n_fft`` and ``compensate`` are not in the
file and come from :data:`KNOWN_MODELS` (Kim_Vocal_2: 7680, 1.009; hop 1024 for all MDX-Net models).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hallo3_cli.errors import ModelError
from hallo3_cli.errors import reason as first_line
from hallo3_cli.presets import Preset

SEPARATOR_SAMPLE_RATE = 44100
MODEL_FILE = "Kim_Vocal_2.onnx"
PEAK = 0.9
OVERLAP = 0.25
ZEROED_LOW_BINS = 3


@dataclass(frozen=True)
class MDXParams:
    """What an MDX-Net ONNX file does not say about itself."""

    n_fft: int
    hop_length: int = 1024
    compensate: float = 1.0


KNOWN_MODELS = {"Kim_Vocal_2": MDXParams(n_fft=7680, hop_length=1024, compensate=1.009)}


def find_separator_model(preset: Preset) -> Path:
    """Path of the preset's vocal separation model, or a ModelError saying how to get it."""
    if preset.is_random:
        raise ModelError(
            f"preset {preset.name!r} has no vocal separation model; --separate-vocals needs the release weights (--model hallo3)"
        )
    try:
        folder = preset.require("audio_separator")
    except ModelError:
        raise ModelError(
            f"the optional vocal separation model ({MODEL_FILE}) of preset {preset.name!r} is not installed; "
            f"run: hallo3 download --model {preset.name}  (or drop --separate-vocals)",
            preset.component_dir("audio_separator"),
        ) from None
    candidates = [folder / MODEL_FILE, *sorted(folder.rglob(MODEL_FILE))]
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(f"{MODEL_FILE} is missing; run: hallo3 download --model {preset.name}", folder)


class MDXSeparator:
    """MDX-Net vocal separation of 44.1 kHz audio with an ONNX model (see the module docstring)."""

    sample_rate = SEPARATOR_SAMPLE_RATE

    def __init__(self, model_path: str | Path, params: MDXParams | None = None, *, providers: list[str] | None = None):
        import onnxruntime

        self.model_path = Path(model_path)
        if params is None:
            params = KNOWN_MODELS.get(self.model_path.stem)
            if params is None:
                raise ModelError(
                    f"unknown MDX-Net model (known: {', '.join(KNOWN_MODELS)}); pass MDXParams(n_fft=..., compensate=...)",
                    self.model_path,
                )
        self.params = params
        if not self.model_path.is_file():
            raise ModelError("vocal separation model not found", self.model_path)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.model_path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            reason = first_line(err)
            raise ModelError(f"cannot load the vocal separation model ({reason[:200]})", self.model_path) from None
        spec = self.session.get_inputs()[0]
        shape = list(spec.shape)
        if len(shape) != 4 or shape[1] != 4 or not all(isinstance(d, int) for d in shape[2:]):
            raise ModelError(f"expected an MDX-Net input of shape (batch, 4, freq, time), found {shape}", self.model_path)
        self.input_name = spec.name
        self.batch = shape[0] if isinstance(shape[0], int) else 1
        self.dim_f, self.dim_t = int(shape[2]), int(shape[3])
        self.n_bins = params.n_fft // 2 + 1
        if self.dim_f > self.n_bins:
            raise ModelError(
                f"model expects {self.dim_f} frequency bins but n_fft={params.n_fft} gives {self.n_bins}", self.model_path
            )
        self.chunk = params.hop_length * (self.dim_t - 1)
        self.trim = params.n_fft // 2
        if self.chunk <= 2 * self.trim:
            raise ModelError(f"chunk of {self.chunk} samples is too short for n_fft={params.n_fft}", self.model_path)

    # -- spectrum ↔ waveform -----------------------------------------------------------------
    def _window(self):
        import torch

        return torch.hann_window(self.params.n_fft, periodic=True, dtype=torch.float32)

    def spectrum(self, wave: np.ndarray) -> np.ndarray:
        """(2, chunk) stereo → model input (4, dim_f, dim_t): [L.re, L.im, R.re, R.im], low bins zeroed."""
        import torch

        stft = torch.stft(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
            n_fft=self.params.n_fft,
            hop_length=self.params.hop_length,
            window=self._window(),
            center=True,
            return_complex=True,
        )
        parts = torch.view_as_real(stft).permute(0, 3, 1, 2).reshape(4, self.n_bins, -1)
        parts = parts[:, : self.dim_f].clone()
        parts[:, :ZEROED_LOW_BINS] = 0.0
        return parts.numpy()

    def waveform(self, spectrum: np.ndarray) -> np.ndarray:
        """Model output (4, dim_f, dim_t) → (2, chunk) stereo, the bins above dim_f set to zero."""
        import torch

        spec = torch.from_numpy(np.ascontiguousarray(spectrum, dtype=np.float32))
        full = torch.zeros(4, self.n_bins, spec.shape[-1], dtype=torch.float32)
        full[:, : self.dim_f] = spec
        full = full.reshape(2, 2, self.n_bins, -1)
        return torch.istft(
            torch.complex(full[:, 0], full[:, 1]),
            n_fft=self.params.n_fft,
            hop_length=self.params.hop_length,
            window=self._window(),
            center=True,
            length=self.chunk,
        ).numpy()

    def _run(self, wave: np.ndarray) -> np.ndarray:
        spec = self.spectrum(wave)[None]
        if self.batch > 1:  # a model exported with a fixed batch: fill it
            spec = np.repeat(spec, self.batch, axis=0)
        out = self.session.run(None, {self.input_name: spec})[0]
        return self.waveform(out[0])

    # -- whole recordings ----------------------------------------------------------------------
    def __call__(self, mix: np.ndarray, progress: bool = False) -> np.ndarray:
        """Vocals of ``mix`` (``(samples,)`` or ``(channels, samples)`` at 44.1 kHz) as ``(2, samples)`` float32."""
        from tqdm import tqdm

        mix = np.asarray(mix, dtype=np.float32)
        if mix.ndim == 1:
            mix = mix[None]
        if mix.ndim != 2 or mix.shape[0] not in (1, 2):
            raise ValueError(f"expected mono or stereo audio (channels, samples), got shape {mix.shape}")
        if mix.shape[0] == 1:
            mix = np.repeat(mix, 2, axis=0)
        mix = _limit_peak(mix.copy())
        length = mix.shape[1]
        gen = self.chunk - 2 * self.trim
        pad = gen + self.trim - length % gen
        padded = np.concatenate(
            [np.zeros((2, self.trim), np.float32), mix, np.zeros((2, pad), np.float32)], axis=1
        )
        total = padded.shape[1]
        step = int((1 - OVERLAP) * self.chunk)
        result = np.zeros((2, total), np.float32)
        weight = np.zeros(total, np.float32)
        starts = range(0, total, step)
        bar = tqdm(starts, desc="separate vocals", unit="chunk", disable=not progress, file=sys.stderr, delay=1.0, leave=False)
        for start in bar:
            stop = min(start + self.chunk, total)
            part = padded[:, start:stop]
            if part.shape[1] < self.chunk:
                part = np.pad(part, ((0, 0), (0, self.chunk - part.shape[1])))
            window = np.hanning(stop - start).astype(np.float32)
            result[:, start:stop] += self._run(part)[:, : stop - start] * window
            weight[start:stop] += window
        vocals = np.divide(result, weight, out=np.zeros_like(result), where=weight > 0)
        vocals = vocals[:, self.trim : self.trim + length] * np.float32(self.params.compensate)
        return _limit_peak(vocals)


def separate_vocals(mix: np.ndarray, model_path: str | Path, progress: bool = False) -> np.ndarray:
    """Isolate the voice in 44.1 kHz ``mix`` with the MDX-Net model at ``model_path``; returns (2, samples)."""
    return MDXSeparator(model_path)(mix, progress=progress)


def _limit_peak(wave: np.ndarray, peak: float = PEAK) -> np.ndarray:
    top = float(np.abs(wave).max()) if wave.size else 0.0
    if math.isfinite(top) and top > peak:
        wave *= np.float32(peak / top)
    return wave
