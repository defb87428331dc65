"""The video loop's pieces (fast): clip audio windows, clip counts, seeds, resume bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from hallo3_cli import stages
from hallo3_cli.errors import Hallo3Error
from hallo3_cli.geometry import num_clips
from hallo3_cli.jobs import RenderSettings, render_key
from hallo3_cli.jobs.resume import _finished_parts
from hallo3_cli.pipeline_hallo3 import clip_audio, clip_generator
from hallo3_cli.presets import get_preset
from hallo3_cli.runtime import Runtime


def official_clip_audio(windowed: torch.Tensor, clips: int, clip_length=49, motion=2) -> list[torch.Tensor]:
    """The official loop's per-clip audio (sample_video.py), re-derived independently."""
    new = clip_length - motion
    prefix = torch.zeros_like(windowed[:motion])
    out = []
    for t in range(clips):
        body = windowed[t * new : min((t + 1) * new, windowed.shape[0])]
        tensor = torch.cat([prefix, body])
        prefix = tensor[-motion:]
        if tensor.shape[0] != clip_length:
            tensor = torch.cat([tensor, prefix[-1:].repeat(clip_length - tensor.shape[0], 1, 1, 1)])
        out.append(tensor)
    return out


@pytest.mark.parametrize("frames", [49, 98, 147, 294])
def test_clip_audio_matches_the_official_loop(frames):
    from hallo3_cli.audio import window_features

    features = torch.randn(frames, 2, 3)
    windowed = window_features(features, 0, frames)
    clips = math.ceil(frames / 47)  # the official count on the padded length
    for index, expected in enumerate(official_clip_audio(windowed, clips)):
        assert torch.equal(clip_audio(features, index, 49, 2), expected), index


def test_num_clips_covers_the_unpadded_video():
    assert num_clips(1, 49, 2) == 1
    assert num_clips(47, 49, 2) == 1
    assert num_clips(48, 49, 2) == 2
    assert num_clips(262, 49, 2) == 6  # 10.45 s of speech


def test_clip_generators_are_independent_and_reproducible():
    draws = [torch.randn(4, generator=clip_generator(7, i)) for i in range(3)]
    assert torch.equal(draws[0], torch.randn(4, generator=clip_generator(7, 0)))
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.randn(4, generator=clip_generator(8, 0)))


def test_settings_are_validated_by_the_pipeline():
    """The pipeline takes the ranges the CLI takes (one range per option: hallo3_cli.options); a bad value is a
    ValueError naming the argument, and a usage error (exit 2) if it reaches the CLI."""
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    check = Hallo3Pipeline.check_inputs
    pipe = object.__new__(Hallo3Pipeline)  # check_inputs reads nothing but its arguments and the class
    cases = ((0, 3.5, "num_inference_steps"), (1001, 3.5, "num_inference_steps"), (2.5, 3.5, "num_inference_steps"),
             (4, float("nan"), "guidance_scale"), (4, float("inf"), "guidance_scale"), (4, 1e9, "guidance_scale"),
             (4, "x", "guidance_scale"), (4, -1.0, "guidance_scale"))
    for steps, scale, name in cases:
        with pytest.raises(ValueError, match=name) as info:
            check(pipe, steps, scale)
        assert isinstance(info.value, Hallo3Error) and info.value.exit_code == 2
    check(pipe, 1, 3.5)
    check(pipe, 1000, 0.0)
    check(pipe, 1000, 100.0)


def _stage(kind, tensors, **meta):
    common = {"model": "tiny-random", "weights": "w", "params": {"a": 1}, "source_sha256": "s" * 64}
    return stages.Stage(kind, tensors, {**common, **meta})


def test_render_key_follows_everything_that_changes_the_frames():
    preset, other = get_preset("tiny-random"), get_preset("tiny-random")
    audio = _stage(stages.AUDIO, {}, fps=25, num_frames=10, clip_length=49, sample_rate=16000)
    ref = _stage(stages.REFERENCE, {}, prompt="p", framing="pad", source_width=1, source_height=1, face_found=False)
    fp32, bf16 = Runtime(device="cpu", dtype="float32"), Runtime(device="cpu", dtype="bfloat16")

    def key(settings, runtime=fp32):
        return render_key(audio, ref, settings, preset, runtime)

    base = key(RenderSettings(seed=1, steps=4))
    assert base == render_key(audio, ref, RenderSettings(seed=1, steps=4), other, fp32)
    assert base == key(RenderSettings(seed=1, steps=4), Runtime(device="cpu", dtype="float32", offload="model"))
    assert base != key(RenderSettings(seed=2, steps=4))
    assert base != key(RenderSettings(seed=1, steps=5))
    assert base != key(RenderSettings(seed=1, steps=4, cfg=2.0))
    assert base != key(RenderSettings(seed=1, steps=4), bf16)
    assert base != key(RenderSettings(seed=1, steps=4), Runtime(device="cpu", dtype="float32", vae_tiling=True))
    audio.meta["weights"] = "other"
    assert base != key(RenderSettings(seed=1, steps=4))
    audio.meta["weights"] = "w"
    ref.meta["prompt"] = "q"
    assert base != key(RenderSettings(seed=1, steps=4))


def test_resume_takes_only_the_leading_run_of_valid_parts(tmp_path):
    def part(index, key="k"):
        meta = {"model": "tiny-random", "weights": "w", "params": {}, "source_sha256": key, "index": index, "render_key": key}
        latents = torch.zeros(13, 16, 16, 24)  # tiny-random's clip: 49 frames of 128×192
        stages.save_stage(tmp_path / f"clip_{index:05d}.safetensors", stages.CLIP, {"latents": latents}, meta)

    part(0)
    part(1)
    part(3)  # a gap: clip 2 is missing
    assert len(_finished_parts(tmp_path, "k", 5)) == 2
    assert _finished_parts(tmp_path, "other", 5) == []  # another render's clips are ignored
    (tmp_path / "clip_00001.safetensors").write_bytes(b"garbage")  # a corrupt part ends the run
    assert len(_finished_parts(tmp_path, "k", 5)) == 1
