"""The DiTs as trainable diffusers models: gradient checkpointing equals the plain backward, and diffusers'
PEFT integration (add_adapter, set_adapters, LoRA scale, save/load_lora_adapter) works on the main DiT."""

from __future__ import annotations

import pytest
import torch

from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.networks import fill_random_

DIMS = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, time_embed_dim=16, text_embed_dim=16,
            sample_height=8, sample_width=12, max_text_seq_length=8)
MAIN = dict(audio_channels=8, audio_layers=2, audio_intermediate_dim=8, audio_context_tokens=2,
            audio_cross_attention_dim=8, face_tokens=2, face_cross_attention_dim=16)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _models(seed=0):
    main = Hallo3Transformer3DModel(**DIMS, **MAIN)
    reference = Hallo3ReferenceNet(**DIMS)
    fill_random_(main, seed=seed, std=0.1)
    fill_random_(reference, seed=seed + 1, std=0.1)
    return main, reference


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 13, 32, 8, 12, generator=g),
        "text": torch.randn(1, 8, 16, generator=g),
        "audio": torch.randn(1, 49, 5, 2, 8, generator=g),
        "face": torch.randn(1, 512, generator=g),
        "ref": torch.randn(1, 1, 16, 8, 12, generator=g),
    }


def _forward(main, reference, inputs, **kwargs):
    bank = reference(hidden_states=inputs["ref"], encoder_hidden_states=inputs["text"])
    return main(hidden_states=inputs["x"], encoder_hidden_states=inputs["text"], timestep=torch.tensor([617]),
                audio_embeds=inputs["audio"], face_embeds=inputs["face"], ref_states=bank, return_dict=False,
                **kwargs)[0]


def _grads(main, reference, inputs):
    for model in (main, reference):
        model.zero_grad(set_to_none=True)
    _forward(main, reference, inputs).square().mean().backward()
    return {f"{prefix}.{name}": p.grad.clone() for prefix, model in (("main", main), ("ref", reference))
            for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_equals_the_plain_backward():
    main, reference = _models()
    inputs = _inputs()
    plain = _grads(main, reference, inputs)
    for model in (main, reference):
        model.enable_gradient_checkpointing()
        assert model.gradient_checkpointing
    checkpointed = _grads(main, reference, inputs)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("ref.") for k in plain)
    for name, grad in plain.items():
        scale = grad.abs().max().item()
        assert (checkpointed[name] - grad).abs().max().item() <= 1e-6 * max(scale, 1e-30), name


def test_checkpointing_is_off_without_gradients():
    """Inference under no_grad takes the plain path (the checkpoint function is never called)."""
    main, reference = _models()
    calls = []
    main.enable_gradient_checkpointing(lambda block, *args: calls.append(1) or block(*args))
    with torch.no_grad():
        _forward(main, reference, _inputs())
    assert not calls
    _forward(main, reference, _inputs())
    assert len(calls) == len(main.transformer_blocks)


def test_stage_one_runs_without_the_audio_path():
    main, reference = _models()
    inputs = _inputs()
    bank = reference(hidden_states=inputs["ref"], encoder_hidden_states=inputs["text"])
    out = main(hidden_states=inputs["x"], encoder_hidden_states=inputs["text"], timestep=torch.tensor([617]),
               face_embeds=inputs["face"], ref_states=bank, return_dict=False)[0]
    out.square().mean().backward()
    assert all(p.grad is None for name, p in main.named_parameters() if "audio" in name)
    assert main.transformer_blocks[0].attn_face.to_q.weight.grad is not None


def _randomise_lora(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_through_diffusers_peft_integration(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    main, reference = _models()
    inputs = _inputs()
    with torch.no_grad():
        base = _forward(main, reference, inputs)
        main.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="speech")
        # B = 0 at init: nothing changes (up to rounding: a wrapped output projection is not folded)
        assert torch.allclose(_forward(main, reference, inputs), base, atol=1e-5)
        _randomise_lora(main)
        adapted = _forward(main, reference, inputs)
        assert (adapted - base).abs().max() > 1e-3
        # the scale is honoured: through attention_kwargs, and through set_adapters
        assert torch.allclose(_forward(main, reference, inputs, attention_kwargs={"scale": 0.0}), base, atol=1e-6)
        half = _forward(main, reference, inputs, attention_kwargs={"scale": 0.5})
        assert (half - base).abs().max() > 1e-4 and (half - adapted).abs().max() > 1e-4
        main.set_adapters(["speech"], weights=[0.5])
        assert torch.allclose(_forward(main, reference, inputs), half, atol=1e-6)
        main.set_adapters(["speech"], weights=[1.0])

    # the cross-attention output projections carry adapters too, so they must not fold them away
    assert type(main.transformer_blocks[0].attn_face.to_out[0]) is not torch.nn.Linear
    main.save_lora_adapter(tmp_path / "lora", adapter_name="speech")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh, _ = _models()
    fresh.load_lora_adapter(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="speech",
                            prefix=None)
    with torch.no_grad():
        assert torch.allclose(_forward(fresh, reference, inputs), adapted, atol=1e-6)


def test_lora_adapters_train():
    pytest.importorskip("peft")
    from peft import LoraConfig

    main, reference = _models()
    main.requires_grad_(False)
    reference.requires_grad_(False)
    main.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS))
    trainable = [name for name, p in main.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    _forward(main, reference, _inputs()).square().mean().backward()
    assert all(p.grad is not None for name, p in main.named_parameters() if "lora_B" in name)
