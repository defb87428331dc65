"""The Hallo3 networks against the official fixtures (docs/model.md §8): convert, load, run, compare."""

from __future__ import annotations

import json

import pytest
import torch

from hallo3_cli.hub.convert import MAIN_PREFIX, REF_PREFIX, infer_config, map_official
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

TOLERANCE = 2e-6  # × max|official| (docs/model.md §8)


def rel_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    return ((ours.float() - official.float()).abs().max() / official.abs().max()).item()


@pytest.fixture(scope="module")
def call(fixture, converted):
    """One CFG denoiser call exactly as in tiny_official.json's call convention."""
    main, reference = converted
    text = fixture["input.text_cond"]
    uncond_text = torch.zeros_like(text)
    audio, face = fixture["input.audio_emb"], fixture["input.face_emb"]
    x = fixture["input.noisy_latent"]
    concat = torch.cat([fixture["input.concat_latent_frame0"], torch.zeros(1, x.shape[1] - 1, *x.shape[2:])], dim=1)
    with torch.no_grad():
        bank = reference(hidden_states=fixture["input.ref_latent"], encoder_hidden_states=uncond_text)
        out = main(
            hidden_states=torch.cat([torch.cat([x, x]), torch.cat([concat, concat])], dim=2),
            encoder_hidden_states=torch.cat([uncond_text, text]),
            timestep=torch.cat([fixture["input.timestep"]] * 2),
            audio_embeds=torch.cat([torch.zeros_like(audio), audio]),
            face_embeds=torch.cat([face, face]),
            ref_states=[torch.cat([b, b]) for b in bank],
            return_dict=False,
        )[0]
        audio_tokens = main.project_audio(torch.cat([torch.zeros_like(audio), audio]))
        face_tokens = main.project_face(torch.cat([face, face]))
        temb = main.time_embedding_of(torch.cat([fixture["input.timestep"]] * 2), torch.float32)
    return {"bank": bank, "out": out, "audio": audio_tokens, "face": face_tokens, "temb": temb}


def test_reference_bank_matches_official(call, fixture):
    assert len(call["bank"]) == 2
    for index, entry in enumerate(call["bank"]):
        official = fixture[f"bank.layer{index}"]
        assert entry.shape == official.shape
        assert rel_error(entry, official) <= TOLERANCE


def test_projections_match_official(call, fixture):
    assert rel_error(call["audio"], fixture["main.audio_proj_out_uc_c"]) <= TOLERANCE
    assert rel_error(call["face"], fixture["main.face_proj_out_uc_c"]) <= TOLERANCE


def test_time_embedding_matches_official(call, fixture):
    """At t = 999 the sinusoid's arguments (t · exp(...) in float32) carry the last bit of the CPU's float32
    ``exp``, magnified by t: the fixture's machine and this one may disagree there. So: (1) ours equals the
    official formula evaluated exactly (float64) at this machine's float32 arguments, to the spec gate; (2) ours
    is within the gate of the fixture plus what one ulp of every frequency and argument can move the output
    (first order, worst case over signs), computed from the official weights."""
    import math

    import numpy as np

    prefix = "model.diffusion_model.time_embed."
    w1, b1, w2, b2 = (fixture[prefix + name].double() for name in ("0.weight", "0.bias", "2.weight", "2.bias"))
    t = fixture["input.timestep"]
    half = w1.shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)  # the official formula
    args = (t[:, None] * freqs[None]).double()[0]

    def official(arguments):
        hidden = torch.nn.functional.silu(torch.cat([torch.cos(arguments), torch.sin(arguments)]) @ w1.T + b1)
        return hidden @ w2.T + b2

    ours = call["temb"][0].double()
    assert rel_error(ours, official(args)) <= TOLERANCE
    one_ulp = t.double() * torch.from_numpy(np.spacing(freqs.numpy())).double() + torch.from_numpy(np.spacing(args.float().numpy())).double()
    sensitivity = torch.autograd.functional.jacobian(official, args).abs() @ one_ulp
    recorded = fixture["main.time_embed_out"][0].double()
    assert ((ours - recorded).abs() <= TOLERANCE * recorded.abs().max() + sensitivity).all()


@pytest.mark.parametrize("half", [0, 1], ids=["uncond", "cond"])
def test_main_output_matches_official(call, fixture, half):
    official = fixture["main.out_uc_c"][half]
    assert call["out"].shape == fixture["main.out_uc_c"].shape
    assert rel_error(call["out"][half], official) <= TOLERANCE


def test_precomputed_tokens_give_the_same_output(converted, fixture, call):
    """project_audio/project_face once per clip (outside the step loop) changes nothing."""
    main, _ = converted
    x = fixture["input.noisy_latent"]
    frame0 = fixture["input.concat_latent_frame0"]
    concat = torch.cat([frame0, torch.zeros(1, x.shape[1] - 1, *x.shape[2:])], dim=1)
    with torch.no_grad():
        out = main(
            hidden_states=torch.cat([torch.cat([x, x]), torch.cat([concat, concat])], dim=2),
            encoder_hidden_states=torch.cat([torch.zeros_like(fixture["input.text_cond"]), fixture["input.text_cond"]]),
            timestep=fixture["input.timestep"].expand(2),
            audio_tokens=call["audio"],
            face_tokens=call["face"],
            ref_states=[b.expand(2, -1, -1) for b in call["bank"]],
            return_dict=False,
        )[0]
    assert torch.equal(out, call["out"])


