"""Benchmark of the embed-audio stage on CPU with a wav2vec2-base-sized random model.

Measures, per input length, the wall time of decoding (a 44.1 kHz stereo wav) and of the features
(``compute_features``), the real-time factor (time / audio duration) and the peak resident memory of
a fresh process; and the deviation of the windowed encoder from whole-file attention on a 60 s input
for the tiny-random model and the base-sized one. Prints markdown; ``--output`` also writes it.

    python bench/bench_embed_audio.py                      # 30 s and 60 s
    python bench/bench_embed_audio.py --seconds 30 60 600 --output bench/RESULTS_embed_audio.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def base_sized_encoder():
    """wav2vec2-base geometry (hidden 768, 12 layers, 12 heads, 3072 ff, default conv stack), seeded weights."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from hallo3_cli.networks import fill_random_

    model = Wav2Vec2Model(Wav2Vec2Config()).eval()
    fill_random_(model, 0)
    return model


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 + 25 * np.sin(2 * np.pi * 0.5 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t) ** 2
    mono = 0.2 * envelope * voiced + 0.01 * rng.standard_normal(t.shape)
    return np.stack([mono, 0.8 * mono]).astype(np.float32)


def write_wav(path: Path, stereo: np.ndarray, rate: int) -> None:
    import wave

    data = np.round(np.clip(stereo.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(data.tobytes())


def _memory_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc, in MB (ru_maxrss survives exec: not usable here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _timed_run(path: Path, seconds: float, repeats: int, queue) -> None:
    """One measurement in a fresh process (so that the peak RSS is this run's); best of ``repeats``."""
    from hallo3_cli import audio
    from hallo3_cli.audio_io import load_audio

    encoder = base_sized_encoder()
    rss_model = _memory_mb("VmRSS")
    _reset_peak()
    decode, compute = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        waveform = load_audio(path)
        decoded = time.perf_counter()
        features, n = audio.compute_features(waveform, encoder)
        done = time.perf_counter()
        decode.append(decoded - start)
        compute.append(done - decoded)
        shape = tuple(features.shape)
        del waveform, features
    queue.put(
        {
            "seconds": seconds,
            "decode": min(decode),
            "features": min(compute),
            "first": decode[0] + compute[0],
            "frames": n,
            "shape": shape,
            "peak_rss_mb": _memory_mb("VmHWM"),
            "rss_before_mb": rss_model,
        }
    )


def measure(seconds: float, repeats: int) -> dict:
    """Time a 44.1 kHz stereo wav of ``seconds`` (written here, measured in a child process)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        write_wav(path, speechlike(seconds, 44100), 44100)
        context = mp.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_timed_run, args=(path, seconds, repeats, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"measurement of {seconds} s failed (exit code {process.exitcode})")
        result = queue.get()
    return result


def deviation(model, seconds: float = 60.0) -> dict:
    """Windowed (default) vs whole-file attention on the same input."""
    from hallo3_cli import audio

    speech = speechlike(seconds, 16000, seed=1)[0]
    start = time.perf_counter()
    whole, _ = audio.compute_features(speech, model, window_seconds=None)
    whole_time = time.perf_counter() - start
    start = time.perf_counter()
    windowed, _ = audio.compute_features(speech, model)
    windowed_time = time.perf_counter() - start
    error = (windowed - whole).abs()
    per_layer = error.amax(dim=(0, 2))
    return {
        "max": error.max().item(),
        "mean": error.mean().item(),
        "ref_max": whole.abs().max().item(),
        "ref_mean": whole.abs().mean().item(),
        "worst_layer": int(per_layer.argmax()) + 1,
        "whole_time": whole_time,
        "windowed_time": windowed_time,
    }


def machine() -> str:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{datetime.date.today().isoformat()}; {os.cpu_count()} CPUs (nproc), {cpu}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0])
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--repeats", type=int, default=2, help="runs per length (1 above 2 minutes); the best is reported")
    parser.add_argument("--no-deviation", action="store_true", help="skip the windowing deviation table")
    args = parser.parse_args()

    from hallo3_cli import audio

    lines = [
        "## embed-audio (CPU, wav2vec2-base-sized random model, 94.4 M parameters)",
        "",
        f"Machine: {machine()}; load average at start {os.getloadavg()[0]:.1f} (shared machine).",
        f"Encoder windows: {audio.WINDOW_SECONDS:g} s spans, {audio.CONTEXT_SECONDS:g} s context per side "
        "(inputs up to the span length use the exact whole-file path).",
        "",
        f"Best of {args.repeats} runs per length in a fresh process; 'first run' includes one-time warm-up.",
        "",
        "Peak RSS is the whole process during the runs (/proc VmHWM); 'model' is its RSS before them "
        "(torch + the encoder).",
        "",
        "| audio | frames | decode | features | total | real-time factor | first run | peak RSS | model |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seconds in args.seconds:
        r = measure(seconds, args.repeats if seconds <= 120 else 1)
        total = r["decode"] + r["features"]
        lines.append(
            f"| {seconds:g} s | {r['frames']} | {r['decode']:.2f} s | {r['features']:.1f} s | {total:.1f} s | "
            f"{total / seconds:.3f} | {r['first']:.1f} s | {r['peak_rss_mb']:.0f} MB | {r['rss_before_mb']:.0f} MB |"
        )
        print(lines[-1], flush=True)

    if not args.no_deviation:
        lines += [
            "",
            "Windowed vs whole-file attention, 60 s input (conv features are exact in both):",
            "",
            "| model | max abs dev | mean abs dev | max abs value | mean abs value | worst layer "
            "| whole-file time | windowed time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        from hallo3_cli.loading import load_network
        from hallo3_cli.presets import get_preset

        tiny = load_network(get_preset("tiny-random"), "wav2vec")
        for name, model in (("tiny-random", tiny), ("base-sized random", base_sized_encoder())):
            d = deviation(model)
            lines.append(
                f"| {name} | {d['max']:.2e} | {d['mean']:.2e} | {d['ref_max']:.2f} | {d['ref_mean']:.2f} | "
                f"{d['worst_layer']} | {d['whole_time']:.1f} s | {d['windowed_time']:.1f} s |"
            )
            print(lines[-1], flush=True)

    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
