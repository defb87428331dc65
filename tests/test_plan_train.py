"""``hallo3 plan --train``: a training step's per-GPU memory and FLOPs, checked against real CPU steps (issue 20)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_plan import CHECK_PRESET as PLAN_PRESET
from test_plan import PEAK_RSS

from hallo3_cli.training import plan as training_plan
from hallo3_cli.training.plan import plan_training, trainable_count

# test_plan's mid-size random model, at a frame and depth whose checkpointed training step allocates a few hundred
# MB (real CPU steps in seconds).
CHECK_PRESET = (PLAN_PRESET.replace("[plan-check", "[train-check").replace("hallo3 plan\"", "hallo3 plan --train\"")
                .replace("height = 1024\nwidth = 1536", "height = 384\nwidth = 576").replace("num_layers = 1\n", "num_layers = 2\n", 1))

# test_plan's peak-RSS measurement of the preset's random DiTs in float32 as the trainer sets them up (the stage's
# trainable set, per-block checkpointing in the main DiT); the gradients are made (and kept) during the measured step.
MEASURE = PEAK_RSS + r"""
import json, sys
import torch
from hallo3_cli import networks
from hallo3_cli.presets import get_preset
from hallo3_cli.training import trainable_parameters
from hallo3_cli.training.plan import run_step

torch.set_num_threads(2)
preset = get_preset(sys.argv[1])
results = {}
for stage in (1, 2):
    main = networks.random_network(preset, "transformer")
    reference = networks.random_network(preset, "reference")
    trainable_parameters(main, reference, stage)
    main.enable_gradient_checkpointing()
    main.train(); reference.train()
    run = lambda: run_step(main, reference, stage, height=preset.height, width=preset.width,
                           frames=preset.clip_length, text_length=preset.text_length)

    def settle():
        for net in (main, reference):
            net.zero_grad(set_to_none=True)
            net.__dict__.pop("_rotary_cache", None)

    results[stage] = measured_peak(run, settle)
    del main, reference
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def check_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "presets.toml"
    path.write_text(CHECK_PRESET)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLO3_PRESETS", str(path))
        yield "train-check"


