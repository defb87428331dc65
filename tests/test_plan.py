"""``hallo3 plan``: predicted memory and FLOPs, validated against measured memory on CPU (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hallo3_cli import plan as planning
from hallo3_cli.errors import Hallo3Error

# A mid-size random model, large enough that each measured step allocates tens to hundreds of MB.
# Short clips (3 latent frames) and one DiT layer keep the real CPU runs to seconds.
CHECK_PRESET = """
[plan-check]
description = "mid-size random model for validating hallo3 plan"
seed = 0
height = 1024
width = 1536
fps = 25
clip_length = 9
motion_frames = 2
steps = 2
cfg = 3.5
vae_scale = 0.7
text_length = 226
default_prompt = "a person talking"

[plan-check.transformer]
num_layers = 1
num_attention_heads = 8
attention_head_dim = 64
time_embed_dim = 64
audio_intermediate_dim = 64
audio_cross_attention_dim = 64
face_cross_attention_dim = 64

[plan-check.wav2vec]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
conv_dim = [32, 32, 32, 32, 32, 32, 32]
num_conv_pos_embeddings = 16
num_conv_pos_embedding_groups = 4

[plan-check.text_encoder]
d_model = 256
d_kv = 32
d_ff = 512
num_layers = 2
num_heads = 4
vocab_size = 256

[plan-check.vae]
block_out_channels = [16, 16, 16, 16]
norm_num_groups = 4
layers_per_block = 1
"""

#: (step, height, width) measured for real: the DiT forward at batch 2, the reference pass, a clip's VAE decode.
MEASURED = (("clip/denoise", 320, 480), ("encode-ref/reference", 1024, 1536), ("clip/vae-decode", 64, 96))

# The peak-RSS measurement of one step in a fresh process (tests/test_plan_train.py uses it too): a warm-up run
# (one-time kernel caches are not part of a step's peak), ``settle()`` drops what the warm-up cached that is (the DiTs'
# rotary table), the heap is trimmed, the peak RSS reset (/proc/self/clear_refs) and the step run again; the result is
# peak RSS minus the RSS before.
PEAK_RSS = r"""
import ctypes, gc
libc = ctypes.CDLL(None)

