"""The official 3-step sampling run (tiny_sample3) reproduced through ``Hallo3Pipeline``'s own denoising loop:
its context, its one CFG denoiser call and its scheduler, fed the official noise draws."""

from __future__ import annotations

import pytest
import torch

TOLERANCE = 1e-5  # × max|official|


@pytest.mark.slow
def test_three_official_steps_through_the_pipeline(fixture, converted, official_dir):
    from safetensors.torch import load_file

    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline, Hallo3Reference
    from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

    official = load_file(str(official_dir / "tiny_sample3.safetensors"))
    main, reference = converted
    pipe = Hallo3Pipeline(transformer=main, vae=None, scheduler=Hallo3DPMSolverSDEScheduler(), reference_net=reference)
    text = fixture["input.text_cond"]
    x = fixture["input.noisy_latent"]
    condition = torch.cat([fixture["input.concat_latent_frame0"], torch.zeros(1, x.shape[1] - 1, *x.shape[2:])], dim=1)
    bank = pipe.reference_features(fixture["input.ref_latent"], text[0])
    identity = Hallo3Reference(
        image=torch.zeros(3, 1, 1), ref_latent=fixture["input.ref_latent"][0, 0], face_embedding=fixture["input.face_emb"][0],
        face_box=torch.zeros(4, dtype=torch.int32), prompt_embeds=text[0], ref_bank=bank, framing="crop",
        source_width=1, source_height=1, face_found=True, prompt="",
    )
    context = pipe.prepare_context(identity)

    seen = []

    def on_step(pipe_, step, timestep, tensors):
        seen.append(tensors["latents"])
        return {}

    final = pipe.denoise(
        condition, fixture["input.audio_emb"], context, None, 3, 3.5, latents=x,
        noise=[[official["noise0"]], [official["noise1"], official["noise2"]], None], callback_on_step_end=on_step,
    )
    for step, x_t in enumerate(seen[:-1], start=1):
        expected = official[f"step{step}.x_in"]
        assert (x_t - expected).abs().max() <= TOLERANCE * expected.abs().max(), step
    expected = official["final_latent"]
    assert torch.equal(seen[-1], final)
    error = ((final - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE, error
