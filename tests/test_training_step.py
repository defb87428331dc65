"""The training step against the official one (tiny_train.*): model output, loss and every trainable gradient of
the three recorded cases; the release's trainable sets at tiny and production size; gradient checkpointing; and
the recipe's tables (alphas, timestep bands, learning rate, EMA decay, weight decay)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from hallo3_cli import sampler
from hallo3_cli.hub.convert import MAIN_PREFIX, REF_PREFIX, map_official
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.training import (
    official_parameter_names,
    recipe,
    trainable_parameters,
    training_forward,
    training_loss,
)

#: The recorded cases; s2 runs with gradient checkpointing on the main DiT, as the release trains (the fast test
#: below compares checkpointed and plain gradients of both stages; bench/RESULTS.md: bitwise equal at this size).
CASES = {
    "s1": dict(stage=1, drop=False, checkpointing=False),
    "s1drop": dict(stage=1, drop=True, checkpointing=False),
    "s2": dict(stage=2, drop=False, checkpointing=True),
}
LABELS = (("transformer.", MAIN_PREFIX), ("reference_net.", REF_PREFIX))


@pytest.fixture(scope="module")
def train_json(official_dir):
    return json.loads((official_dir / "tiny_train.json").read_text())


@pytest.fixture(scope="module")
def train_tensors(official_dir):
    from safetensors.torch import load_file

    return load_file(str(official_dir / "tiny_train.safetensors"))


def _fresh(converted):
    """Private copies of the converted official tiny models (the session's own stay untouched)."""
    main, reference = (copy.deepcopy(model).train() for model in converted)
    return main, reference


def _official_grads(official_dir, case: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "tiny_train_grads_s2.safetensors" if CASES[case]["stage"] == 2 else "tiny_train_grads_s1.safetensors"
    prefix = f"{case}.grad."
    return {k[len(prefix):]: v for k, v in load_file(str(official_dir / name)).items() if k.startswith(prefix)}


def _inputs(tensors, stage: int) -> dict:
    return dict(latents=tensors["input.x0"], noise=tensors["input.noise"], timestep=tensors["input.idx"],
                image_condition=tensors["input.image_cond_latent_frame0"], ref_latent=tensors["input.mask_ref_latent"],
                prompt_embeds=tensors["input.text_cond"], face_embeds=tensors["input.face_emb"],
                audio=tensors["input.audio_emb"] if stage == 2 else None)


@pytest.fixture(scope="module")
def runs(converted, train_tensors):
    """One official-size training step per case, run on first use (each ~40 s on 2 cores)."""
    done = {}

    def run(case: str) -> dict:
        if case not in done:
            spec = CASES[case]
            main, reference = _fresh(converted)
            named = trainable_parameters(main, reference, spec["stage"])
            if spec["checkpointing"]:
                main.enable_gradient_checkpointing()
            out = training_forward(main, reference, stage=spec["stage"], **_inputs(train_tensors, spec["stage"]),
                                   drop_text=spec["drop"], drop_reference=spec["drop"])
            out.loss.backward()
            done[case] = {
                "out": out,
                "named": named,
                "grads": {name: p.grad for name, p in named},
                "params": {label + n: p for label, model in zip(("transformer.", "reference_net."), (main, reference))
                           for n, p in model.named_parameters()},
                "official": official_parameter_names(main, reference),
            }
        return done[case]

    return run


# -- the three recorded cases (official size: slow) ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_model_output_loss_and_target(case, runs, train_tensors, train_json):
    out = runs(case)["out"]
    official = train_tensors[f"{case}.model_out"]
    scale = official.abs().max().item()
    assert (out.model_output - official).abs().max().item() <= 2e-6 * scale
    expected = train_tensors[f"{case}.loss"].item()
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    assert abs(out.loss.item() - expected) <= 1e-5 * expected
    assert out.loss.item() == pytest.approx(train_json["cases"][case]["loss"], rel=1e-5)
    # the forward process and the v target are the release's, bit for bit
    alpha = train_tensors["alpha"]
    x0, noise = train_tensors["input.x0"], train_tensors["input.noise"]
    assert torch.equal(out.noisy_latents, x0 * alpha + noise * (1 - alpha**2) ** 0.5)
    assert torch.equal(out.target, train_tensors["target.v"])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_trainable_gradient(case, runs, official_dir, train_json):
    """Each official gradient (split like its tensor where one official tensor is several of ours) against ours:
    max |difference| ≤ 1e-5 × max |official gradient|; the parameters the release leaves without a gradient (the
    reference network's last layer) have none here either."""
    run = runs(case)
    official = _official_grads(official_dir, case)
    assert official, case
    compared = set()
    for label, prefix in LABELS:
        for mapped in map_official(official, prefix):
            name = label + mapped.name
            ours = run["grads"].get(name)
            assert ours is not None, f"{name} got no gradient; the release gives {mapped.sources[0]} one"
            scale = official[mapped.sources[0]].abs().max().item()
            assert scale > 0, mapped.sources[0]
            error = (ours - mapped.make()).abs().max().item()
            assert error <= 1e-5 * scale, f"{name}: {error / scale:.2e} relative to {mapped.sources[0]}"
            compared.add(name)
    no_grad = {name for name, grad in run["grads"].items() if grad is None}
    assert compared | no_grad == set(run["grads"])
    assert {run["official"][name] for name in no_grad} == set(train_json["cases"][case]["grad_is_None"])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_the_reference_network_only_in_stage_one(case, runs):
    run = runs(case)
    reference = {name: p for name, p in run["params"].items() if name.startswith("reference_net.")}
    if CASES[case]["stage"] == 1:
        reached = [name for name, p in reference.items() if p.grad is not None]
        assert reached and all(name.startswith("reference_net.transformer_blocks.0.") for name in reached)
        assert all(p.grad.abs().max() > 0 for p in reference.values() if p.grad is not None)
    else:
        assert all(p.grad is None and not p.requires_grad for p in reference.values())
        reached = [name for name, p in run["params"].items() if p.grad is not None]
        assert reached and all("audio" in run["official"][name] for name in reached)


# -- the trainable sets ----------------------------------------------------------------------------------------------

def _official_tensors(named, official: dict[str, str]) -> set[str]:
    return {official[name] for name, _ in named}


@pytest.mark.parametrize("case", ["s1", "s2"])
def test_trainable_set_at_tiny_size(case, converted, train_json):
    spec = train_json["cases"][case]
    main, reference = _fresh(converted)
    for index, p in enumerate((*main.parameters(), *reference.parameters())):
        p.requires_grad_(index % 2 == 0)  # whatever was set before is overridden
    named = trainable_parameters(main, reference, spec["stage"])
    official = official_parameter_names(main, reference)
    assert _official_tensors(named, official) == set(spec["trainable_names_sorted"])
    assert len(_official_tensors(named, official)) == spec["num_trainable_tensors"]
    assert sum(p.numel() for _, p in named) == spec["num_trainable_params"]
    # each official tensor is exactly the sum of ours made from it
    for key, shape in spec["trainable_shapes"].items():
        assert sum(p.numel() for name, p in named if official[name] == key) == int(np.prod(shape)), key
    chosen = {id(p) for _, p in named}
    assert all(p.requires_grad == (id(p) in chosen) for p in (*main.parameters(), *reference.parameters()))
    assert all(name.startswith(("transformer.", "reference_net.")) for name, _ in named)


@pytest.mark.parametrize("stage", [1, 2])
def test_trainable_set_at_production_size(stage, train_json):
    """The default (production) configuration, built on the meta device: parameter counts equal the release's;
    tensor counts after mapping our tensors back to the official ones; and per official name pattern."""
    expected = train_json["production_trainable"][f"stage{stage}"]
    with torch.device("meta"):
        main, reference = Hallo3Transformer3DModel(), Hallo3ReferenceNet()
    named = trainable_parameters(main, reference, stage)
    official = official_parameter_names(main, reference)
    assert sum(p.numel() for _, p in named) == expected["trainable_params"]
    assert len(_official_tensors(named, official)) == expected["trainable_tensors"]
    if "patterns" in expected:
        by_pattern: dict[str, int] = {}
        for name, p in named:
            pattern = re.sub(r"\.layers\.\d+\.", ".layers.*.", official[name])
            by_pattern[pattern] = by_pattern.get(pattern, 0) + p.numel()
        assert by_pattern == {k: v["params"] for k, v in expected["patterns"].items()}
    never = set(expected["trainable_but_never_receive_gradient"]["names"])
    assert never <= _official_tensors(named, official)
    assert sum(p.numel() for name, p in named if official[name] in never) == \
        expected["trainable_but_never_receive_gradient"]["params"]


def test_official_names_invert_the_converter(fixture):
    """Every tensor of both networks (buffers too) at production size maps back to its official key; on the
    fixture's official weights the inverse gives back exactly the official keys the converter reads."""
    from hallo3_cli.errors import ModelError
    from hallo3_cli.hub.convert import official_names

    with torch.device("meta"):
        main, reference = Hallo3Transformer3DModel(), Hallo3ReferenceNet()
    for model, prefix in ((main, MAIN_PREFIX), (reference, REF_PREFIX)):
        names = official_names({n: tuple(t.shape) for n, t in model.state_dict().items()}, prefix)
        qkv = "transformer.layers.41.attention.query_key_value.weight"
        adaln = "mixins.adaln_layer.adaLN_modulations.0.1.bias"
        assert names["transformer_blocks.41.attn1.to_k.weight"] == prefix + qkv
        assert names["transformer_blocks.0.norm2.linear.bias"] == prefix + adaln
    for prefix in (MAIN_PREFIX, REF_PREFIX):
        mapped = map_official(fixture, prefix)
        names = official_names({m.name: m.shape for m in mapped}, prefix)
        assert set(names.values()) == {m.sources[0] for m in mapped}
    with pytest.raises(ModelError, match="no official counterpart"):
        official_names({"transformer_blocks.0.attn1.to_q.lora_A.weight": (2, 4)}, MAIN_PREFIX)
    with pytest.raises(ModelError, match="round-trip"):  # a wrong shape cannot pass the converter
        official_names({"transformer_blocks.0.attn1.to_q.weight": (4, 4)}, MAIN_PREFIX)


def test_release_rule_is_substring_matching():
    from hallo3_cli.training import RELEASE_RULES

    s1, s2 = RELEASE_RULES[1], RELEASE_RULES[2]
    layer = "diffusion_model.transformer.layers.3."
    assert s1.trains("ref_model." + layer + "post_attention_layernorm.weight")  # 'attention' ⊂ 'post_attention'
    assert s1.trains("model." + layer + "face_attn.query.weight")
    assert not s1.trains("model." + layer + "audio_attn.query.weight")
    assert not s1.trains("model." + layer + "mlp.dense_h_to_4h.weight")
    assert not s1.trains("model." + layer + "input_layernorm.weight")
    assert s2.trains("model.diffusion_model.transformer.audio_proj.conv1.weight")
    assert not s2.trains("ref_model." + layer + "audio_attn.query.weight")  # 'model' ⊂ 'ref_model', then refused


def test_adapters_and_bad_stages_are_refused(converted):
    main, reference = _fresh(converted)
    with pytest.raises(ValueError, match="stage"):
        trainable_parameters(main, reference, 3)
    pytest.importorskip("peft")
    from peft import LoraConfig

    main.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="adapters"):
        trainable_parameters(main, reference, 1)


# -- the step on a small latent (fast): checkpointing, condition dropout, argument checks ------------------------------

def _small(tensors, stage: int, seed: int = 0) -> dict:
    """Inputs for a 13 × 8 × 12 latent (the fixture's weights work at any smaller latent)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 13, 16, 8, 12)
    return dict(latents=torch.randn(shape, generator=g) * 0.7, noise=torch.randn(shape, generator=g), timestep=617,
                image_condition=torch.randn(1, 1, 16, 8, 12, generator=g) * 0.7,
                ref_latent=torch.randn(1, 1, 16, 8, 12, generator=g) * 0.7,
                prompt_embeds=tensors["input.text_cond"], face_embeds=tensors["input.face_emb"],
                audio=torch.randn(1, 49, 5, 12, 768, generator=g) if stage == 2 else None)


def _step_grads(main, reference, stage, inputs, **flags):
    named = trainable_parameters(main, reference, stage)
    for _, p in named:
        p.grad = None
    loss = training_loss(main, reference, stage=stage, **inputs, **flags)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in named if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(stage, converted, train_tensors):
    main, reference = _fresh(converted)
    inputs = _small(train_tensors, stage)
    loss, plain = _step_grads(main, reference, stage, inputs)
    calls = []
    main.enable_gradient_checkpointing(lambda block, *args: calls.append(1) or torch.utils.checkpoint.checkpoint(
        block, *args, use_reentrant=False))
    checkpointed_loss, checkpointed = _step_grads(main, reference, stage, inputs)
    assert len(calls) == len(main.transformer_blocks)
    assert checkpointed_loss == loss
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("reference_net.") for name in plain) == (stage == 1)
    for name, grad in plain.items():
        assert (checkpointed[name] - grad).abs().max() <= 1e-6 * grad.abs().max(), name


@pytest.mark.parametrize("flag, field", [("drop_text", "prompt_embeds"), ("drop_reference", "ref_latent"),
                                         ("drop_image", "image_condition"), ("drop_audio", "audio")])
def test_condition_dropout_is_the_release_null_condition(flag, field, converted, train_tensors):
    """Each drop flag equals passing that condition as zeros (text: for both DiTs; image: the whole condition)."""
    main, reference = _fresh(converted)
    stage = 2 if field == "audio" else 1
    inputs = _small(train_tensors, stage)
    trainable_parameters(main, reference, stage)
    with torch.no_grad():
        kept = training_loss(main, reference, stage=stage, **inputs)
        dropped = training_loss(main, reference, stage=stage, **inputs, **{flag: True})
        zeros = training_loss(main, reference, stage=stage, **{**inputs, field: torch.zeros_like(inputs[field])})
    assert torch.equal(dropped, zeros)
    assert dropped != kept


@pytest.mark.parametrize("stage", [1, 2])
def test_a_bf16_step(stage, converted, train_tensors):
    """bf16 networks (as the release trains) with float32 inputs: a float32 loss and bf16 gradients."""
    main, reference = (model.to(torch.bfloat16) for model in _fresh(converted))
    named = trainable_parameters(main, reference, stage)
    out = training_forward(main, reference, stage=stage, **_small(train_tensors, stage))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.model_output.dtype == torch.bfloat16 and out.target.dtype == torch.float32
    grads = [p.grad for _, p in named if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_the_step_keeps_the_graph_and_checks_its_arguments(converted, train_tensors):
    main, reference = _fresh(converted)
    trainable_parameters(main, reference, 1)
    inputs = _small(train_tensors, 1)
    assert training_loss(main, reference, stage=1, **inputs).requires_grad
    assert training_loss(main, reference, stage=1, **{**inputs, "timestep": torch.tensor([617.0])}).requires_grad
    with pytest.raises(ValueError, match="audio=None"):
        training_loss(main, reference, stage=1, **{**inputs, "audio": torch.zeros(1, 49, 5, 12, 768)})
    with pytest.raises(ValueError, match="pass audio"):
        training_loss(main, reference, stage=2, **inputs)
    with pytest.raises(ValueError, match="integer"):
        training_loss(main, reference, stage=1, **{**inputs, "timestep": 617.5})
    with pytest.raises(ValueError, match="0 to 999"):
        training_loss(main, reference, stage=1, **{**inputs, "timestep": 1000})
    with pytest.raises(ValueError, match="image_condition"):
        training_loss(main, reference, stage=1, **{**inputs, "image_condition": inputs["latents"][:, :1, :, :4]})


# -- the recipe's tables ---------------------------------------------------------------------------------------------

def test_training_alpha_table(train_json, train_tensors):
    """The 1000-entry table against the official one and the correctly rounded one, within a few ulps of the square
    roots it is made from (torch's float32 sqrt is not correctly rounded on every CPU: one ulp of √ᾱ near its
    smallest value, 0.068, is many ulps of the table's smallest entries, so ulps of the entries would not do)."""
    table = train_json["tables"]["alpha_table"]
    ours = sampler.zero_snr_table().numpy().astype(np.float64)
    roots = np.sqrt(sampler.alphas_cumprod()).astype(np.float32)
    scale = float(roots[0]) / (float(roots[0]) - float(roots[-1]))
    ulp = scale * (np.spacing(roots).astype(np.float64) + float(np.spacing(roots[-1])))
    for reference in (table["values"], table["environment_dependence"]["IEEE_float32_values"]):
        reference = np.asarray(reference, dtype=np.float32).astype(np.float64)
        assert reference.shape == (1000,)
        assert np.all(np.abs(ours - reference) <= 4 * ulp)
    assert ours[0] == pytest.approx(0.999575, abs=1e-6) and ours[-1] == 0.0
    for index in (617, 233):  # every table agrees here: exact
        assert ours[index] == table[f"at_{index}"]
        assert set(table["environment_dependence"][f"at_{index}"].values()) == {ours[index]}
    assert ours[617] == train_tensors["alpha"].item()


def test_timestep_bands(train_json):
    bands = train_json["tables"]["idx_bands"]["by_world_size"]
    assert set(bands) >= {"1", "2", "3", "4", "6", "8"}
    for world_size, spec in bands.items():
        for entry in spec["ranks"]:
            band = recipe.timestep_band(entry["rank"], int(world_size))
            assert band == tuple(entry["code_band"]) == (entry["min_idx"], entry["max_idx"]), (world_size, entry)
    with pytest.raises(ValueError):
        recipe.timestep_band(8, 8)


def test_timestep_draws_stay_in_their_band_and_cover_it(train_json):
    g = torch.Generator().manual_seed(3)
    for entry in train_json["tables"]["idx_bands"]["by_world_size"]["8"]["ranks"]:
        draws = recipe.sample_timesteps(entry["rank"], 8, 3000, generator=g)
        assert draws.dtype == torch.int64
        assert set(draws.tolist()) == set(range(entry["min_idx"], entry["max_idx"] + 1))
    # one process emulating 8 ranks: micro-step k draws from rank k % 8's band
    seen = [recipe.timestep_band(step % 8, 8) for step in range(16)]
    assert seen[:8] == seen[8:] and [low for low, _ in seen[:8]] == list(range(0, 1000, 125))
    # the release's draw: torch.randint over the band, from the same generator state
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(recipe.sample_timesteps(5, 8, 4, generator=a), torch.randint(625, 750, (4,), generator=b))


def test_learning_rate_schedule(train_json):
    table = train_json["tables"]["lr"]
    for step, value in table["lr_at_num_iters"].items():
        assert recipe.learning_rate(int(step)) == value, step
    # as a LambdaLR factor in the usual loop: the n-th update uses the release's lr of step n
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=recipe.RELEASE.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda())
    used = {}
    for step in range(1, recipe.RELEASE.train_iters + 1):
        used[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step, value in table["lr_used_by_optimizer_step"].items():
        if value is not None:
            assert used[int(step)] == pytest.approx(value, rel=1e-15, abs=0), step
    assert recipe.learning_rate(40_000) == 0.0


def test_ema_decay(train_json):
    table = train_json["tables"]["ema"]
    for step, value in table["decay_python"].items():
        if value is not None:
            assert recipe.ema_decay(int(step)) == value
            assert recipe.ema_decay_float32(int(step)) == table["decay_float32"][step]
    for step, value in table["formula_min_0p9999_1pn_over_10pn"].items():
        assert recipe.ema_decay(int(step)) == value
    assert recipe.ema_decay(10**6) == 0.9999


def test_no_weight_decay_on_norms_and_biases(converted):
    """Checked against the same rule stated on official names: LayerNorms (layer norms, qk norms, the projections'
    norms, the final norms) and biases get none."""
    main, reference = _fresh(converted)
    for p in (*main.parameters(), *reference.parameters()):
        p.requires_grad_(True)
    official = official_parameter_names(main, reference)
    groups = recipe.weight_decay_groups({"transformer": main, "reference_net": reference})
    decay, no_decay = groups
    assert decay["weight_decay"] == recipe.RELEASE.weight_decay and no_decay["weight_decay"] == 0.0
    assert len(decay["names"]) + len(no_decay["names"]) == len(official)
    norm = re.compile(r"(layernorm|layernorm_list\.\d+|\.norm|norm_final)\.weight$")
    for names, decays in ((decay["names"], True), (no_decay["names"], False)):
        for name in names:
            key = official[name]
            assert decays == (not key.endswith(".bias") and not norm.search(key)), (name, key)
    # only what trains is grouped
    named = trainable_parameters(main, reference, 2)
    grouped = recipe.weight_decay_groups({"transformer": main, "reference_net": reference})
    assert sorted(n for g in grouped for n in g["names"]) == sorted(name for name, _ in named)
