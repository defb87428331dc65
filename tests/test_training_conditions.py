"""The per-step conditions (hallo3_cli.training.conditions): shapes, determinism, the motion-frame noise and mask,
condition dropout, the image condition against the pipeline's inference encoding, and a training step on them
(tiny-random; small frames keep the VAE cheap)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hallo3_cli.training import RELEASE, timestep_band, trainable_parameters, training_loss
from hallo3_cli.training.conditions import condition_frames, step_inputs

H, W = 32, 48  # a 4 × 6 latent


@pytest.fixture(scope="module")
def pipe():
    from hallo3_cli.loading import load_pipeline

    return load_pipeline("tiny-random", device="cpu")


def _batch(pipe, size: int, frames: int = 9, stage: int = 1, seed: int = 0) -> dict:
    """A collated Hallo3Dataset batch (the keys step_inputs reads), random pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    config = pipe.transformer.config
    batch = {
        "frames": torch.rand(size, frames, 3, H, W, generator=g) * 2 - 1,
        "ref_image": torch.rand(size, 3, H, W, generator=g) * 2 - 1,
        "masked_ref": torch.rand(size, 3, H, W, generator=g) * 2 - 1,
        "face_embedding": torch.randn(size, 512, generator=g),
        "prompt_embeds": torch.randn(size, pipe.text_length, config.text_embed_dim, generator=g),
    }
    if stage == 2:
        batch["audio"] = torch.randn(size, frames, config.audio_window, config.audio_layers, config.audio_channels,
                                     generator=g)
        batch["audio_dropped"] = torch.tensor([k % 2 == 1 for k in range(size)])
        batch["audio"][batch["audio_dropped"]] = 0
    return batch


def _inputs(pipe, batch, stage=1, seed=1, **kwargs):
    return step_inputs(batch, pipe.vae, stage=stage, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("stage", [1, 2])
def test_shapes_dtypes_and_determinism(pipe, stage):
    batch = _batch(pipe, 2, stage=stage)
    a = _inputs(pipe, batch, stage)
    latent = (H // 8, W // 8)
    assert a["latents"].shape == (2, 3, 16, *latent) and a["latents"].dtype == pipe.vae.dtype
    assert a["noise"].shape == a["latents"].shape and a["noise"].dtype == a["latents"].dtype
    assert a["image_condition"].shape == a["ref_latent"].shape == (2, 1, 16, *latent)
    assert a["timestep"].shape == (2,) and a["timestep"].dtype == torch.int64
    for flag in ("drop_text", "drop_image", "drop_reference", "drop_audio"):
        assert a[flag].shape == (2,) and a[flag].dtype == torch.bool
    assert torch.equal(a["prompt_embeds"], batch["prompt_embeds"])
    assert torch.equal(a["face_embeds"], batch["face_embedding"])
    if stage == 1:
        assert a["audio"] is None and not a["drop_audio"].any()
    else:  # the dataset's audio dropout, reported and not applied again
        assert torch.equal(a["audio"], batch["audio"]) and torch.equal(a["drop_audio"], batch["audio_dropped"])
    b = _inputs(pipe, batch, stage)
    for key, value in a.items():
        assert value is None and b[key] is None or torch.equal(value, b[key]), key
    c = _inputs(pipe, batch, stage, seed=2)
    for key in ("latents", "noise", "image_condition", "ref_latent"):
        assert not torch.equal(a[key], c[key]), key
    # latents are a posterior SAMPLE ×0.7 of the VAE: near the scaled mean, not equal to it
    mean = pipe.vae.encode(batch["frames"].permute(0, 2, 1, 3, 4)).latent_dist.mean.permute(0, 2, 1, 3, 4) * 0.7
    assert 0 < (a["latents"] - mean).abs().max() < 0.7 * 4 * pipe.vae.encode(
        batch["frames"].permute(0, 2, 1, 3, 4)).latent_dist.std.max()


def test_timesteps_come_from_the_slot_band(pipe):
    batch = _batch(pipe, 1, frames=5)
    for rank, micro_step, world in ((0, 0, 1), (3, 0, 8), (0, 5, 8), (2, 1, 4), (0, 7, 4)):
        low, high = timestep_band((rank + micro_step) % world, world)
        for seed in range(2):
            t = int(_inputs(pipe, batch, seed=seed, rank=rank, micro_step=micro_step, world_size=world)["timestep"])
            assert low <= t <= high, (rank, micro_step, world, t)


def test_motion_noise_and_mask_statistics():
    """σ = exp(N(−3, 0.5)) per sample; one mask of rate 0.1 shared by both frames and the batch; ref untouched."""
    size, h, w = 400, 32, 32
    frames = torch.zeros(size, 3, 3, h, w)
    ref = torch.rand(size, 3, h, w)
    out = condition_frames(frames, ref, torch.Generator().manual_seed(0))
    assert out.shape == (size, 3, 3, h, w) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], ref)
    motion = out[:, 1:]
    zero = motion == 0  # the noise is never exactly 0: zeros are the mask
    masked = zero[0, 0, 0]
    assert torch.equal(zero, masked.expand_as(zero))  # the same pixels in every sample, frame and channel
    assert abs(masked.float().mean().item() - RELEASE.motion_mask_rate) < 0.03
    sigma = motion[:, :, :, ~masked].flatten(1).std(dim=1)
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 3.0) < 0.1 and abs(log_sigma.std().item() - 0.5) < 0.06
    # the noise is added to the frames, not replacing them
    shifted = condition_frames(frames + 0.5, ref, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted[:, 1:][:, :, :, ~masked], motion[:, :, :, ~masked] + 0.5, atol=1e-6)
    # off switches
    plain = condition_frames(frames + 0.5, ref, torch.Generator().manual_seed(0),
                             dataclasses.replace(RELEASE, motion_noise=None, motion_mask_rate=0.0))
    assert torch.equal(plain[:, 1:], frames[:, :2] + 0.5)


