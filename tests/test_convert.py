"""The official-checkpoint converter at dimensions other than the fixture's, and its failure modes."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from hallo3_cli.hub.convert import convert_checkpoint, load_official_state_dict
from hallo3_cli.errors import InputError, ModelError
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.networks import fill_random_

# A second set of dimensions: 3 layers, 3 heads, other widths, a small 8×12 latent (2:3).
OTHER_DIMS = dict(
    num_layers=3,
    num_attention_heads=3,
    attention_head_dim=64,
    time_embed_dim=48,
    text_embed_dim=24,
    sample_height=8,
    sample_width=12,
)
MAIN_EXTRA = dict(
    audio_channels=8,
    audio_intermediate_dim=16,
    audio_context_tokens=4,
    audio_cross_attention_dim=8,
    face_tokens=2,
    face_cross_attention_dim=32,
)


def to_official(state: dict, prefix: str, num_layers: int) -> dict:
    """Independent inverse of the converter's mapping (diffusers names → SAT names)."""
    out = {}
    top = {
        "patch_embed.pos_embedding": "mixins.pos_embed.pos_embedding",
        "patch_embed.proj": "mixins.patch_embed.proj",
        "patch_embed.text_proj": "mixins.patch_embed.text_proj",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "norm_out.norm": "mixins.final_layer.norm_final",
        "proj_out": "mixins.final_layer.linear",
        "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
        "norm_final": "transformer.final_layernorm",
    }
    layer = {
        "norm1.norm": "input_layernorm",
        "norm2.norm": "post_attention_layernorm",
        "attn1.to_out.0": "attention.dense",
        "ff.net.0.proj": "mlp.dense_h_to_4h",
        "ff.net.2": "mlp.dense_4h_to_h",
        "norm_face": "face_input_layernorm",
        "attn_face.to_q": "face_attn.query",
        "attn_face.to_out.0": "face_attn.dense",
        "norm_audio": "audio_input_layernorm",
        "attn_audio.to_q": "audio_attn.query",
        "attn_audio.to_out.0": "audio_attn.dense",
    }
    for name, tensor in state.items():
        stem, _, leaf = name.rpartition(".")
        if name in top:
            out[top[name]] = tensor
        elif stem in top:
            out[f"{top[stem]}.{leaf}"] = tensor
        elif name.startswith(("audio_proj.", "face_proj.")):
            out[f"transformer.{name}"] = tensor
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        for leaf in ("weight", "bias"):
            n1 = state[f"{b}.norm1.linear.{leaf}"].chunk(6)
            n2 = state[f"{b}.norm2.linear.{leaf}"].chunk(6)
            out[f"mixins.adaln_layer.adaLN_modulations.{i}.1.{leaf}"] = torch.cat([*n1[:3], *n2[:3], *n1[3:], *n2[3:]])
            out[f"mixins.adaln_layer.query_layernorm_list.{i}.{leaf}"] = state[f"{b}.attn1.norm_q.{leaf}"]
            out[f"mixins.adaln_layer.key_layernorm_list.{i}.{leaf}"] = state[f"{b}.attn1.norm_k.{leaf}"]
            out[f"transformer.layers.{i}.attention.query_key_value.{leaf}"] = torch.cat(
                [state[f"{b}.attn1.to_{p}.{leaf}"] for p in "qkv"]
            )
            for ours, theirs in layer.items():
                if f"{b}.{ours}.{leaf}" in state:
                    out[f"transformer.layers.{i}.{theirs}.{leaf}"] = state[f"{b}.{ours}.{leaf}"]
            for kind in ("face", "audio"):
                if f"{b}.attn_{kind}.to_k.{leaf}" in state:
                    out[f"transformer.layers.{i}.{kind}_attn.key_value.{leaf}"] = torch.cat(
                        [state[f"{b}.attn_{kind}.to_k.{leaf}"], state[f"{b}.attn_{kind}.to_v.{leaf}"]]
                    )
    return {prefix + k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def other_models():
    torch.manual_seed(0)
    main = Hallo3Transformer3DModel(**OTHER_DIMS, **MAIN_EXTRA).eval()
    reference = Hallo3ReferenceNet(**OTHER_DIMS).eval()
    fill_random_(main, seed=11, std=0.1)
    fill_random_(reference, seed=12, std=0.1)
    return main, reference


@pytest.fixture(scope="module")
def official_state(other_models):
    main, reference = other_models
    state = to_official(main.state_dict(), "model.diffusion_model.", OTHER_DIMS["num_layers"])
    state.update(to_official(reference.state_dict(), "ref_model.diffusion_model.", OTHER_DIMS["num_layers"]))
    # Things a release carries that the converter must ignore (docs/model.md §1).
    state["model.diffusion_model.transformer.position_embeddings.weight"] = torch.randn(64, 192)
    state["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3)
    state["conditioner.embedders.0.transformer.shared.weight"] = torch.randn(5, 4)
    return state


def _forward(main, reference, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    frames, h, w = 13, OTHER_DIMS["sample_height"], OTHER_DIMS["sample_width"]
    x = torch.randn(2, frames, 32, h, w, generator=g).to(dtype)
    text = torch.randn(2, 226, OTHER_DIMS["text_embed_dim"], generator=g).to(dtype)
    audio = torch.randn(2, 49, 5, 12, MAIN_EXTRA["audio_channels"], generator=g).to(dtype)
    face = torch.randn(2, 512, generator=g).to(dtype)
    ref_latent = torch.randn(1, 1, 16, h, w, generator=g).to(dtype)
    with torch.no_grad():
        bank = reference(hidden_states=ref_latent, encoder_hidden_states=torch.zeros(1, 226, OTHER_DIMS["text_embed_dim"], dtype=dtype))
        out = main(
            hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500.0, 500.0]),
            audio_embeds=audio, face_embeds=face, ref_states=bank, return_dict=False,
        )[0]
    return bank, out


def _write_training_save(path, module):
    """A DeepSpeed/SAT-style training save: state dict under 'module' plus RNG bookkeeping (docs/model.md §1)."""
    import random

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "module": module,
            "iteration": 1000,
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.get_rng_state(),
            "ds_version": "0.14.4",
            "global_steps": 1000,
            "dp_world_size": 8,
            "mp_world_size": 1,
            "param_shapes": [{"a": torch.Size([2, 3])}],
            "optimizer": None,
            "extra_array": np.arange(6, dtype=np.float64).reshape(2, 3),
        },
        path,
    )


