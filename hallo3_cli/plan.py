"""``hallo3 plan``: predicted peak device memory, host memory and FLOPs of a render (issue 6).

Nothing here is a hand-typed table, and nothing re-implements the render. Every network is built from
its real class at the preset's configuration (``networks.network_config``) twice, without memory: on the
``meta`` device for its weights (bytes per module, after diffusers' layerwise casting for
``--weights-dtype fp8``), and on fake tensors (``FakeTensorMode``), wrapped in a ``Hallo3Pipeline``
whose own methods run each render step (``_PipelineSteps``: one method call per step, on zero inputs of
the step's shapes). :mod:`hallo3_cli.tracing` (generic) follows every tensor storage they create and
counts FLOPs; fake tensors do no compute, so the production model traces in seconds.

A render has three phases, in order: ``embed-audio`` (wav2vec2), ``encode-ref`` (VAE encode of the
reference, T5 prompt encoding, reference DiT; T5 is released before the reference DiT loads, the
reference DiT after its pass) and ``clip`` (per clip: VAE encode of 3 frames, audio projection,
``steps`` DiT forwards at batch 2 for CFG, VAE decode of 13 latent frames). The memory modes
(``runtime.Runtime``) are applied to the traced timeline:

- ``none``: every loaded network on the device (loaded through host RAM, then moved);
- ``model``: a network is on the device only while it runs (accelerate ``cpu_offload_with_hook``);
- ``group``: diffusers block-level group offloading of the DiTs and T5 (its ``encoder`` blocks) with
  CUDA streams and ``low_cpu_mem_usage`` (blocks pinned on the fly): the network's non-block modules
  plus the running block and the prefetched next one; VAE and wav2vec whole;
- ``sequential``: accelerate ``cpu_offload``: the parameters of the modules executing right now,
  plus every buffer (accelerate keeps buffers on the device).

Device numbers are what ``torch.cuda.max_memory_allocated`` would report (tensor blocks, rounded to
512 bytes; attention as a fused kernel); the CUDA context, cuDNN workspaces and allocator
fragmentation come on top. Host numbers count weights and staging copies, not the Python/CUDA
runtime. For ``device_kind="cpu"`` the scratch buffers of CPU convolutions are added (oneDNN input
reorders, im2col), and tests/test_plan.py checks the traced peaks against the measured RSS of the
same steps run for real (within 1 % at mid size).

    from hallo3_cli.plan import plan, format_plan
    print(format_plan(plan("hallo3", offload="model")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._pytree import tree_map

from hallo3_cli import geometry, networks, options, tracing
from hallo3_cli.audio import WINDOW_SECONDS
from hallo3_cli.components import NETWORKS, of_network
from hallo3_cli.errors import Hallo3Error, UsageError
from hallo3_cli.formatting import flops as _flop
from hallo3_cli.formatting import memory_size as _gib
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.runtime import (DEVICE_KINDS, OFFLOAD_MODES, WEIGHTS_DTYPE_CHOICES, Runtime, dtype_name, resolve_device,
                                resolve_dtype, storage_dtype)

log = logging.getLogger("hallo3")

#: Networks that ``loading.Placement`` treats as block networks (layerwise casting, group offloading), with the
#: ``block_modules`` handed to diffusers' group offloading (T5's blocks sit in ``encoder.block``).
BLOCK_NETWORKS = networks.BLOCK_NETWORKS
#: Device memory kept free for what ``plan`` does not count (CUDA context, cuDNN workspaces, fragmentation).
DEVICE_RESERVE = 1 << 30
#: What ``--offload auto`` tries on CUDA, fastest first: (offload, VAE tiling).
AUTO_CANDIDATES = (("none", False), ("none", True), ("model", False), ("model", True), ("group", False),
                   ("group", True), ("sequential", True))



# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class StepPlan:
    """One step of a render at its own peak: ``device_bytes`` = ``weights_on_device_bytes`` (of every
    network on the device then) + ``tensors_bytes`` (the step's inputs, what stays on the device
    across clips, and activations); ``host_bytes`` = weights and staging copies in RAM; ``flops`` per
    run (``runs`` says how often); ``on_device`` names what sits on the device at the peak."""

    phase: str
    step: str
    runs: str
    device_bytes: int
    host_bytes: int
    weights_on_device_bytes: int
    tensors_bytes: int
    flops: int
    on_device: str


@dataclass(frozen=True)
class Plan:
    """Predicted peaks and FLOPs of rendering with one memory mode; ``breakdown`` has every step."""

    model: str
    height: int
    width: int
    steps: int
    offload: str
    weights_dtype: str
    vae_tiling: bool
    device_kind: str
    dtype: str
    peak_device_bytes: int
    peak_host_bytes: int
    flops_per_clip: int
    flops_per_forward: int
    flops_per_video: int
    peak_device_step: str
    peak_host_step: str
    weights_bytes: dict[str, int]
    breakdown: tuple[StepPlan, ...]
    notes: tuple[str, ...] = field(default=())
    # --gpus N (see plan_parallel): peak_device_bytes, the breakdown and flops_per_clip are then per rank
    gpus: int | None = None
    comm_bytes_per_step: int | None = None
    predicted_speedup: float | None = None
    parallel: dict | None = None  # degrees, interconnect, step times: the cost model's figures

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.gpus is None:  # a one-GPU plan has today's keys only
            for key in ("gpus", "comm_bytes_per_step", "predicted_speedup", "parallel"):
                data.pop(key)
        return data

    def to_json(self, indent: int | None = None) -> str:
        """One JSON object; ``peak_device_bytes``, ``peak_host_bytes`` and ``flops_per_clip`` at top level.
        Strict JSON: a figure that is not finite (none should be) is ``null``, never ``Infinity``/``NaN``."""
        return json.dumps(_strict(self.to_dict()), indent=indent, allow_nan=False)

    def step(self, phase: str, step: str) -> StepPlan:
        return next(s for s in self.breakdown if s.phase == phase and s.step == step)


def _strict(value):
    """``value`` with every non-finite float replaced by None (what strict JSON can say)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# the networks of a preset