def status(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024

def measured_peak(run, settle):
    run()
    settle()
    gc.collect()
    libc.malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return status("VmHWM") - before
"""

# Loads the networks with the project's loaders (random weights) and measures each step given as STEP:H:W.
MEASURE = PEAK_RSS + r"""
import json, sys
import torch
from hallo3_cli import loading
from hallo3_cli.plan import run_step
from hallo3_cli.presets import get_preset

torch.set_num_threads(2)
preset = get_preset(sys.argv[1])
nets = {"transformer": loading.load_network(preset, "transformer", "cpu", torch.float32),
        "reference": loading.load_network(preset, "reference", "cpu", torch.float32),
        "vae": loading.load_network(preset, "vae", "cpu", torch.float32)}
results = {}
for spec in sys.argv[2:]:
    step, height, width = spec.split(":")
    run = lambda: run_step(step, nets, preset, height=int(height), width=int(width))
    results[step] = measured_peak(run, lambda: [net.__dict__.pop("_rotary_cache", None) for net in nets.values()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def check_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "presets.toml"
    path.write_text(CHECK_PRESET)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLO3_PRESETS", str(path))
        yield "plan-check"


class _Measurement:
    """The measuring process, started before the other tests so that it runs alongside them."""

    def __init__(self, preset: str):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}  # big buffers: mmap'd, freed at once
        args = [f"{step}:{height}:{width}" for step, height, width in MEASURED]
        self.process = subprocess.Popen([sys.executable, "-c", MEASURE, preset, *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._results = None

    def results(self) -> dict[str, int]:
        if self._results is None:
            out, err = self.process.communicate(timeout=300)
            assert self.process.returncode == 0, err[-3000:]
            self._results = json.loads(out.strip().splitlines()[-1])
        return self._results


@pytest.fixture(scope="module")
def measurement(check_preset):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    handle = _Measurement(check_preset)
    yield handle
    if handle.process.poll() is None:
        handle.process.kill()
        handle.process.communicate()


pytestmark = pytest.mark.usefixtures("measurement")


@pytest.fixture(scope="module")
def production():
    """Every mode of the release model at 480×720, 50 steps (the traces are shared)."""
    return {(offload, weights): planning.plan("hallo3", offload=offload, weights_dtype=weights)
            for offload in planning.OFFLOAD_MODES for weights in ("bf16", "fp8")}


# ---------------------------------------------------------------------------------------------
# the production model


def test_release_configuration_is_the_official_checkpoint(official_dir):
    import inspect

    from hallo3_cli.hub.convert import infer_config
    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    manifest = json.loads((official_dir / "manifest_full.json").read_text())["parameters"]
    shapes = {name: torch.empty(entry["shape"], device="meta") for name, entry in manifest.items()}
    for prefix, cls, main in (("model.diffusion_model.", Hallo3Transformer3DModel, True),
                              ("ref_model.diffusion_model.", Hallo3ReferenceNet, False)):
        defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
        inferred = infer_config(shapes, prefix, main=main)
        assert {n: defaults[n] for n in inferred} == inferred  # plan builds the release from the defaults
        with torch.device("meta"):
            default = cls()
        # the official tensors, minus the deterministic RoPE tables and an unused embedding, are the module's
        official = sum(torch.Size(e["shape"]).numel() for n, e in manifest.items()
                       if n.startswith(prefix) and not n.endswith(("freqs_sin", "freqs_cos", "position_embeddings.weight")))
        assert sum(t.numel() for t in [*default.parameters(), *default.buffers()]) == official


def test_production_weights_and_fp8_halves_the_dits():
    bf16 = planning.weight_bytes("hallo3")
    fp8 = planning.weight_bytes("hallo3", weights_dtype="fp8")
    assert bf16["text_encoder"] == 4_762_310_656 * 2  # T5-XXL v1.1 encoder
    assert bf16["transformer"] > 17.5e9 and bf16["reference"] > 11e9
    for dit in ("transformer", "reference"):
        # float8 storage except patch embedding, norms (incl. the adaLN linears) and proj_out (diffusers' skip list)
        assert 0.5 < fp8[dit] / bf16[dit] < 0.6
    for other in ("vae", "wav2vec", "text_encoder"):  # Renderer casts only diffusers networks with blocks
        assert fp8[other] == bf16[other]


def test_production_flops_match_the_spec_and_the_parts(production):
    default = production["none", "bf16"]
    per_forward = default.flops_per_forward  # one DiT call at batch 2 (CFG)
    # docs/model.md §9: ≈ 350 TFLOP per batch-1 forward without the face/audio cross-attention projections:
    # per video token and layer 2·d² for the two queries, and the output projections folded into the
    # values (d · heads · context tokens: 3072 · 48 · (4 + 32)) ≈ 34.8 TFLOP in all
    cross = 2 * 42 * 17550 * (2 * 3072**2 + 3072 * 48 * 36)
    assert 340e12 < per_forward / 2 - cross < 360e12
    assert 37e15 < default.flops_per_clip < 40e15
    decode = default.step("clip", "vae-decode").flops
    assert default.flops_per_clip == pytest.approx(50 * per_forward + decode, rel=0.01)
    # Sequential offloading and fp8 storage leave the weights unusable outside each Linear's own call:
    # their cross-attentions take the SDPA path, whose output projections run over every video token.
    unfolded = 2 * 42 * 17550 * 2 * (3072**2 + 18 * 3072 - 18 * 48 * 3072) - 2 * 42 * 13 * 36 * 3072**2
    for (offload, weights), p in production.items():
        folded = offload != "sequential" and weights == "bf16"
        extra = 0 if folded else 2 * unfolded  # ×2: CFG batch
        assert p.flops_per_forward == pytest.approx(per_forward + extra, rel=1e-4), (offload, weights)


def test_production_modes_order_and_targets(production):
    for weights in ("bf16", "fp8"):
        device = {mode: production[mode, weights].peak_device_bytes for mode in planning.OFFLOAD_MODES}
        host = {mode: production[mode, weights].peak_host_bytes for mode in planning.OFFLOAD_MODES}
        assert device["sequential"] <= device["group"] <= device["model"] <= device["none"]
        assert host["none"] <= min(host["model"], host["group"], host["sequential"])
    for mode in ("model", "group", "sequential"):  # (none + fp8 casts on the host; none + bf16 loads straight to the device)
        assert production[mode, "fp8"].peak_host_bytes <= production[mode, "bf16"].peak_host_bytes
    default = production["none", "bf16"]
    # the default keeps the DiT resident while the (untiled) VAE decodes a clip: that step is the peak
    assert default.peak_device_step == "clip/vae-decode"
    decode = default.step("clip", "vae-decode")
    assert decode.weights_on_device_bytes == default.weights_bytes["transformer"] + default.weights_bytes["vae"]
    # model offloading: one network at a time; its peak is the DiT forward
    model = production["model", "bf16"]
    assert model.peak_device_bytes < 24 * 2**30 and model.peak_device_step == "clip/denoise"
    # the default (--offload auto) is model offloading on CUDA: within 24 GiB with unchanged frames
    assert planning.plan("hallo3").peak_device_bytes == model.peak_device_bytes
    # the untiled VAE decode alone holds ~15 GiB of activations: the ≤ 12 GiB modes tile it
    assert planning.plan("hallo3", offload="group", vae_tiling=True).peak_device_bytes <= 12 * 2**30


def test_vae_tiling_lowers_the_decode_peak():
    step = "clip/vae-decode"
    plain, tiled = (planning.trace("tiny-random", vae_tiling=tiling, steps=(step,))[step] for tiling in (False, True))
    assert tiled.peak_bytes < 0.6 * plain.peak_bytes
    assert tiled.flops > plain.flops  # the tiles overlap


def test_to_json_and_text(production):
    result = production["group", "fp8"]
    data = json.loads(result.to_json())
    for key in ("peak_device_bytes", "peak_host_bytes", "flops_per_clip"):
        assert isinstance(data[key], int) and data[key] == getattr(result, key) > 0
    assert data["offload"] == "group" and data["weights_dtype"] == "fp8"
    assert {row["step"] for row in data["breakdown"]} >= {"denoise", "vae-decode", "reference", "text-encoder"}
    peak = max(data["breakdown"], key=lambda row: row["device_bytes"])
    assert f"{peak['phase']}/{peak['step']}" == data["peak_device_step"]
    text = planning.format_plan(result)
    assert "offload group, weights fp8" in text and "denoise" in text and "×50 per clip" in text


def test_bad_arguments():
    with pytest.raises(Hallo3Error, match="--offload"):
        planning.plan("tiny-random", offload="disk")
    with pytest.raises(Hallo3Error, match="--weights-dtype"):
        planning.plan("tiny-random", weights_dtype="int4")
    with pytest.raises(Hallo3Error, match="multiples of 16"):
        planning.plan("tiny-random", height=100, width=192)
    with pytest.raises(Hallo3Error, match="larger than"):
        planning.plan("tiny-random", height=256, width=384)


# ---------------------------------------------------------------------------------------------
# FLOPs against an independent count


def _dit_forward_flops(config: dict, frames: int, height: int, width: int, text: int, batch: int = 2) -> int:
    """Multiply-adds × 2 of one Hallo3 DiT forward, counted by hand from the architecture (docs/model.md §2)."""
    heads = config["num_attention_heads"]
    d = heads * config.get("attention_head_dim", 64)
    temb, p = config["time_embed_dim"], 2
    per_frame = (height // 8 // p) * (width // 8 // p)
    video, ref = frames * per_frame, per_frame
    tokens = video + text
    face_dim, audio_dim = config["face_cross_attention_dim"], config["audio_cross_attention_dim"]
    layer = (
        2 * 2 * batch * temb * 6 * d  # adaLN linears (norm1, norm2)
        + 4 * 2 * batch * tokens * d * d  # q, k, v, out over [text | video]
        + 2 * 2 * batch * ref * d * d  # the reference bank through k, v
        + 4 * batch * tokens * (tokens + ref) * d  # attention QKᵀ and AV
        + 2 * 2 * batch * frames * (4 * face_dim + 32 * audio_dim) * d  # face and audio cross-attention: k, v
        + sum(_cross_attention_flops(batch, frames, video, d, heads, context) for context in (4, 32))
        + 2 * 2 * batch * tokens * d * 4 * d  # MLP
    )
    embed = 2 * batch * (video * 32 * p * p * d + text * config["text_embed_dim"] * d)
    final = 2 * batch * (d * temb + temb * temb + temb * 2 * d + video * d * p * p * 16)
    return config["num_layers"] * layer + embed + final


def _cross_attention_flops(batch: int, frames: int, video: int, d: int, heads: int, context: int) -> int:
    """A face/audio cross-attention beyond its k, v: the query projection, QKᵀ, then either AV and the
    output projection or, with a short context, the output projection folded into the values."""
    work = 2 * batch * video * d * d + 2 * batch * video * context * d
    if heads * context < d:
        return work + 2 * batch * frames * context * d * d + 2 * batch * video * heads * context * d
    return work + 2 * batch * video * context * d + 2 * batch * video * d * d


def test_traced_flops_equal_an_analytic_count():
    from hallo3_cli.networks import transformer_config
    from hallo3_cli.presets import get_preset

    preset = get_preset("tiny-random")
    traced = planning.trace(preset, device_kind="cpu", steps=("clip/denoise",))["clip/denoise"].flops
    expected = _dit_forward_flops(transformer_config(preset, main=True), 13, preset.height, preset.width, 226)
    assert traced == pytest.approx(expected, rel=0.02)


def test_replayed_blocks_equal_traced_blocks(monkeypatch):
    """Repeated blocks are traced once and replayed: the result must not change (tiny model, CUDA mode)."""
    from hallo3_cli.presets import get_preset

    key = planning._configs(get_preset("tiny-random"))
    args = (key, torch.bfloat16, 128, 192, False, "cuda", ("clip/denoise", "clip/vae-decode", "encode-ref/reference"))
    replayed = planning._traces.__wrapped__(*args)
    monkeypatch.setattr(planning, "_REPLAY", ())
    assert planning._traces.__wrapped__(*args) == replayed


def test_random_preset_networks_match_the_loaders():
    """plan builds the same networks as loading.py (weights counted from those)."""
    from hallo3_cli import loading
    from hallo3_cli.presets import get_preset

    preset = get_preset("tiny-random")
    counted = planning.weight_bytes(preset, dtype="float32")  # weights stored in the compute dtype
    built = {
        "transformer": loading.load_network(preset, "transformer"),
        "reference": loading.load_network(preset, "reference"),
        "vae": loading.load_network(preset, "vae"),
        "text_encoder": loading.load_network(preset, "text_encoder"),
    }
    for name, module in built.items():
        assert counted[name] == sum(t.nbytes for t in [*module.parameters(), *module.buffers()]), name


# ---------------------------------------------------------------------------------------------
# predicted vs measured memory (CPU, float32, real forward passes)


@pytest.mark.parametrize("step,height,width", MEASURED)
def test_predicted_memory_matches_measured(measurement, check_preset, step, height, width):
    predicted = planning.trace(check_preset, height=height, width=width, device_kind="cpu", steps=(step,))[step]
    measured = measurement.results()[step]
    assert measured > 30e6, "the step is too small to check against allocator noise"
    assert abs(predicted.peak_bytes - measured) <= 0.15 * measured, (predicted.peak_bytes, measured)


def test_cpu_plan_adds_weights_to_the_traced_tensors(check_preset):
    result = planning.plan(check_preset, device_kind="cpu", height=320, width=480)
    denoise = result.step("clip", "denoise")
    traced = planning.trace(check_preset, height=320, width=480, device_kind="cpu", steps=("clip/denoise",))["clip/denoise"]
    assert denoise.tensors_bytes == traced.peak_bytes
    weights = result.weights_bytes["transformer"] + result.weights_bytes["vae"]
    assert denoise.device_bytes == denoise.host_bytes == traced.peak_bytes + weights
    assert result.dtype == "float32" and result.peak_device_bytes == result.peak_host_bytes


def test_plan_command_prints_one_json_object():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "plan", "--model", "tiny-random", "--device-kind", "cpu", "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"peak_device_bytes", "peak_host_bytes", "flops_per_clip"} <= data.keys()
    assert data["peak_device_bytes"] > 0 and data["flops_per_clip"] > 0
