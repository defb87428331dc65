"""The official 3-step sampling run (tiny_sample3) reproduced through our model and sampler."""

from __future__ import annotations

import pytest
import torch

from hallo3_cli import sampler

TOLERANCE = 1e-5  # × max|official|


@pytest.mark.slow
def test_three_official_steps_through_our_model(fixture, converted, official_dir):
    from safetensors.torch import load_file

    official = load_file(str(official_dir / "tiny_sample3.safetensors"))
    main, reference = converted
    text = fixture["input.text_cond"]
    audio, face = fixture["input.audio_emb"], fixture["input.face_emb"]
    x = fixture["input.noisy_latent"]
    concat = torch.cat([fixture["input.concat_latent_frame0"], torch.zeros(1, x.shape[1] - 1, *x.shape[2:])], dim=1)
    with torch.no_grad():
        bank = reference(hidden_states=fixture["input.ref_latent"], encoder_hidden_states=torch.zeros_like(text))
        audio_tokens = main.project_audio(torch.cat([torch.zeros_like(audio), audio]))
        face_tokens = main.project_face(torch.cat([face, face]))

    seen = []

    def denoise(x_t, t, alpha):
        seen.append(x_t)
        with torch.no_grad():
            v = main(
                hidden_states=torch.cat([torch.cat([x_t, x_t]), torch.cat([concat, concat])], dim=2),
                encoder_hidden_states=torch.cat([torch.zeros_like(text), text]),
                timestep=torch.tensor([t, t]),
                audio_tokens=audio_tokens,
                face_tokens=face_tokens,
                ref_states=bank,
                return_dict=False,
            )[0]
        x0 = sampler.v_to_x0(torch.cat([x_t, x_t]), v, alpha)
        guided = sampler.cfg(x0[:1], x0[1:], 3.5)
        step = len(seen) - 1
        reference_x0 = official[f"step{step}.guided_denoised"]
        assert (guided - reference_x0).abs().max() <= TOLERANCE * reference_x0.abs().max(), step
        return guided

    final = sampler.sample(
        denoise, x, sampler.schedule(3), noise=[official["noise0"], official["noise1"], official["noise2"]]
    )
    for step, x_t in enumerate(seen):
        expected = official[f"step{step}.x_in"]
        assert (x_t - expected).abs().max() <= TOLERANCE * expected.abs().max(), step
    expected = official["final_latent"]
    error = ((final - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE, error
