"""The ``embed-audio`` stage: speech → per-video-frame wav2vec features (docs/model.md §5 steps 1–5).

The released model feeds wav2vec2-base-960h in an unusual way (official ``sgm/models/wav2vec.py``):
the whole recording is normalised to zero mean and unit variance, zero-padded so that the number of
video frames is a multiple of the clip length, and the convolutional features are linearly resampled
to exactly one step per video frame (25 per second) BEFORE ``feature_projection`` and the transformer
encoder. The hidden states of the 12 encoder layers are kept: ``(frames, 12, 768)``.

Long recordings
---------------
The official code runs the encoder's self-attention over the whole file: quadratic in time and, with
eager attention, in memory (10 minutes = 15,000 frames = 10.8 GB of attention weights per layer).
Here only the transformer encoder is windowed; everything before it stays global and exact:

- the conv feature extractor is local (receptive field 400 samples, stride 320) except for the
  GroupNorm of its first layer, which normalises every channel over the WHOLE recording. Beyond
  30 s it runs in 10 s chunks aligned to its stride, with that GroupNorm's statistics computed in
  closed form from the waveform beforehand; the result equals the one-pass features to float
  rounding (measured 5e-9 on values ~1e-2, base-sized model);
- the interpolation to video frames and ``feature_projection`` run on the whole (small) sequence;
- the encoder (positional convolution + layers) runs on spans of at most ``window_seconds`` (30 s)
  that overlap by ``context_seconds`` (5 s) on each side; every frame is taken from the span in whose
  centre part it lies ("centre cut"), so it sees at least 5 s of context on both sides (or the file
  end). 5 s = 125 frames covers the positional convolution's half width (64 frames): the only
  approximation is that attention does not reach beyond the span.

Inputs up to 30 s (after padding) take the whole-file path and match the official computation
exactly. Measured on a 60 s input (``bench/bench_embed_audio.py``): the tiny-random model deviates
from whole-file attention by at most 1.1e-6 (values up to 2.0); a wav2vec2-base-sized model with
random weights by at most 6.5e-2, mean 8.0e-3 (values up to 4.9, mean 0.80), worst in the last
layer. Random weights attend almost uniformly over the whole sequence, which is the worst case for
windowing; the real wav2vec2 weights could not be measured offline. Memory stays bounded: 10
minutes of speech peak at 1.6 GB of process RSS with the base-sized model (0.8 GB torch + model,
0.55 GB output features), at ~0.12× real time on 2 CPU cores.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from hallo3_cli.audio_io import SAMPLE_RATE
from hallo3_cli.geometry import RELEASE

WINDOW_SECONDS = 30.0
"""Longest span the encoder attends over; longer inputs are windowed (see the module docstring)."""
CONTEXT_SECONDS = 5.0
"""Context on each side of a window's kept centre part."""
CONV_CHUNK_FRAMES = 500
"""Conv feature frames (50 per second) computed per chunk on long inputs: bounds memory."""
CONV_WHOLE_MAX_FRAMES = 1500
"""Up to this many conv frames (30 s) the feature extractor runs in one call (the official path)."""
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