def _configs(preset: Preset) -> str:
    """Every network's constructor arguments (``networks.network_config``) and the pipeline's geometry,
    as a JSON cache key."""
    return json.dumps({"networks": {n: networks.network_config(preset, n) for n in NETWORKS},
                       "pipeline": preset.pipeline_config()}, sort_keys=True, default=list)


def _network_dtype(network: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if network == "wav2vec" else dtype  # loading.load_network: wav2vec2 always float32


def _build_on(network: str, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Build in ``dtype`` under whatever device/fake context is active (``.to(dtype)`` cannot swap
    fake tensors), without running weight initialisers (values are never read)."""
    with tracing.default_dtype(dtype), tracing.no_init():
        return networks.build_network(network, config).eval().requires_grad_(False)


@dataclass(frozen=True)
class _Weights:
    """Bytes of a network's weights as stored, per module, and what the memory modes need of them."""

    total: int
    compute_total: int  # before layerwise casting (how it is loaded)
    direct: dict[str, int]  # module name → its own parameters' bytes
    buffers: int
    cast_extra: dict[str, int]  # module name → (compute − storage) bytes of a layerwise-cast module
    unmatched: int  # group offloading: everything outside the blocks
    blocks: tuple[tuple[str, int], ...]  # group offloading: (block name, bytes)
    pinned: int  # the blocks' tensors in pinned host memory (power-of-two blocks)


@functools.lru_cache(maxsize=64)
def _weights(network: str, config_key: str, dtype: torch.dtype, storage: torch.dtype | None) -> _Weights:
    config = json.loads(config_key)
    dtype = _network_dtype(network, dtype)
    with tracing.quiet(), torch.device("meta"):
        module = _build_on(network, config, dtype)
    compute_total = tracing.tensor_bytes(module)
    castable = network in BLOCK_NETWORKS and hasattr(module, "enable_layerwise_casting")
    if storage is not None and storage != dtype and castable:
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)  # what loading.Placement does
    direct = {name: sum(p.nbytes for p in m.parameters(recurse=False)) for name, m in module.named_modules()}
    cast_extra = {
        name: sum(p.numel() * (dtype.itemsize - p.dtype.itemsize) for p in m.parameters(recurse=False))
        for name, m in module.named_modules()
        if any(p.dtype == storage for p in m.parameters(recurse=False)) and storage != dtype
    }
    blocks, unmatched = tracing.group_layout(module, BLOCK_NETWORKS.get(network, ()))
    block_tensors = {id(t): t for name, _ in blocks for t in tracing.tensors(module.get_submodule(name))}
    pinned = sum(tracing.pow2(t.nbytes) for t in block_tensors.values())
    return _Weights(
        total=tracing.tensor_bytes(module),
        compute_total=compute_total,
        direct=direct,
        buffers=sum(b.nbytes for b in module.buffers()),
        cast_extra=cast_extra,
        unmatched=unmatched,
        blocks=tuple(blocks),
        pinned=pinned,
    )


# ---------------------------------------------------------------------------------------------
# the steps of a render: Hallo3Pipeline's own methods


_REPLAY = (
    "transformer:transformer_blocks.*",
    "reference:transformer_blocks.*",
    "text_encoder:encoder.block.*",
    "wav2vec:encoder.layers.*",
    "vae:encoder",
    "vae:decoder",
)


class _ZeroIds:
    """Stands in for the tokenizer when tracing: the prompt's ids (their values never matter, their shape does)."""

    def __call__(self, prompt, *, max_length: int, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.zeros(1, max_length, dtype=torch.long))


def _pipeline(nets: dict[str, torch.nn.Module], pipeline_config: dict, height: int, width: int):
    """A ``Hallo3Pipeline`` around ``nets`` (fake, meta or real networks) at ``height``×``width``."""
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline
    from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

    config = dict(pipeline_config, height=height, width=width)
    components = {of_network(name).name: module for name, module in nets.items()}
    components.setdefault("vae", None)
    pipe = Hallo3Pipeline(scheduler=Hallo3DPMSolverSDEScheduler(), tokenizer=_ZeroIds(),
                          feature_extractor=networks.default_feature_extractor(), **components, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _PipelineSteps:
    """Each render step is one call of a ``Hallo3Pipeline`` method, on zero inputs of the step's shapes.

    A step returns ``(bytes of the inputs it creates, its outputs)``; the caller holds the outputs, as the
    jobs do. The clip steps also create what stays on the device across the clip loop (a copy of the
    render context, the previous clip's frames), so their peaks include it.
    """

    #: (trace name, network, method)
    STEPS = (
        ("embed-audio/wav2vec2", "wav2vec", "wav2vec"),
        ("encode-ref/vae-encode", "vae", "reference_latent"),
        ("encode-ref/text-encoder", "text_encoder", "text_encoder"),
        ("encode-ref/reference", "reference", "reference"),
        ("clip/vae-encode", "vae", "condition"),
        ("clip/project-audio", "transformer", "project_audio"),
        ("clip/denoise", "transformer", "denoise"),
        ("clip/vae-decode", "vae", "decode"),
    )

    def __init__(self, pipe, granularity: int):
        self.pipe, self.granularity = pipe, granularity
        self.h, self.w = geometry.latent_size(pipe.height, pipe.width)
        self._context = None

    def _bytes(self, *tensors) -> int:
        return tracing.storage_bytes(tensors, self.granularity)

    def prepare(self, names) -> None:
        """What the clip steps share, computed before any of them is traced (its cost is not theirs)."""
        if any(name.startswith("clip/") for name in names):
            from hallo3_cli.pipeline_hallo3 import Hallo3Reference

            pipe = self.pipe
            width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
            layers = len(pipe.transformer.transformer_blocks)
            identity = Hallo3Reference(
                image=torch.zeros(3, pipe.height, pipe.width), ref_latent=torch.zeros(geometry.LATENT_CHANNELS, self.h, self.w),
                face_embedding=torch.zeros(pipe.transformer.config.face_embed_dim), face_box=torch.zeros(4, dtype=torch.int32),
                prompt_embeds=torch.zeros(pipe.text_length, pipe.transformer.config.text_embed_dim),
                ref_bank=torch.zeros(layers, self.h * self.w // pipe.transformer.config.patch_size**2, width),
                framing="crop", source_width=1, source_height=1, face_found=False, prompt="",
            )
            self._context = pipe.prepare_context(identity)

    def _resident(self):
        """A fresh copy of the clip loop's device state: the render context and the previous clip's frames."""
        fields = {f.name: tree_map(lambda t: t.clone(), getattr(self._context, f.name))
                  for f in dataclasses.fields(self._context)}
        context = dataclasses.replace(self._context, **fields)
        return context, torch.zeros(self.pipe.clip_length, 3, self.pipe.height, self.pipe.width)

    # embed-audio ---------------------------------------------------------------------------
    def wav2vec(self):
        import numpy as np

        from hallo3_cli.audio_io import SAMPLE_RATE

        clips = max(1, int(WINDOW_SECONDS * self.pipe.config.fps) // self.pipe.clip_length)
        samples = clips * self.pipe.clip_length * (SAMPLE_RATE // self.pipe.config.fps)  # the longest one-span input
        return 0, self.pipe.encode_audio(np.zeros(samples, np.float32))

    # encode-ref ----------------------------------------------------------------------------
    def reference_latent(self):
        framed = torch.zeros(3, self.pipe.height, self.pipe.width)
        return self._bytes(framed), self.pipe.encode_reference_latent(framed)

    def text_encoder(self):
        return 0, self.pipe.encode_prompt("")

    def reference(self):
        pipe = self.pipe
        ref_latent = torch.zeros(1, 1, geometry.LATENT_CHANNELS, self.h, self.w, dtype=pipe.transformer.dtype)
        prompt = torch.zeros(pipe.text_length, pipe.reference_net.config.text_embed_dim, dtype=pipe.transformer.dtype)
        return self._bytes(ref_latent, prompt), pipe.reference_features(ref_latent, prompt)

    # clip ----------------------------------------------------------------------------------
    def condition(self):
        resident = self._resident()
        image = torch.zeros(3, self.pipe.height, self.pipe.width)
        motion = torch.zeros(self.pipe.config.motion_frames, 3, self.pipe.height, self.pipe.width)
        condition = self.pipe.prepare_condition(image, motion, torch.Generator().manual_seed(0))
        return self._bytes(resident, image, motion), (resident, condition)

    def project_audio(self):
        resident = self._resident()
        config = self.pipe.transformer.config
        audio = torch.zeros(1, self.pipe.clip_length, config.audio_window, config.audio_layers, config.audio_channels,
                            dtype=self.pipe.transformer.dtype)
        return self._bytes(resident, audio), (resident, self.pipe.project_audio(audio, resident[0]))

    def denoise(self):
        pipe = self.pipe
        resident = self._resident()
        condition = torch.zeros(1, pipe.latent_frames, geometry.LATENT_CHANNELS, self.h, self.w, dtype=pipe.transformer.dtype)
        tokens = torch.zeros(2, *resident[0].uncond_audio_tokens.shape[1:], dtype=pipe.transformer.dtype)  # projected once per clip
        latents = torch.zeros(1, pipe.latent_frames, geometry.LATENT_CHANNELS, self.h, self.w)  # the sampler state (float32)
        inputs = self._bytes(resident, condition, tokens, latents)
        v = pipe.guided_velocity(latents, torch.tensor(999.0), condition, tokens, resident[0], 3.5)
        return inputs, (resident, condition, tokens, v)

    def decode(self):
        resident = self._resident()
        latents = torch.zeros(1, self.pipe.latent_frames, geometry.LATENT_CHANNELS, self.h, self.w, dtype=self.pipe.transformer.dtype)
        return self._bytes(resident, latents), (resident, self.pipe.decode_latents(latents))


@functools.lru_cache(maxsize=16)
def _traces(configs_key: str, dtype: torch.dtype, height: int, width: int, vae_tiling: bool,
            device_kind: str, names: tuple[str, ...] | None = None, folded_cross_attention: bool = True) -> dict[str, tracing.Trace]:
    """Trace the steps of a render (all, or ``names``) at ``height``×``width`` on fake tensors.

    ``folded_cross_attention=False`` traces the SDPA path that the face/audio cross-attentions take
    when their weights are not plain device tensors at call time (see :func:`_folds_cross_attention`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    configs = json.loads(configs_key)
    granularity = 512 if device_kind == "cuda" else 64
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    selected = [(name, network, run) for name, network, run in _PipelineSteps.STEPS if names is None or name in names]
    needed = {network for _, network, _ in selected} | {"transformer"}  # the render context is shaped by the DiT
    with tracing.quiet(), fake:
        nets = {n: _build_on(n, configs["networks"][n], _network_dtype(n, dtype)) for n in NETWORKS if n in needed}
    if vae_tiling and "vae" in nets:
        nets["vae"].enable_tiling()
    if not folded_cross_attention:
        from hallo3_cli.models.attention_processor import Hallo3CrossAttnProcessor

        for block in nets["transformer"].transformer_blocks:
            block.attn_face.set_processor(Hallo3CrossAttnProcessor())
            block.attn_audio.set_processor(Hallo3CrossAttnProcessor())
    steps = _PipelineSteps(_pipeline(nets, configs["pipeline"], height, width), granularity)
    sdpa = tracing.FlashAttention() if device_kind == "cuda" else contextlib.nullcontext()
    traces = {}
    with fake, torch.no_grad(), sdpa, tracing.quiet():
        steps.prepare([name for name, _, _ in selected])
        for name, network, run in selected:
            run = getattr(steps, run)
            with tracing.session({network: nets[network]}, granularity, _REPLAY, cpu_workspaces=device_kind == "cpu") as tracer:
                inputs, outputs = run()
            del outputs
            traces[name] = tracing.Trace(network, inputs, tracer.peak, tracer.flops, tuple(tracer.intervals))
    return traces


# ---------------------------------------------------------------------------------------------
# applying a memory mode


#: (phase, step, network, the other networks loaded meanwhile, how often it runs); "load …" steps
#: place a network (the jobs load each on first use; wav2vec2 is freed after its phase, T5 before the
#: reference DiT loads, the reference DiT after its pass).
_SCHEDULE = (
    ("embed-audio", "load wav2vec2", "wav2vec", (), "once"),
    ("embed-audio", "wav2vec2", "wav2vec", (), "per 30 s audio"),
    ("encode-ref", "load VAE", "vae", (), "once"),
    ("encode-ref", "vae-encode", "vae", (), "once"),
    ("encode-ref", "load T5", "text_encoder", ("vae",), "once"),
    ("encode-ref", "text-encoder", "text_encoder", ("vae",), "once"),
    ("encode-ref", "load reference DiT", "reference", ("vae",), "once"),
    ("encode-ref", "reference", "reference", ("vae",), "once"),
    ("clip", "load DiT", "transformer", ("vae",), "once"),
    ("clip", "vae-encode", "vae", ("transformer",), "per clip"),
    ("clip", "project-audio", "transformer", ("vae",), "per clip"),
    ("clip", "denoise", "transformer", ("vae",), "steps"),
    ("clip", "vae-decode", "vae", ("transformer",), "per clip"),
)


class _Mode:
    """Where each network's weights are, for one offload mode."""

    def __init__(self, offload: str, weights: dict[str, _Weights], device_kind: str):
        self.offload = offload
        self.weights = weights
        self.prefetch = device_kind == "cuda"  # CUDA streams: the next block loads while one runs

    def _grouped(self, network: str) -> bool:
        return self.offload == "group" and network in BLOCK_NETWORKS

    def _offloaded(self, network: str) -> bool:
        """Not wav2vec: audio.py loads it straight onto the device, whatever the mode."""
        if network == "wav2vec" or self.offload == "none":
            return False
        return self.offload != "group" or network in BLOCK_NETWORKS  # group mode keeps VAE whole on the device

    def idle_on_device(self, network: str) -> int:
        """Device bytes of a loaded network that is not running."""
        w = self.weights[network]
        if not self._offloaded(network):
            return w.total
        return w.buffers if self.offload == "sequential" else 0

    def idle_on_host(self, network: str) -> int:
        w = self.weights[network]
        if not self._offloaded(network):
            return 0
        if self._grouped(network):
            return w.total  # low_cpu_mem_usage: blocks are pinned on the fly, no second host copy
        return w.total - (w.buffers if self.offload == "sequential" else 0)

    def running_on_host(self, network: str) -> int:
        w = self.weights[network]
        if not self._offloaded(network) or self.offload == "model":
            return 0  # moved to the device as a whole: its host copy is freed meanwhile
        if self._grouped(network):
            return w.total - w.unmatched  # the blocks' host copies stay (low_cpu_mem_usage)
        return w.total - w.buffers  # sequential: accelerate keeps the host copy

    def running_on_device(self, network: str, stack: tuple[str, ...], blocks_seen: bool) -> int:
        """Device bytes of the running network's weights while ``stack`` executes."""
        w = self.weights[network]
        extra = sum(w.cast_extra.get(name, 0) for name in stack)  # layerwise casting: one layer upcast
        if self.offload in ("none", "model") or not self._offloaded(network):
            return w.total + extra
        if self.offload == "sequential":
            return w.buffers + sum(w.direct.get(name, 0) for name in set(stack)) + extra
        names = [name for name, _ in w.blocks]
        index = next((names.index(s) for s in stack if s in names), None)
        resident = w.unmatched
        if index is not None:
            ahead = 2 if self.prefetch else 1
            resident += sum(size for _, size in w.blocks[index:index + ahead])
        elif not blocks_seen and "" in stack and w.blocks and self.prefetch:
            resident += w.blocks[0][1]  # the first block is prefetched when the forward starts
        return resident + extra

    def load(self, network: str, others: tuple[str, ...]) -> tuple[int, int]:
        """(device, host) bytes while ``network`` is being loaded and placed."""
        w = self.weights[network]
        device = sum(self.idle_on_device(o) for o in others)
        host = sum(self.idle_on_host(o) for o in others)
        if not self._offloaded(network):
            if w.compute_total != w.total:
                # layerwise casting: loaded and cast on the host, then the stored weights move
                return device + w.total, host + w.compute_total
            return device + w.total, host  # from_pretrained(device_map=device): straight onto the device
        if self.offload == "sequential":
            device += w.buffers  # accelerate moves the buffers to the device for good
        return device, host + max(w.compute_total, w.total)


def _describe(mode: _Mode, network: str, others: tuple[str, ...], stack: tuple[str, ...], blocks_seen: bool) -> str:
    w = mode.weights[network]
    parts = []
    if mode.offload == "sequential" and mode._offloaded(network):
        parts.append(f"{of_network(network).label} (executing modules + buffers)")
    elif mode._grouped(network):
        names = [name for name, _ in w.blocks]
        inside = any(s in names for s in stack)
        blocks = ("2 blocks + " if mode.prefetch else "1 block + ") if inside else ""
        parts.append(f"{of_network(network).label} ({blocks}non-block modules)")
    else:
        parts.append(of_network(network).label)
    parts += [_idle_name(mode, o) for o in others if mode.idle_on_device(o)]
    return ", ".join(parts)


def _idle_name(mode: _Mode, network: str) -> str:
    return of_network(network).label + (" buffers" if mode.offload == "sequential" and mode._offloaded(network) else "")


def plan(
    model: str | Preset = "hallo3",
    *,
    offload: str = "auto",
    weights_dtype: str = "auto",
    vae_tiling: bool = False,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    device_kind: str = "cuda",
    dtype: str = "auto",
    progress: bool = False,
) -> Plan:
    """Predicted peak device memory, peak host memory and FLOPs of rendering with ``model``.

    ``offload``/``weights_dtype``/``vae_tiling`` are the render's memory settings (``runtime.Runtime``;
    ``weights_dtype="auto"`` stores the DiTs in the compute dtype). ``device_kind``: ``cuda`` (compute
    in bfloat16 unless ``dtype`` says otherwise) or ``cpu`` (float32; device and host are the same
    memory, so offloading changes nothing). ``height``/``width``/``steps`` default to the preset's.
    Traces are cached per process: further modes of the same model and size cost milliseconds.
    """
    preset = _preset(model)
    if offload == "auto":  # what a render picks on a device with room for the DiT and the VAE decode
        offload = "model" if device_kind == "cuda" else "none"
    if offload not in OFFLOAD_MODES:
        raise Hallo3Error(f"--offload must be auto or one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if weights_dtype not in WEIGHTS_DTYPE_CHOICES:
        raise Hallo3Error(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPE_CHOICES)}, got {weights_dtype!r}")
    if device_kind not in DEVICE_KINDS:
        raise Hallo3Error(f"device kind must be one of {', '.join(DEVICE_KINDS)}, got {device_kind!r}")
    compute = _compute_dtype(dtype, device_kind)
    height, width = frame_size(preset, height, width)
    steps = preset.steps if steps is None else int(steps)
    if not 1 <= steps <= options.STEPS[1]:
        raise UsageError(f"--steps must be from 1 to {options.STEPS[1]}, got {steps}")
    if progress:
        log.info("tracing the %s networks at %d×%d on fake tensors (no weights, no memory; seconds)", preset.name,
                 height, width)

    weights = _all_weights(preset, compute, storage_dtype(weights_dtype))
    folded = _folds_cross_attention(offload if device_kind == "cuda" else "none", storage_dtype(weights_dtype), compute)
    traces = _traces(_configs(preset), compute, height, width, vae_tiling, device_kind, folded_cross_attention=folded)
    mode = _Mode(offload if device_kind == "cuda" else "none", weights, device_kind)

    rows = _rows(mode, weights, traces, steps, device_kind)
    per_clip = sum(r.flops * (steps if r.runs.startswith("×") else 1) for r in rows if r.phase == "clip")
    once = sum(r.flops for r in rows if r.phase == "encode-ref")
    peak_device = max(rows, key=lambda r: r.device_bytes)
    peak_host = max(rows, key=lambda r: r.host_bytes)
    return Plan(
        model=preset.name, height=height, width=width, steps=steps, offload=offload, weights_dtype=weights_dtype,
        vae_tiling=vae_tiling, device_kind=device_kind, dtype=str(compute).removeprefix("torch."),
        peak_device_bytes=peak_device.device_bytes, peak_host_bytes=peak_host.host_bytes,
        flops_per_clip=per_clip, flops_per_forward=traces["clip/denoise"].flops,
        flops_per_video=once,
        peak_device_step=f"{peak_device.phase}/{peak_device.step}", peak_host_step=f"{peak_host.phase}/{peak_host.step}",
        weights_bytes={n: w.total for n, w in weights.items()},
        breakdown=tuple(rows), notes=_notes(offload, device_kind),
    )


def plan_parallel(result: Plan, gpus: int, *, interconnect: str | float = "nvlink", cfg_parallel: bool | None = None,
                  ulysses: int | None = None, ring: int | None = None, overlap: float = 0.0) -> Plan:
    """``result`` (a one-GPU plan) for one video on ``gpus`` ranks (``--parallel video``), per rank.

    The DiT's weights stay whole on every rank; what a denoising step allocates (the traced
    ``clip/denoise`` tensors) scales with the rank's share of the query tokens and CFG halves
    (``parallel_cost``'s ``flops_fraction``: norms, MLP and attention are per query token), plus the
    keys/values of one layer gathered over the ring ranks and the gathered v-prediction. Every other
    step runs whole on rank 0 (stage files, VAE decode), so the peak is rank 0's. FLOPs per clip:
    the denoising share of one rank plus the rest. Communication and speed-up: :func:`parallel_cost`
    with the preset's token counts, at ``interconnect`` (``nvlink``, ``pcie`` or bytes/s).
    """
    import dataclasses

    from hallo3_cli.parallel.cost import parallel_cost
    from hallo3_cli.parallel.degrees import choose_degrees

    preset = _preset(result.model)
    config = networks.transformer_arguments(preset)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    degrees = choose_degrees(gpus, heads, cfg_parallel=cfg_parallel, ulysses=ulysses, ring=ring)
    patch = config["patch_size"]
    latent_height, latent_width = geometry.latent_size(result.height, result.width)
    per_frame = (latent_height // patch) * (latent_width // patch)
    latent_frames = geometry.latent_frames(preset.clip_length)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, result.dtype)).element_size()
    cost = parallel_cost(
        degrees, flops_per_step=result.flops_per_forward, text_tokens=preset.text_length,
        video_tokens=latent_frames * per_frame, ref_tokens=per_frame, width=heads * head_dim,
        layers=config["num_layers"], output_channels=patch * patch * config["out_channels"],
        dtype_bytes=dtype_bytes, bandwidth=interconnect, overlap=overlap,
    )
    gathered = 2 * latent_frames * per_frame * patch * patch * config["out_channels"] * dtype_bytes
    rows = []
    for row in result.breakdown:
        if (row.phase, row.step) == ("clip", "denoise"):
            tensors = int(row.tensors_bytes * cost.flops_fraction) + cost.kv_buffer_bytes + gathered
            row = dataclasses.replace(row, tensors_bytes=tensors, device_bytes=row.weights_on_device_bytes + tensors,
                                      flops=int(cost.flops_per_rank))
        rows.append(row)
    peak = max(rows, key=lambda r: r.device_bytes)
    saved = result.flops_per_forward * result.steps * (1 - cost.flops_fraction)  # denoising FLOPs other ranks do
    name = interconnect if isinstance(interconnect, str) else f"{interconnect / 1e9:g} GB/s"
    details = {**cost.to_dict(), "interconnect": name, "ranks": degrees.world}
    note = (f"--gpus {gpus}: {degrees}; per rank (rank 0's peak: it also writes and decodes); the denoise row's "
            f"tensors scaled by the rank's share {cost.flops_fraction:.3f} plus one layer's gathered keys/values; "
            f"speed-up at {name} ({cost.bandwidth_bytes_per_s / 1e9:g} GB/s one way), {cost.tflops:g} TFLOP/s, "
            f"overlap {overlap:g}, denoising steps only; host memory is per rank too (× the ranks on one machine)")
    return dataclasses.replace(
        result, peak_device_bytes=peak.device_bytes, peak_device_step=f"{peak.phase}/{peak.step}",
        flops_per_clip=int(result.flops_per_clip - saved), breakdown=tuple(rows), notes=(*result.notes, note),
        gpus=gpus, comm_bytes_per_step=cost.comm_bytes_per_step, predicted_speedup=cost.predicted_speedup,
        parallel=details,
    )


def _folds_cross_attention(offload: str, storage: torch.dtype | None, compute: torch.dtype) -> bool:
    """Whether the face/audio cross-attentions fold their output projection into the values
    (``Hallo3FoldedCrossAttnProcessor``): not when the weights reach the device only inside each
    Linear's own call (sequential offloading) or are stored in another dtype (fp8 layerwise casting)."""
    return offload != "sequential" and (storage is None or storage == compute)


def frame_size(preset: Preset, height: int | None, width: int | None) -> tuple[int, int]:
    """``--height``/``--width`` (default: the preset's frame), checked: positive multiples of 16 and no more pixels
    than the model's frame."""
    height = preset.height if height is None else int(height)
    width = preset.width if width is None else int(width)
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise UsageError(f"--height and --width must be positive multiples of 16, got {height}×{width}")
    if height * width > preset.height * preset.width:
        raise UsageError(f"{height}×{width} is larger than the {preset.name} model's {preset.height}×{preset.width} "
                         "(its learned positional table covers that many tokens)")
    return height, width


def _preset(model: str | Preset) -> Preset:
    return model if isinstance(model, Preset) else get_preset(model)


def _compute_dtype(dtype: str, device_kind: str) -> torch.dtype:
    return resolve_dtype(dtype, device_kind)  # "cuda" → bfloat16 unless said otherwise; "cpu" → float32


def _all_weights(preset: Preset, compute: torch.dtype, storage: torch.dtype | None) -> dict[str, _Weights]:
    storage = None if storage == compute else storage
    configs = json.loads(_configs(preset))["networks"]
    return {n: _weights(n, json.dumps(configs[n], sort_keys=True), compute, storage) for n in NETWORKS}


def weight_bytes(model: str | Preset = "hallo3", *, weights_dtype: str = "auto", dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes of each network's weights (parameters and buffers) as stored, from the meta-built modules."""
    if weights_dtype not in WEIGHTS_DTYPE_CHOICES:
        raise Hallo3Error(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPE_CHOICES)}, got {weights_dtype!r}")
    weights = _all_weights(_preset(model), _compute_dtype(dtype, "cuda"), storage_dtype(weights_dtype))
    return {n: w.total for n, w in weights.items()}


def trace(
    model: str | Preset = "hallo3",
    *,
    height: int | None = None,
    width: int | None = None,
    device_kind: str = "cuda",
    dtype: str = "auto",
    vae_tiling: bool = False,
    steps: tuple[str, ...] | None = None,
) -> dict[str, tracing.Trace]:
    """The traced render steps behind a plan (``"clip/denoise"``, ``"clip/vae-decode"``, ...): live
    tensor bytes on the device per module interval, and FLOPs per run."""
    preset = _preset(model)
    return _traces(_configs(preset), _compute_dtype(dtype, device_kind), height or preset.height, width or preset.width,
                   vae_tiling, device_kind, None if steps is None else tuple(steps))


def run_step(step: str, networks: dict[str, torch.nn.Module], model: str | Preset, *, height: int, width: int,
             dtype: torch.dtype = torch.float32) -> int:
    """Run a render step on real ``networks`` exactly as :func:`trace` traces it (the same pipeline method on
    the same inputs, to measure it); returns the bytes of the inputs it creates. Networks the step does not
    run may be missing (the DiT, which shapes the render context, is then built on the meta device)."""
    preset = _preset(model)
    configs = json.loads(_configs(preset))
    networks = dict(networks)
    if "transformer" not in networks:
        with tracing.quiet(), torch.device("meta"):
            networks["transformer"] = _build_on("transformer", configs["networks"]["transformer"], dtype)
    runs = {name: method for name, _, method in _PipelineSteps.STEPS}
    if step not in runs:
        raise Hallo3Error(f"unknown step {step!r}; known: {', '.join(runs)}")
    steps = _PipelineSteps(_pipeline(networks, configs["pipeline"], height, width), 64)
    with torch.no_grad():
        steps.prepare([step])
        return getattr(steps, runs[step])()[0]


def _rows(mode: _Mode, weights: dict[str, _Weights], traces: dict[str, tracing.Trace], steps: int,
          device_kind: str) -> list[StepPlan]:
    rows = []
    for phase, step, network, others, runs in _SCHEDULE:
        if step.startswith("load "):
            device, host = mode.load(network, others)
            if device_kind == "cpu":
                device = host = sum(weights[o].total for o in others) + weights[network].compute_total
            on_device = [_idle_name(mode, n) for n in (network, *others) if mode.idle_on_device(n)]
            rows.append(StepPlan(phase, step, runs, device, host, device, 0, 0, ", ".join(on_device) or "-"))
            continue
        trace = traces[f"{phase}/{step}"]
        idle = sum(mode.idle_on_device(o) for o in others)
        blocks = {name for name, _ in weights[network].blocks}
        best, seen = None, False
        for stack, live in trace.intervals:
            resident = idle + mode.running_on_device(network, stack, seen)
            if best is None or resident + live > best[0] + best[1]:
                best = (resident, live, stack, seen)
            seen = seen or any(s in blocks for s in stack)
        resident, live, stack, seen = best
        host = sum(mode.idle_on_host(o) for o in others) + mode.running_on_host(network)
        if device_kind == "cpu":
            resident = sum(weights[o].total for o in (network, *others))
            host = resident + live
        rows.append(StepPlan(phase, step, f"×{steps} per clip" if runs == "steps" else runs, resident + live, host,
                             resident, live, trace.flops, _describe(mode, network, others, stack, seen)))
    return rows


def _notes(offload: str, device_kind: str) -> tuple[str, ...]:
    notes = []
    if device_kind == "cuda":
        notes.append("device: tensor memory as torch.cuda.max_memory_allocated counts it; add the CUDA context "
                     "(~0.3-1 GB), cuDNN workspaces and fragmentation")
    else:
        notes.append("cpu: device and host are the same memory; offloading changes nothing")
    notes.append("host: weights and staging copies only (not the Python/CUDA runtime, audio features or frames)")
    if offload == "group" and device_kind == "cuda":
        notes.append("group: T5 is one group unless its encoder blocks are named in block_modules")
    return tuple(notes)


# ---------------------------------------------------------------------------------------------
# text output


def format_plan(result: Plan) -> str:
    """The plan as an aligned text table: totals, then every step at its own peak."""
    r = result
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    weights = r.weights_dtype if r.weights_dtype != "auto" else short.get(r.dtype, r.dtype)
    lines = [
        f"{r.model} at {r.height}×{r.width}, {r.steps} steps, offload {r.offload}, weights {weights}, "
        f"VAE tiling {'on' if r.vae_tiling else 'off'} ({r.device_kind}, {r.dtype})",
        f"peak device memory {_gib(r.peak_device_bytes)} ({r.peak_device_step}); "
        f"peak host memory {_gib(r.peak_host_bytes)} ({r.peak_host_step})",
        f"{_flop(r.flops_per_clip)} per clip ({_flop(r.flops_per_forward)} per DiT forward at batch 2); "
        f"{_flop(r.flops_per_video)} once per video",
        "",
    ]
    if r.gpus is not None:
        p = r.parallel
        lines[1:1] = [f"on {r.gpus} GPUs ({p['ranks']} ranks: cfg {p['cfg']} × ulysses {p['ulysses']} × ring {p['ring']}), "
                      f"per rank: memory and FLOPs below; {_gib(r.comm_bytes_per_step)} sent per denoising step; "
                      f"predicted speed-up {r.predicted_speedup:.2f}× over one GPU ({p['interconnect']})"]
    rows = [("phase", "step", "runs", "device", "weights", "tensors", "host", "FLOPs/run", "on the device at its peak")]
    for s in r.breakdown:
        rows.append((s.phase, s.step, s.runs, _gib(s.device_bytes), _gib(s.weights_on_device_bytes), _gib(s.tensors_bytes),
                     _gib(s.host_bytes), _flop(s.flops) if s.flops else "-", s.on_device))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6, 7}
    for row in rows:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines += [f"note: {note}" for note in r.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# choosing the memory mode that fits (--offload auto)


def free_device_memory(device: str) -> int | None:
    """Free bytes on a CUDA device (None elsewhere: memory is shared with the host)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def choose_memory_mode(runtime: Runtime, preset: Preset | None = None, free: int | None = None) -> Runtime:
    """``--offload auto``: off CUDA ``none``; on CUDA the fastest of :data:`AUTO_CANDIDATES` whose planned
    peak (plus :data:`DEVICE_RESERVE`) fits the free device memory (``free``: the device's now), adding VAE
    tiling only when that is what makes it fit (``--vae-tiling`` given: always tiled). Nothing fits: the
    least-memory mode, with a warning. The choice and its reason are in ``Runtime.reason``."""
    device = resolve_device(runtime.device)
    if not device.startswith("cuda"):
        return dataclasses.replace(runtime, device=device, offload="none", reason="not CUDA: memory is shared, nothing moves")
    free = free_device_memory(device) if free is None else free
    if preset is None or free is None:
        return dataclasses.replace(runtime, device=device, offload="model", reason="device memory unknown: model offloading")
    tried = []
    for offload, tiling in AUTO_CANDIDATES:
        if runtime.compile and offload in ("group", "sequential"):
            continue
        tiling = tiling or runtime.vae_tiling
        need = plan(preset, offload=offload, weights_dtype=runtime.weights_dtype, vae_tiling=tiling,
                    device_kind="cuda", dtype=dtype_name(resolve_dtype(runtime.dtype, device))).peak_device_bytes
        label = f"{offload}{' + VAE tiling' if tiling else ''}"
        if need + DEVICE_RESERVE <= free:
            skipped = f"; faster modes need more ({', '.join(tried)})" if tried else ""
            reason = f"offload {label}: planned peak {_gib(need)} of {_gib(free)} free{skipped}"
            return dataclasses.replace(runtime, device=device, offload=offload, vae_tiling=tiling, reason=reason)
        tried.append(f"{label} {_gib(need)}")
    reason = f"nothing fits {_gib(free)} free ({', '.join(tried)}); trying sequential + VAE tiling anyway"
    log.warning("%s", reason)
    return dataclasses.replace(runtime, device=device, offload="sequential", vae_tiling=True, reason=reason)