def test_image_condition_is_the_pipeline_encoding_without_motion_noise(pipe):
    """Noise off, motion frames = the reference image: the image condition is bitwise the pipeline's inference
    condition of the same image (clip 0: the image twice), same mask and posterior draws from the same state."""
    batch = _batch(pipe, 1)
    batch["frames"][:, :2] = batch["ref_image"][:, None]
    recipe = dataclasses.replace(RELEASE, motion_noise=None)
    ours = step_inputs(batch, pipe.vae, stage=1, recipe=recipe, generator=torch.Generator().manual_seed(5))
    image = batch["ref_image"][0]
    theirs = pipe.prepare_condition(image, image[None].expand(2, -1, -1, -1), torch.Generator().manual_seed(5))
    assert torch.equal(ours["image_condition"], theirs[:, :1])
    assert not theirs[:, 1:].any()
    # with the release's motion noise the condition differs (the noise reaches the VAE)
    noisy = step_inputs(batch, pipe.vae, stage=1, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(noisy["image_condition"], ours["image_condition"])


def test_dropout_draws(pipe):
    batch = _batch(pipe, 4, frames=5)
    never = _inputs(pipe, batch, recipe=dataclasses.replace(RELEASE, drop_text=1.0, drop_image=1.0,
                                                            drop_reference=1.0), drops=False)
    always = _inputs(pipe, batch, recipe=dataclasses.replace(RELEASE, drop_text=1.0, drop_image=1.0,
                                                             drop_reference=1.0))
    for flag in ("drop_text", "drop_image", "drop_reference"):
        assert not never[flag].any() and always[flag].all(), flag
    # drops are drawn last: the tensors do not depend on them
    for key in ("latents", "noise", "image_condition", "ref_latent", "timestep"):
        assert torch.equal(never[key], always[key]), key
    # the release's rates, independent per sample and per condition
    g = torch.Generator().manual_seed(0)
    from hallo3_cli.training.conditions import _draw_drops

    draws = {name: _draw_drops(20000, getattr(RELEASE, name), g) for name in ("drop_text", "drop_image", "drop_reference")}
    assert abs(draws["drop_text"].float().mean().item() - 0.1) < 0.01
    for name in ("drop_image", "drop_reference"):
        assert abs(draws[name].float().mean().item() - 0.05) < 0.008
    both = (draws["drop_text"] & draws["drop_image"]).float().mean().item()
    assert abs(both - 0.005) < 0.003


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_step_on_the_inputs(pipe, stage):
    """training_loss runs on step_inputs' result; each per-sample flag zeroes its condition for that sample only
    (the same loss as zeroing the tensor by hand), and the step backpropagates."""
    import copy

    transformer, reference_net = copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.reference_net)
    batch = _batch(pipe, 2, frames=49, stage=stage)
    inputs = _inputs(pipe, batch, stage, drops=False)
    named = trainable_parameters(transformer, reference_net, stage)
    with torch.no_grad():
        kept = training_loss(transformer, reference_net, stage=stage, **inputs)
        first = torch.tensor([True, False])
        fields = {"drop_text": "prompt_embeds", "drop_image": "image_condition", "drop_reference": "ref_latent"}
        if stage == 2:
            fields["drop_audio"] = "audio"
        for flag, field in fields.items():
            dropped = training_loss(transformer, reference_net, stage=stage, **{**inputs, flag: first})
            by_hand = inputs[field].clone()
            by_hand[0] = 0
            zeroed = training_loss(transformer, reference_net, stage=stage, **{**inputs, field: by_hand})
            assert torch.equal(dropped, zeroed), flag
            if flag != "drop_audio" or not batch["audio_dropped"][0]:
                assert dropped != kept, flag
    loss = training_loss(transformer, reference_net, stage=stage, **inputs)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in named)


def test_bad_batches_are_refused(pipe):
    batch = _batch(pipe, 1, frames=5)
    with pytest.raises(ValueError, match="audio"):
        _inputs(pipe, batch, stage=2)
    with pytest.raises(ValueError, match="masked_ref"):
        _inputs(pipe, {k: v for k, v in batch.items() if k != "masked_ref"})
    with pytest.raises(ValueError, match="ref_image"):
        _inputs(pipe, {**batch, "ref_image": batch["ref_image"][..., :16]})
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        step_inputs(batch, pipe.vae, stage=1, generator=None)
    with pytest.raises(ValueError, match="world_size"):
        _inputs(pipe, batch, world_size=0)