def test_layernorm_eps_match_the_official_model(converted, official_dir):
    """Every LayerNorm of the production sample in manifest_full.json has the official eps (docs/model.md §2)."""
    manifest = json.loads((official_dir / "manifest_full.json").read_text())
    main, _ = converted
    modules = dict(main.named_modules())
    # Map official module names onto ours through the converter's key mapping.
    fake = {f"model.{name}.weight": torch.empty(1, device="meta") for name in manifest["layernorm_eps_main_sample"]}
    checked = 0
    for item in map_official(fake, MAIN_PREFIX):
        official = item.sources[0].removeprefix("model.").removesuffix(".weight")
        layer = item.name.split(".")[1] if item.name.startswith("transformer_blocks.") else None
        if layer is not None and int(layer) >= main.config.num_layers:
            continue
        ours = modules[item.name.removesuffix(".weight")]
        assert ours.eps == manifest["layernorm_eps_main_sample"][official]["eps"], (official, item.name)
        checked += 1
    assert checked >= 10


def test_production_manifest_maps_completely(official_dir):
    """At production size (meta device) every key maps onto our models with the right shape."""
    from hallo3_cli.hub.convert import check_mapping

    manifest = json.loads((official_dir / "manifest_full.json").read_text())
    state = {k: torch.empty(v["shape"], device="meta", dtype=torch.bfloat16) for k, v in manifest["parameters"].items()}
    totals = {}
    for prefix, cls, main in ((MAIN_PREFIX, Hallo3Transformer3DModel, True), (REF_PREFIX, Hallo3ReferenceNet, False)):
        config = infer_config(state, prefix, main=main)
        mapped = map_official(state, prefix)
        check_mapping(mapped, cls, config, prefix)  # raises on missing / unexpected / wrong shapes
        totals[cls.__name__] = (config, sum(m.nbytes for m in mapped) // 2)
    main_config, main_params = totals["Hallo3Transformer3DModel"]
    assert main_config["num_layers"] == 42 and main_config["num_attention_heads"] == 48
    assert main_config["audio_channels"] == 768 and main_config["face_cross_attention_dim"] == 1024
    # The only official parameters not carried over are the unused position_embeddings table.
    unused = manifest["parameters"]["model.diffusion_model.transformer.position_embeddings.weight"]["shape"]
    expected = manifest["totals"]["model.diffusion_model"]["num_params"] - unused[0] * unused[1]
    assert main_params == expected
    ref_unused = manifest["parameters"]["ref_model.diffusion_model.transformer.position_embeddings.weight"]["shape"]
    assert totals["Hallo3ReferenceNet"][1] == manifest["totals"]["ref_model.diffusion_model"]["num_params"] - ref_unused[0] * ref_unused[1]


def _cross_attention_case(dtype: torch.dtype, context_tokens: int):
    from hallo3_cli.models.blocks import Hallo3Block

    torch.manual_seed(0)
    block = Hallo3Block(128, 2, 64, 32, face_cross_attention_dim=96, audio_cross_attention_dim=80).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)  # nothing at its neutral init value
    block.to(dtype)
    x = torch.randn(6, 50, 128, dtype=dtype)
    context = torch.randn(6, context_tokens, 80, dtype=dtype)
    rope = (torch.randn(50, 64, dtype=dtype), torch.randn(50, 64, dtype=dtype))
    kwargs = dict(query_rotary_emb=rope, norm_q=block.attn1.norm_q, norm_k=block.attn1.norm_k)
    return block.attn_audio, x, context, kwargs


@pytest.mark.parametrize("context_tokens", [1, 5, 31])
def test_folded_cross_attention_is_the_same_maths(context_tokens):
    """Output projection folded into the values (heads·K < dim) == SDPA then to_out, to float64 rounding."""
    from hallo3_cli.models.attention_processor import Hallo3CrossAttnProcessor, Hallo3FoldedCrossAttnProcessor

    attn, x, context, kwargs = _cross_attention_case(torch.float64, context_tokens)
    with torch.no_grad():
        sdpa = Hallo3CrossAttnProcessor()(attn, x, context, **kwargs)
        folded = Hallo3FoldedCrossAttnProcessor()(attn, x, context, **kwargs)
    assert folded.shape == sdpa.shape == x.shape
    assert (folded - sdpa).abs().max() <= 1e-12 * sdpa.abs().max()


def test_folded_cross_attention_falls_back_when_it_cannot_fold(monkeypatch):
    """Long contexts, and weights not usable as plain tensors (offloaded, fp8-stored), take the SDPA path."""
    from hallo3_cli.models import attention_processor as processors

    calls = []
    monkeypatch.setattr(processors.Hallo3CrossAttnProcessor, "__call__", lambda self, *args: calls.append(args) or "sdpa")
    folded = processors.Hallo3FoldedCrossAttnProcessor()
    attn, x, context, kwargs = _cross_attention_case(torch.float32, 64)  # heads·K = 128 = dim: no gain
    assert folded(attn, x, context, **kwargs) == "sdpa"
    attn, x, context, kwargs = _cross_attention_case(torch.float32, 5)
    attn.to_out[0].to(torch.float64)  # stored in another dtype than the compute dtype (as with fp8 storage)
    assert folded(attn, x, context, **kwargs) == "sdpa"
    attn.to_out[0].to("meta")  # not on the compute device (as under sequential offloading)
    assert folded(attn, x, context, **kwargs) == "sdpa"
    assert len(calls) == 3
