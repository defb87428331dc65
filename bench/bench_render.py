"""Render benchmarks (issue 4): per-clip time split and the cost of a second take.

    python bench/bench_render.py --model tiny-random --seconds 10

1. A cold one-shot render of FACE + SPEECH, timed per stage: audio embedding, reference encoding
   (face, T5, VAE, reference network), and per clip: VAE encode of the condition, denoising
   (all steps, CFG batch), VAE decode, plus the mp4 encoding left over.
2. The same job with another seed (audio and reference reused from the cache).
3. The same job again into another file (finished clips reused: decode only).
4. The same job again into the same, unchanged file (recognised: nothing decoded or written).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import platform
import tempfile
import time
import wave
from pathlib import Path

import torch

from hallo3_cli import jobs
from hallo3_cli.jobs import Job, VideoRenderer
from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

TIMES: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start
            COUNTS[label] += 1

    setattr(owner, name, wrapper)


def cut_wav(source: Path, target: Path, seconds: float) -> Path:
    with wave.open(str(source)) as src:
        params, frames = src.getparams(), src.readframes(int(seconds * src.getframerate()))
    with wave.open(str(target), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames)
    return target


@contextlib.contextmanager
def stopwatch(results: dict, key: str):
    start = time.perf_counter()
    yield
    results[key] = time.perf_counter() - start


def main() -> None:
    media = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "media"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--face", type=Path, default=media / "face_0001.jpg")
    parser.add_argument("--speech", type=Path, default=media / "speech_0001.wav")
    parser.add_argument("--seconds", type=float, default=10.0, help="cut the speech to this length")
    args = parser.parse_args()

    timed(jobs, "embed_audio", "embed audio (stage)")
    timed(jobs, "encode_reference", "encode reference (stage)")
    timed(Hallo3Pipeline, "prepare_condition", "VAE encode (condition)")
    timed(Hallo3Pipeline, "denoise", "denoise (all steps)")
    timed(Hallo3Pipeline, "decode_latents", "VAE decode")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speech = cut_wav(args.speech, tmp / "speech.wav", args.seconds)
        with stopwatch(results, "load models"):
            first = VideoRenderer(args.model, seed=1, cache_dir=tmp / "cache", progress=False)
            first.loader.need("transformer", "vae")  # load now, time it apart
        with stopwatch(results, "first render"):
            first.render(Job(args.face, speech, tmp / "a.mp4"))
        split = dict(TIMES), dict(COUNTS)
        TIMES.clear()
        COUNTS.clear()
        other_seed = VideoRenderer(args.model, seed=2, cache_dir=tmp / "cache", progress=False)
        other_seed.loader = first.loader  # the models stay loaded
        with stopwatch(results, "second take, other seed"):
            other_seed.render(Job(args.face, speech, tmp / "b.mp4"))
        with stopwatch(results, "same render again"):
            first.render(Job(args.face, speech, tmp / "c.mp4"))
        with stopwatch(results, "same render, its video unchanged"):  # recognised: no decode, no rewrite
            first.render(Job(args.face, speech, tmp / "c.mp4"))

    times, counts = split
    clips = counts.get("denoise (all steps)", 0)
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {args.model}; {args.seconds:g} s of speech → {clips} clips\n")
    print("| stage | total s | per clip s | share of first render |")
    print("|---|---:|---:|---:|")
    accounted = 0.0
    for label, total in times.items():
        per = f"{total / counts[label]:.2f}" if label not in ("embed audio (stage)", "encode reference (stage)") else "—"
        print(f"| {label} | {total:.2f} | {per} | {total / results['first render']:.0%} |")
        accounted += total
    rest = results["first render"] - accounted
    print(f"| mp4 encoding, I/O, rest | {rest:.2f} | — | {rest / results['first render']:.0%} |")
    print(f"| **first render (models loaded)** | {results['first render']:.2f} | | 100% |")
    print(f"\nModel loading (once per process): {results['load models']:.2f} s\n")
    print("| take | s | ratio to the first |")
    print("|---|---:|---:|")
    for key in ("first render", "second take, other seed", "same render again", "same render, its video unchanged"):
        print(f"| {key} | {results[key]:.2f} | {results[key] / results['first render']:.2f} |")


if __name__ == "__main__":
    main()
