"""Memory and speed modes give the frames of the default mode (within fp tolerance), at tiny size."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import pytest
import torch

from hallo3_cli.errors import Hallo3Error
from hallo3_cli.runtime import Runtime

pytestmark = pytest.mark.slow

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-test"
FP8_TOLERANCE = 0.02  # × max|latent|; documented in the README (measured ~0.006 at 10 steps)


@pytest.fixture(scope="module")
def stage_files(media_dir, tmp_path_factory):
    from hallo3_cli.jobs import embed_audio, encode_reference

    old = os.environ.get("HALLO3_PRESETS")
    os.environ["HALLO3_PRESETS"] = str(PRESETS)
    root = tmp_path_factory.mktemp("modes")
    with wave.open(str(media_dir / "speech_0003.wav")) as src:
        params, frames = src.getparams(), src.readframes(int(1.2 * src.getframerate()))
    with wave.open(str(root / "speech.wav"), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames)
    audio = embed_audio(root / "speech.wav", root / "a.safetensors", model=MODEL, progress=False)
    ref = encode_reference(media_dir / "face_0001.jpg", root / "r.safetensors", model=MODEL)
    yield audio, ref, root
    if old is None:
        os.environ.pop("HALLO3_PRESETS")
    else:
        os.environ["HALLO3_PRESETS"] = old


def render_latents(stage_files, runtime: Runtime, name: str, steps: int | None = None) -> torch.Tensor:
    from hallo3_cli.jobs import render_clips
    from safetensors.torch import load_file

    audio, ref, root = stage_files
    out = render_clips(audio, ref, root / f"{name}.safetensors", seed=5, steps=steps, progress=False, runtime=runtime)
    return load_file(str(out))["latents"]


@pytest.fixture(scope="module")
def baseline(stage_files):
    return render_latents(stage_files, Runtime(), "none")


@pytest.mark.parametrize("offload", ["model", "group", "sequential"])
def test_offload_modes_give_the_same_latents(stage_files, baseline, offload):
    latents = render_latents(stage_files, Runtime(offload=offload), offload)
    assert torch.allclose(latents, baseline, atol=1e-5, rtol=1e-5)


def test_fp8_weights_stay_within_the_documented_tolerance(stage_files, baseline):
    latents = render_latents(stage_files, Runtime(weights_dtype="fp8"), "fp8")
    difference = (latents - baseline).abs().max().item()
    assert 0 < difference <= FP8_TOLERANCE * baseline.abs().max().item()  # fp8 rounds the weights, nothing more


def test_first_block_cache_skips_blocks_and_stays_close(stage_files):
    full = render_latents(stage_files, Runtime(), "full10", steps=10)
    cached = render_latents(stage_files, Runtime(cache=0.2), "cache10", steps=10)
    difference = (cached - full).abs().max().item()
    assert 0 < difference <= 0.05 * full.abs().max().item()  # some steps were skipped, the result stays close


def test_bad_runtime_options():
    with pytest.raises(Hallo3Error, match="offload"):
        Runtime(offload="gpu")
    with pytest.raises(Hallo3Error, match="weights-dtype"):
        Runtime(weights_dtype="int4")
    with pytest.raises(Hallo3Error, match="cache"):
        Runtime(cache=2.0)