def num_video_frames(num_samples: int, fps: int = RELEASE["fps"], sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames covering ``num_samples`` of audio: ``ceil(samples / rate * fps)`` (official float formula)."""
    return math.ceil(num_samples / sample_rate * fps)


def compute_features(
    waveform,
    encoder,
    fps: int = RELEASE["fps"],
    clip_length: int = RELEASE["clip_length"],
    *,
    normalize: bool = True,
    window_seconds: float | None = WINDOW_SECONDS,
    context_seconds: float = CONTEXT_SECONDS,
    progress: bool = False,
):
    """wav2vec features of 16 kHz mono speech, one step per video frame (docs/model.md §5 steps 2–4).

    Returns ``(features, n)``: ``features`` is a float32 CPU tensor ``(n_padded, layers, channels)``
    where ``n_padded`` is ``n`` rounded up to a multiple of ``clip_length`` and ``n`` is the number of
    video frames of the speech itself (``clip_length=0``: no padding, ``n_padded = n``, as the release's training
    data). ``window_seconds=None`` always attends over the whole file.
    """
    import torch

    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono audio of shape (samples,), got {samples.shape}")
    if normalize:
        # float32 numpy statistics, as Wav2Vec2FeatureExtractor computes them (matches bit for bit)
        with np.errstate(over="ignore", invalid="ignore"):
            samples = (samples - samples.mean()) / np.sqrt(samples.var() + NORM_EPS)
        if not np.isfinite(samples).all():  # audio_io refuses such input first, naming the file
            raise ValueError("the speech normalises to non-finite values (float samples of huge amplitude)")
    n = num_video_frames(len(samples), fps)
    n_padded = n
    if clip_length > 0 and n % clip_length:
        n_padded = n + clip_length - n % clip_length
        samples = np.concatenate([samples, np.zeros((n_padded - n) * (SAMPLE_RATE // fps), np.float32)])

    conv_frames = _conv_length(encoder.config, len(samples))
    if conv_frames < 1:
        raise ValueError(f"audio too short for the wav2vec feature extractor ({len(samples)} samples)")
    window = None if window_seconds is None else max(1, round(window_seconds * fps))
    context = max(0, round(context_seconds * fps))
    if window is None or n_padded <= window:
        spans = [(0, n_padded, 0, n_padded)]
    else:
        spans = encoder_spans(n_padded, window, context)
    device = next(encoder.parameters()).device
    bar = _progress_bar(progress, len(spans))

    with torch.inference_mode():
        x = torch.from_numpy(samples).to(device)
        if conv_frames <= CONV_WHOLE_MAX_FRAMES:
            conv = encoder.feature_extractor(x[None])[0].transpose(0, 1)
        else:  # exact, in bounded memory
            conv = _chunked_conv_features(encoder, x, bar)
        conv = torch.nn.functional.interpolate(conv.T[None], size=n_padded, mode="linear", align_corners=True)[0].T
        hidden, _ = encoder.feature_projection(conv[None])
        del conv
        layers = encoder.config.num_hidden_layers
        features = torch.empty(n_padded, layers, hidden.shape[-1], dtype=torch.float32)
        for start, stop, keep_start, keep_stop in spans:
            states = encode_span(encoder.encoder, hidden[:, start:stop])
            for layer, state in enumerate(states):
                features[keep_start:keep_stop, layer] = state[0, keep_start - start : keep_stop - start].float().cpu()
            bar.update(1)
    bar.close()
    return features, n


def encoder_spans(frames: int, window: int, context: int) -> list[tuple[int, int, int, int]]:
    """Encoder spans for a long sequence: ``(start, stop, keep_start, keep_stop)`` per window.

    Spans are at most ``window`` frames; the kept parts tile ``[0, frames)`` and every kept frame has
    ``context`` frames of span on each side unless it is within ``context`` of a file end.
    """
    if frames <= window:
        return [(0, frames, 0, frames)]
    core = window - 2 * context
    if core < 1:
        raise ValueError(f"window ({window} frames) must be longer than twice the context ({context} frames)")
    cuts = [0, *range(window - context, frames - context, core), frames]
    spans = []
    for keep_start, keep_stop in zip(cuts[:-1], cuts[1:]):
        start = max(0, min(keep_start - context, frames - window))
        stop = min(frames, max(start + window, keep_stop + context))
        spans.append((start, stop, keep_start, keep_stop))
    return spans


def window_features(features, start: int, stop: int, window: int = 5):
    """Frames ``start..stop-1`` each with its neighbours ``i - window//2 .. i + window//2`` (docs/model.md §5 step 5).

    Indices are clamped to ``[0, n_padded - 1]``; returns ``(stop - start, window, layers, channels)``.
    """
    import torch

    total = features.shape[0]
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    if not 0 <= start <= stop <= total:
        raise ValueError(f"frames {start}..{stop} are outside 0..{total}")
    half = window // 2
    device = features.device
    index = torch.arange(start, stop, device=device)[:, None] + torch.arange(-half, half + 1, device=device)[None, :]
    return features[index.clamp_(0, total - 1)]


# ---------------------------------------------------------------------------------------------
# internals


def _progress_bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="embed-audio", unit="step", disable=not enabled, file=sys.stderr, delay=1.0, leave=False)


def _conv_geometry(config) -> tuple[int, int]:
    """(receptive field, stride) of the whole conv feature extractor, in samples."""
    field, stride = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * stride
        stride *= step
    return field, stride


def _conv_length(config, samples: int) -> int:
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // step + 1
    return max(samples, 0)


def _chunked_conv_features(encoder, x, bar):
    """Conv features ``(frames, channels)`` of a long waveform in bounded memory, equal to the whole-file ones.

    Chunks start on multiples of the total stride, so every layer sees exactly the samples it
    would see in one pass. A first-layer GroupNorm (per channel, over all time) gets its
    statistics in closed form from the waveform (:func:`_first_layer_stats`).
    """
    import torch

    config = encoder.config
    field, stride = _conv_geometry(config)
    frames = _conv_length(config, x.shape[0])
    conv_layers = list(encoder.feature_extractor.conv_layers)
    first = conv_layers[0]
    group_norm = getattr(first, "layer_norm", None)
    affine = None
    if isinstance(group_norm, torch.nn.GroupNorm):
        mean, inv_std = _first_layer_stats(first.conv, x, group_norm.eps)
        scale = inv_std * group_norm.weight
        affine = (scale[:, None], (group_norm.bias - mean * scale)[:, None])
    bar.total += math.ceil(frames / CONV_CHUNK_FRAMES)

    out = torch.empty(frames, config.conv_dim[-1], dtype=torch.float32, device=x.device)
    for a in range(0, frames, CONV_CHUNK_FRAMES):
        b = min(frames, a + CONV_CHUNK_FRAMES)
        h = x[a * stride : (b - 1) * stride + field][None, None]
        if affine is None:
            for layer in conv_layers:
                h = layer(h)
        else:
            h = first.activation(first.conv(h).mul_(affine[0]).add_(affine[1]))
            for layer in conv_layers[1:]:
                h = layer(h)
        out[a:b] = h[0].T
        bar.update(1)
    return out


def _first_layer_stats(conv, x, eps: float):
    """Per-channel mean and 1/sqrt(var + eps) of the first conv's output over the whole recording.

    The first conv maps the raw waveform (one channel) linearly, so its output statistics follow
    from the mean ``m`` and second moment ``M`` of the input windows it sees: for channel ``c`` with
    weights ``w``, mean ``w·m + bias`` and variance ``w (M - m mᵀ) wᵀ``. Accumulated in float64 over
    chunks; costs a few multiply-adds per sample instead of a second pass through the conv.
    """
    import torch

    kernel, step = conv.kernel_size[0], conv.stride[0]
    windows = x.detach().cpu().unfold(0, kernel, step)  # (positions, kernel), a view; float64 needs the CPU (mps)
    positions = windows.shape[0]
    first = torch.zeros(kernel, dtype=torch.float64)
    second = torch.zeros(kernel, kernel, dtype=torch.float64)
    for p in range(0, positions, 1 << 20):
        block = windows[p : p + (1 << 20)].double()
        first += block.sum(dim=0)
        second += block.T @ block
    first /= positions
    covariance = second / positions - torch.outer(first, first)
    weight = conv.weight.detach().cpu().reshape(conv.out_channels, kernel).double()
    mean = weight @ first
    if conv.bias is not None:
        mean = mean + conv.bias.detach().cpu().double()
    var = ((weight @ covariance) * weight).sum(dim=1).clamp_min(0.0)
    return mean.float().to(x.device), torch.rsqrt(var + eps).float().to(x.device)


def encode_span(encoder, hidden):
    """All layer outputs (``hidden_states[1:]``) of a post-norm wav2vec2 encoder on ``hidden`` (1, T, C)."""
    hidden = hidden + encoder.pos_conv_embed(hidden)
    hidden = encoder.layer_norm(hidden)
    states = []
    for layer in encoder.layers:
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    return states
