"""Optional speed-ups and their effect on the output (issue 6): --compile, --cache, fewer --steps.

    python bench/bench_speedups.py --model tiny-random

Renders the first clip of a recording from the same stage files with each option and reports the
denoising time of the clip and the difference of its latents from the reference (50 steps, eager,
no cache). Differences are max |Δ| / max |reference| over the clip's latents.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import wave
from pathlib import Path

import torch

from hallo3_cli.jobs import embed_audio, encode_reference
from hallo3_cli.loading import PipelineLoader
from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline, clip_audio, clip_generator
from hallo3_cli.presets import get_preset
from hallo3_cli.runtime import Runtime
from hallo3_cli.stages import AUDIO, REFERENCE, load_stage, reference_from_stage


def pipeline(preset, **runtime) -> Hallo3Pipeline:
    """A pipeline with the DiT and the VAE, placed as the runtime says (the renderer's own loading)."""
    return PipelineLoader(preset, Runtime(device="cpu", dtype="float32", **runtime)).need("transformer", "vae")


def first_clip(pipe: Hallo3Pipeline, audio, reference, steps: int) -> tuple[torch.Tensor, float]:
    """The first clip's denoising, through the pipeline's own methods (timed: ``denoise`` only)."""
    context = pipe.prepare_context(reference_from_stage(reference))
    image = reference["image"].float()
    motion = image[None].expand(2, -1, -1, -1)
    generator = clip_generator(1, 0)
    condition = pipe.prepare_condition(image, motion, generator)
    features = clip_audio(audio["features"], 0, pipe.clip_length, pipe.config.motion_frames)[None]
    start = time.perf_counter()
    latents = pipe.denoise(condition, features, context, generator, steps, pipe.config.default_guidance_scale)
    return latents, time.perf_counter() - start


def main() -> None:
    media = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "media"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()
    preset = get_preset(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with wave.open(str(media / "speech_0001.wav")) as src:
            params, frames = src.getparams(), src.readframes(int(1.8 * src.getframerate()))
        with wave.open(str(tmp / "s.wav"), "wb") as dst:
            dst.setparams(params)
            dst.writeframes(frames)
        audio = load_stage(embed_audio(tmp / "s.wav", tmp / "a.safetensors", model=args.model, progress=False), AUDIO)
        reference = load_stage(encode_reference(media / "face_0001.jpg", tmp / "r.safetensors", model=args.model), REFERENCE)

    baseline_renderer = pipeline(preset)
    first_clip(baseline_renderer, audio, reference, 2)  # warm-up
    reference_latents, reference_time = first_clip(baseline_renderer, audio, reference, 50)
    rows = [("50 steps (reference)", reference_time, 0.0)]
    for steps in (25, 10):
        latents, seconds = first_clip(baseline_renderer, audio, reference, steps)
        rows.append((f"{steps} steps", seconds, (latents - reference_latents).abs().max().item()))
    for threshold in (0.05, 0.1, 0.2):
        renderer = pipeline(preset, cache=threshold)
        latents, seconds = first_clip(renderer, audio, reference, 50)
        rows.append((f"--cache {threshold} (50 steps)", seconds, (latents - reference_latents).abs().max().item()))
    renderer = pipeline(preset, compile=True)
    start = time.perf_counter()
    first_clip(renderer, audio, reference, 2)
    compile_seconds = time.perf_counter() - start
    latents, seconds = first_clip(renderer, audio, reference, 50)
    rows.append((f"--compile (50 steps; compiling took {compile_seconds:.0f} s once)", seconds, (latents - reference_latents).abs().max().item()))

    scale = reference_latents.abs().max().item()
    print(f"model {args.model}, first clip, CPU {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| option | denoise s | speed-up | max abs Δ / max abs |")
    print("|---|---:|---:|---:|")
    for name, seconds, difference in rows:
        print(f"| {name} | {seconds:.2f} | {reference_time / seconds:.2f}× | {difference / scale:.2e} |")


if __name__ == "__main__":
    main()