def test_round_trip_at_other_dimensions(tmp_path, other_models, official_state):
    """Official names → convert (training save with numpy RNG state) → load → same weights and outputs."""
    main, reference = other_models
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("1000")
    _write_training_save(tmp_path / "ckpt" / "1000" / "mp_rank_00_model_states.pt", official_state)

    folders = convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", shard_bytes=200_000)
    loaded_main = Hallo3Transformer3DModel.from_pretrained(folders["transformer"]).eval()
    loaded_ref = Hallo3ReferenceNet.from_pretrained(folders["reference"]).eval()
    assert loaded_main.config.num_layers == 3 and loaded_main.config.num_attention_heads == 3
    assert loaded_main.config.audio_channels == 8 and loaded_main.config.face_tokens == 2
    assert (loaded_main.config.sample_height, loaded_main.config.sample_width) == (8, 12)
    assert len(list((tmp_path / "out" / "transformer").glob("*.safetensors"))) > 1  # sharded with an index
    for ours, theirs in ((main, loaded_main), (reference, loaded_ref)):
        expected, got = ours.state_dict(), theirs.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    bank, out = _forward(main, reference)
    bank2, out2 = _forward(loaded_main, loaded_ref)
    assert out.shape == (2, 13, 16, 8, 12) and len(bank) == 3 and bank[0].shape == (1, 24, 192)
    # Equal weights compute the same function; the float32 sums may still round differently (the BLAS picks
    # kernels by the tensors' memory alignment, and a loaded file is aligned differently): both runs must
    # be within the spec gate of the exact (float64) result.
    bank64, out64 = _forward(copy.deepcopy(main).double(), copy.deepcopy(reference).double(), dtype=torch.float64)
    for got in (out, out2):
        assert ((got.double() - out64).abs().max() / out64.abs().max()).item() <= 2e-6
    for entries in (bank, bank2):
        assert all(((a.double() - b).abs().max() / b.abs().max()).item() <= 2e-6 for a, b in zip(entries, bank64))


def test_single_pt_and_safetensors_sources(tmp_path, official_state):
    from safetensors.torch import save_file

    torch.save({"module": official_state}, tmp_path / "model.pt")
    save_file(official_state, str(tmp_path / "model.safetensors"))
    a = convert_checkpoint(tmp_path / "model.pt", tmp_path / "a")
    b = convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "b")
    for folder in ("transformer", "reference"):
        files_a = sorted(p.name for p in a[folder].iterdir())
        assert files_a == sorted(p.name for p in b[folder].iterdir())
        assert "config.json" in files_a


def test_stored_dtype_is_kept(tmp_path, official_state):
    half = {k: v.to(torch.bfloat16) for k, v in official_state.items()}
    torch.save({"module": half}, tmp_path / "bf16.pt")
    folders = convert_checkpoint(tmp_path / "bf16.pt", tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(folders["transformer"] / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_unknown_and_missing_keys_are_named(tmp_path, official_state):
    extra = dict(official_state)
    extra["model.diffusion_model.transformer.layers.0.mystery.weight"] = torch.zeros(2)
    torch.save({"module": extra}, tmp_path / "extra.pt")
    with pytest.raises(ModelError, match="mystery"):
        convert_checkpoint(tmp_path / "extra.pt", tmp_path / "out1")

    missing = {k: v for k, v in official_state.items() if "layers.1.face_attn.dense.bias" not in k}
    torch.save({"module": missing}, tmp_path / "missing.pt")
    with pytest.raises(ModelError, match=r"missing .*transformer_blocks\.1\.attn_face\.to_out\.0\.bias"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out2")
    assert not (tmp_path / "out2" / "transformer").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, official_state):
    torch.save({"module": official_state, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="not safe"):
        load_official_state_dict(tmp_path / "evil.pt")


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="no such"):
        load_official_state_dict(tmp_path / "nope.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="latest"):
        load_official_state_dict(tmp_path / "folder")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(InputError):
        load_official_state_dict(tmp_path / "junk.pt")


def test_convert_cli(tmp_path, official_state):
    torch.save({"module": official_state}, tmp_path / "model.pt")
    result = subprocess.run(
        [sys.executable, "-m", "hallo3_cli", "convert", str(tmp_path / "model.pt"), str(tmp_path / "out"), "-q"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "transformer" / "config.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "hallo3_cli", "convert", str(tmp_path / "missing.pt"), str(tmp_path / "o2")],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "missing.pt" in bad.stderr