@pytest.fixture(scope="module")
def measured(check_preset):
    """Started first, so that the real steps run while the other tests trace."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}  # big buffers: mmap'd, freed at once
    process = subprocess.Popen([sys.executable, "-c", MEASURE, check_preset], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


pytestmark = pytest.mark.usefixtures("measured")


# ---------------------------------------------------------------------------------------------
# against real CPU steps


@pytest.mark.parametrize("stage", [1, 2])
def test_resident_bytes_are_what_a_real_setup_allocates(stage):
    """Weights, AdamW m+v and EMA of the plan (DDP on one GPU) equal, byte for byte, what hallo3 train's setup
    allocates on the real tiny networks: frozen weights in bf16, the trainable set in float32 (its own masters),
    torch's AdamW state after a step in the recipe's groups, a float32 EMA copy."""
    from hallo3_cli import networks
    from hallo3_cli.presets import get_preset
    from hallo3_cli.training import trainable_parameters, weight_decay_groups

    result = plan_training(stage, model="tiny-random", engine="ddp", gpus=1)
    preset = get_preset("tiny-random")
    main = networks.random_network(preset, "transformer").to(torch.bfloat16)
    reference = networks.random_network(preset, "reference").to(torch.bfloat16)
    named = trainable_parameters(main, reference, stage)
    for _, parameter in named:
        parameter.data = parameter.data.float()
        parameter.grad = torch.zeros_like(parameter)
    optimizer = torch.optim.AdamW(weight_decay_groups({"transformer": main, "reference_net": reference}), lr=1e-5)
    optimizer.step()
    ema = [p.detach().float().clone() for _, p in named]
    state = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")

    all_bytes = sum(t.nbytes for m in (main, reference) for t in [*m.parameters(), *m.buffers()])
    trainable_bytes = sum(p.nbytes for _, p in named)
    assert result.resident["trainable weights"] == trainable_bytes
    assert result.resident["frozen DiT weights"] == all_bytes - trainable_bytes
    assert result.resident["fp32 masters"] == 0  # the float32 parameters are the masters
    assert result.resident["AdamW m+v"] == state
    assert result.resident["EMA"] == sum(e.nbytes for e in ema)
    assert result.phase_parts["optimizer-step"]["gradients"] == sum(p.grad.nbytes for _, p in named)
    vae = networks.random_network(preset, "vae").to(torch.bfloat16)
    assert result.resident["VAE"] == sum(t.nbytes for t in [*vae.parameters(), *vae.buffers()])
    assert result.trainable_parameters == sum(p.numel() for _, p in named)
    assert result.trainable_tensors == len(named)


def test_step_activations_match_a_measured_cpu_step(check_preset, measured):
    """The traced forward+backward (float32, DDP: the gradients kept) against the peak RSS of the same step run for
    real on the CPU: within 5 %, both stages (measured within 0.1 %: bench/RESULTS.md)."""
    out, err = measured.communicate(timeout=300)
    assert measured.returncode == 0, err[-3000:]
    real = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    for stage in (1, 2):
        planned = plan_training(stage, model=check_preset, engine="ddp", dtype="float32")
        traced = planned.phase_parts["forward-backward"]["activations and inputs"]
        assert real[stage] > 50e6  # large enough to measure
        assert 0.95 < traced / real[stage] < 1.05, (stage, traced, real[stage])


# ---------------------------------------------------------------------------------------------
# engines


def test_sharding_arithmetic():
    one = plan_training(1, model="tiny-random", engine="zero2", gpus=1)
    zero2 = plan_training(1, model="tiny-random", engine="zero2", gpus=8)
    fsdp2 = plan_training(1, model="tiny-random", engine="fsdp2", gpus=8)
    ddp = plan_training(1, model="tiny-random", engine="ddp", gpus=1)
    n = one.trainable_parameters
    shard = math.ceil(n / 8)
    # ZeRO-2: weights replicated (all in bf16 in DeepSpeed's bf16 engine); masters, m+v, EMA and gradients sharded
    for part in ("frozen DiT weights", "VAE"):
        assert zero2.resident[part] == one.resident[part] == ddp.resident[part]
    assert zero2.resident["trainable weights"] == one.resident["trainable weights"] == 2 * n
    assert ddp.resident["trainable weights"] == 4 * n and ddp.resident["fp32 masters"] == 0  # hallo3 train's fp32
    assert (zero2.resident["fp32 masters"], zero2.resident["AdamW m+v"], zero2.resident["EMA"]) == (4 * shard, 8 * shard, 4 * shard)
    assert one.resident["AdamW m+v"] == ddp.resident["AdamW m+v"] == 8 * n
    assert zero2.phase_parts["optimizer-step"]["fp32 gradient shard"] == 4 * shard
    assert zero2.phase_parts["forward-backward"]["reduce bucket"] == 2 * n  # fewer than the bucket: all, in bf16
    # FSDP2: parameters sharded too; trainable weights live as their fp32 master shards
    assert fsdp2.resident["frozen DiT weights"] == math.ceil(one.resident["frozen DiT weights"] / 8)
    assert fsdp2.resident["trainable weights"] == 0
    assert fsdp2.resident["VAE"] == one.resident["VAE"]
    # DDP keeps every gradient and a bucket copy; the sharding engines do not
    assert ddp.phase_parts["optimizer-step"]["gradients"] == 4 * n
    assert ddp.phase_parts["forward-backward"]["DDP gradient buckets"] == 4 * n
    # the traced step itself does not depend on the number of GPUs
    assert zero2.flops == one.flops == fsdp2.flops
    assert zero2.peak_bytes < one.peak_bytes
    for result in (one, zero2, fsdp2, ddp):
        assert result.peak_bytes == max(result.phases.values()) == result.phases[result.peak_phase]
        assert result.phases["vae-encode"] == sum(result.resident.values()) + sum(result.phase_parts["vae-encode"].values())


def test_lora_trains_adapters_on_the_stages_attention_projections():
    lora = plan_training(1, model="tiny-random", lora_rank=4)
    full = plan_training(1, model="tiny-random", engine="ddp")
    assert lora.engine == "ddp" and full.engine == "ddp"
    # tiny-random: 2 layers × (attn1 q, k, v, out in both DiTs + attn_face q, k, v, out), A and B each
    assert lora.trainable_tensors == 2 * 2 * (4 + 4 + 4)
    assert lora.resident["fp32 masters"] == 0  # peft's adapters are float32 themselves
    assert lora.resident["trainable weights"] == 4 * lora.trainable_parameters
    # the base weights stay, frozen
    assert lora.resident["frozen DiT weights"] == full.resident["frozen DiT weights"] + full.resident["trainable weights"] // 2
    assert lora.flops["forward"] > full.flops["forward"]  # the adapters' own matmuls
    assert lora.flops["backward"] < full.flops["backward"]  # no gradients of the (frozen) base projections


def test_bad_combinations_are_usage_errors():
    from hallo3_cli.errors import UsageError

    for kwargs in ({"stage": 3}, {"stage": 1, "engine": "zero3"}, {"stage": 1, "lora_rank": 8, "engine": "zero2"},
                   {"stage": 1, "gpus": 8, "engine": "ddp"}, {"stage": 1, "gpus": 0}, {"stage": 1, "lora_rank": 0},
                   {"stage": 1, "gpu_memory": float("nan")}, {"stage": 1, "height": 100}):
        with pytest.raises(UsageError):
            plan_training(model="tiny-random", **kwargs)


# ---------------------------------------------------------------------------------------------
# production size


def test_production_trainable_counts_are_the_releases():
    """docs/training.md: 4,232,284,160 (stage 1) and 2,236,127,744 (stage 2) parameters."""
    assert trainable_count(1)[0] == 4_232_284_160
    assert trainable_count(2)[0] == 2_236_127_744


# ---------------------------------------------------------------------------------------------
# the command


def test_command_prints_the_plan_and_json():
    env = {k: v for k, v in os.environ.items() if k != "HALLO3_DEBUG"}
    base = [sys.executable, "-m", "hallo3_cli", "plan", "--train", "--model", "tiny-random"]
    table = subprocess.run([*base, "--stage", "2", "--gpus", "8", "--engine", "zero2"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "stage 2, full fine-tuning, 8 GPUs (zero2)" in table.stdout and "80 GiB fits" in table.stdout
    as_json = subprocess.run([*base, "--stage", "1", "--lora", "4", "--gpu-memory", "12", "--json"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["stage"] == 1 and data["lora_rank"] == 4 and data["engine"] == "ddp"
    assert set(data["fits"]) == {"24", "48", "80", "12"} and all(data["fits"].values())
    assert data["peak_bytes"] == max(data["phases"].values()) and data["flops_per_step"] > 0
    for args, needle in ((["--train"], "--stage"), (["--train", "--stage", "1", "--offload", "model"], "--offload"),
                         (["--stage", "1"], "need --train"), (["--train", "--stage", "1", "--lora", "4", "--engine", "fsdp2"], "ddp"),
                         (["--train", "--stage", "1", "--engine", "zero3"], "--engine")):
        bad = subprocess.run([sys.executable, "-m", "hallo3_cli", "plan", "--model", "tiny-random", *args], env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stdout == "" and "Traceback" not in bad.stderr
        errors = [line for line in bad.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and needle in errors[0], bad.stderr


def test_engines_match_runtime_choices():
    from hallo3_cli.runtime import TRAIN_ENGINES

    assert tuple(training_plan.ENGINES) == TRAIN_ENGINES
