"""``hallo3 plan --train``: per-GPU peak memory and FLOPs of one training step (issue 20), without a GPU.

The step is the trainer's, traced on fake tensors (``FakeTensorMode``, :mod:`hallo3_cli.tracing`, the machinery of
``hallo3 plan``): both DiTs are built from their real classes at the preset's configuration, the stage's trainable
set is chosen by :func:`~hallo3_cli.training.trainable_parameters` (or LoRA adapters are added through diffusers'
PEFT integration), and three phases run for real code on tensors that hold no data:

1. ``vae-encode``: the batch's VAE encodes, no gradients: the clip's frames (→ ``latents``), the image
   condition's 3 frames and the masked reference (``vae.encode(...).latent_dist.sample()``);
2. ``forward-backward``: :func:`~hallo3_cli.training.training_loss` and ``backward()`` at micro-batch 1, with
   per-block gradient checkpointing in the main DiT and none in the reference DiT (docs/model.md §10.6);
3. ``optimizer-step``: ``torch.optim.AdamW`` (``foreach``) over this GPU's share of the fp32 master weights, in
   the recipe's weight-decay groups (its second step: the state exists).

FLOPs are ``torch.utils.flop_counter``'s formulas over phases 1–2 (the recomputation of checkpointing included).
What stays allocated between steps is read from the built modules (bytes of each tensor as it is stored), held as
``hallo3 train`` holds them (frozen weights in bf16, the trained parameters in float32: their own masters; the step
under bf16 autocast), and split over the GPUs by the engine's rule (:data:`ENGINES`):

- ``ddp``: everything replicated, plus DDP's gradient buckets (a second copy of the gradients);
- ``zero2`` (DeepSpeed ZeRO-2, the release's engine): weights replicated (all bf16 in DeepSpeed's bf16 engine);
  fp32 masters, AdamW m and v, EMA and the reduced gradients sharded; one reduce bucket of up to
  :data:`ZERO2_BUCKET` gradients;
- ``fsdp2``: every DiT parameter sharded too (frozen ones in bf16, trainable ones as their fp32 master); while a
  block runs its parameters are gathered whole (two blocks at once with prefetching) and the root modules'
  parameters are gathered for the whole step.

Frozen parts as the trainer holds them: the VAE on every GPU (latents are encoded each step); no T5 (the prompts
are precomputed by ``hallo3 prepare``) and no wav2vec2 (features precomputed too).

    from hallo3_cli.training.plan import plan_training, format_training_plan
    print(format_training_plan(plan_training(1, gpus=8, engine="zero2")))
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field

import torch

from hallo3_cli import geometry, sampler, tracing
from hallo3_cli.errors import UsageError
from hallo3_cli.formatting import flops as _flop
from hallo3_cli.formatting import memory_size as _gib
from hallo3_cli.plan import DEVICE_RESERVE, _build_on, _configs, _preset, _strict, frame_size
from hallo3_cli.presets import Preset
from hallo3_cli.training.recipe import RELEASE, Recipe, weight_decay_groups
from hallo3_cli.training.step import trainable_parameters, training_loss

log = logging.getLogger("hallo3")

#: Engines the trainer runs on (the choices of ``runtime.TRAIN_ENGINES``) and what each shards.
ENGINES = {
    "ddp": "nothing: every GPU holds everything (accelerate DDP; meant for --lora)",
    "zero2": "optimizer state, fp32 masters, EMA and gradients (DeepSpeed ZeRO-2, the release's engine)",
    "fsdp2": "parameters too (PyTorch FSDP2 per block, bf16 gathering, fp32 gradients)",
}
#: ZeRO-2's reduce bucket in gradients (``reduce_bucket_size`` of the release's config, docs/model.md §10.6).
ZERO2_BUCKET = 1_000_000_000
#: Card sizes the verdict is given for (GiB, as ``nvidia-smi`` counts them: "80 GB" cards hold ~80 GiB).
GPU_SIZES = (24, 48, 80)
#: The three phases of a step, in order.
PHASES = ("vae-encode", "forward-backward", "optimizer-step")


@dataclass(frozen=True)
class TrainingPlan:
    """Per-GPU memory (bytes) and FLOPs of one training step at micro-batch 1.

    ``resident``: what stays allocated across steps, by part; ``phases``: each phase's peak, ``phase_parts`` what
    it adds on top of ``resident``; ``peak_bytes`` the largest phase (``peak_phase``). ``fits``: card size in GiB →
    whether ``peak_bytes`` plus a 1 GiB reserve (CUDA context, fragmentation) fits."""

    model: str
    stage: int
    lora_rank: int | None
    engine: str
    gpus: int
    height: int
    width: int
    frames: int
    dtype: str
    parameters: dict[str, int]  # network → parameters (LoRA adapters included in their network)
    trainable_parameters: int
    trainable_tensors: int
    resident: dict[str, int]
    phase_parts: dict[str, dict[str, int]]
    phases: dict[str, int]
    peak_bytes: int
    peak_phase: str
    flops_per_step: int
    flops: dict[str, int]  # per phase (vae-encode, forward, backward)
    fits: dict[str, bool]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        """One strict JSON object (``peak_bytes``, ``flops_per_step``, ``fits``, ... at top level)."""
        return json.dumps(_strict(self.to_dict()), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# the traced step


@dataclass(frozen=True)
class _Tensors:
    """What the built modules hold: bytes and counts, as stored (per tensor, before any sharding)."""

    parameters: dict[str, int]
    weights: dict[str, int]  # network → bytes of parameters and buffers as stored (frozen and trainable)
    trainable: tuple[tuple[int, int], ...]  # (numel, itemsize) of each trainable tensor
    decay_groups: tuple[tuple[float, tuple[int, ...]], ...]  # the recipe's AdamW groups: (weight decay, numels)
    frozen_dit_bytes: int
    trainable_dit_bytes: int
    block_bytes: int  # the largest DiT block, all its parameters in the compute dtype
    block_trainable: int  # trainable parameters of the largest DiT block
    root_bytes: int  # parameters outside the DiT blocks (FSDP2's root units), compute dtype


@dataclass(frozen=True)
class _Trace:
    tensors: _Tensors
    vae_peak: int
    vae_flops: int
    step_peak: int
    forward_flops: int
    backward_flops: int


def _lora_targets(stage: int, networks: dict[str, torch.nn.Module]) -> dict[str, list[str]]:
    """The Linear modules ``hallo3 train --lora`` adapts in ``stage``, per network (the trainer's ``LORA_TARGETS``,
    matched as PEFT matches module-name suffixes)."""
    from hallo3_cli.training.trainer import LORA_TARGETS

    targets = {}
    for label, network in networks.items():
        suffixes = LORA_TARGETS[stage][label]
        targets[label] = [name for name, module in network.named_modules() if isinstance(module, torch.nn.Linear)
                          and any(name == s or name.endswith("." + s) for s in suffixes)]
    return targets


def _add_lora(networks: dict[str, torch.nn.Module], targets: dict[str, list[str]], rank: int, fake) -> None:
    """peft's LoRA layers through diffusers' ``add_adapter``, created on the meta device (outside fake mode) and then
    given fake float32 weights (peft's upcast of adapters): peft's own move onto the base layer's device would swap
    tensors, which fake parameters do not allow, and it leaves meta adapters where they are."""
    from peft import LoraConfig

    for label, network in networks.items():
        network.requires_grad_(False)
        if not targets[label]:
            continue
        with torch.device("meta"), tracing.no_init():
            network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets[label]))
        with fake:
            for module in network.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.is_meta:
                        module._parameters[name] = torch.nn.Parameter(torch.zeros(p.shape, dtype=torch.float32))


def _count(networks: dict[str, torch.nn.Module], vae: torch.nn.Module, recipe: Recipe) -> _Tensors:
    trainable, frozen_bytes, trainable_bytes = [], 0, 0
    block_bytes, block_trainable, root = 0, 0, 0
    for network in networks.values():
        for p in network.parameters():
            if p.requires_grad:
                trainable.append((p.numel(), p.element_size()))
                trainable_bytes += p.nbytes
            else:
                frozen_bytes += p.nbytes
        frozen_bytes += sum(b.nbytes for b in network.buffers())
        in_blocks = set()
        for block in network.transformer_blocks:
            params = list(block.parameters())
            in_blocks.update(id(p) for p in params)
            block_bytes = max(block_bytes, sum(p.numel() for p in params) * network.dtype.itemsize)
            block_trainable = max(block_trainable, sum(p.numel() for p in params if p.requires_grad))
        root += sum(p.numel() for p in network.parameters() if id(p) not in in_blocks) * network.dtype.itemsize
    parameters = {"transformer": sum(p.numel() for p in networks["transformer_net"].parameters()),
                  "reference": sum(p.numel() for p in networks["reference_net"].parameters()),
                  "vae": sum(p.numel() for p in vae.parameters())}
    weights = {"transformer": tracing.tensor_bytes(networks["transformer_net"]),
               "reference": tracing.tensor_bytes(networks["reference_net"]), "vae": tracing.tensor_bytes(vae)}
    groups = weight_decay_groups({"transformer": networks["transformer_net"], "reference_net": networks["reference_net"]},
                                 recipe.weight_decay)
    decay_groups = tuple((g["weight_decay"], tuple(p.numel() for p in g["params"])) for g in groups)
    return _Tensors(parameters, weights, tuple(trainable), decay_groups, frozen_bytes, trainable_bytes, block_bytes,
                    block_trainable, root)


def _build(configs_key: str, stage: int, lora_rank: int | None, dtype: torch.dtype, fake):
    """Both DiTs and the VAE on fake tensors, with the stage's trainable set (or LoRA adapters on it) in float32."""
    configs = json.loads(configs_key)["networks"]
    with tracing.quiet(), fake:
        main = _build_on("transformer", configs["transformer"], dtype)
        reference = _build_on("reference", configs["reference"], dtype)
        vae = _build_on("vae", configs["vae"], dtype)
        trainable_parameters(main, reference, stage)  # sets requires_grad: the full run's trainable set
    if lora_rank is not None:
        targets = _lora_targets(stage, {"transformer": main, "reference_net": reference})
        with tracing.quiet():
            _add_lora({"transformer": main, "reference_net": reference}, targets, lora_rank, fake)
    with fake:  # the trainer keeps what it trains in float32 (the masters), the rest in the compute dtype
        for network in (main, reference):
            for module in network.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.requires_grad and p.dtype != torch.float32:
                        module._parameters[name] = torch.nn.Parameter(torch.zeros(p.shape, dtype=torch.float32))
    return main, reference, vae


def trainable_count(stage: int, *, lora_rank: int | None = None, model: str | Preset = "hallo3") -> tuple[int, int]:
    """(parameters, tensors) that a training run of ``stage`` trains, from the networks the plan builds."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    main, reference, _ = _build(_configs(_preset(model)), stage, lora_rank, torch.bfloat16,
                                FakeTensorMode(allow_non_fake_inputs=True))
    trainable = [p for m in (main, reference) for p in m.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable), len(trainable)


@functools.lru_cache(maxsize=8)
def _trace(configs_key: str, stage: int, lora_rank: int | None, dtype: torch.dtype, height: int, width: int,
           frames: int, text_length: int, keep_grads: bool, recipe: Recipe) -> _Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    sampler.alphas_cumprod()  # computed before fake mode (it goes through numpy)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    main, reference, vae = _build(configs_key, stage, lora_rank, dtype, fake)
    main.enable_gradient_checkpointing()  # per block in the main DiT, none in the reference DiT (§10.6)
    main.train()
    reference.train()
    tensors = _count({"transformer_net": main, "reference_net": reference}, vae, recipe)
    trainable = [p for m in (main, reference) for p in m.parameters() if p.requires_grad]
    if not keep_grads:  # a sharding engine takes each gradient as it is made (bucketed, reduced, sharded)
        for p in trainable:
            p.register_post_accumulate_grad_hook(_drop_grad)

    granularity = 512  # CUDA's allocation granularity, as plan.py counts device memory
    with fake, tracing.quiet(), tracing.FlashAttention():
        with torch.no_grad(), tracing.session({"vae": vae}, granularity) as tracer:
            clip = torch.zeros(1, 3, frames, height, width, dtype=dtype)
            latents = vae.encode(clip).latent_dist.sample()
            del clip
            condition = vae.encode(torch.zeros(1, 3, 3, height, width, dtype=dtype)).latent_dist.sample()
            ref = vae.encode(torch.zeros(1, 3, 1, height, width, dtype=dtype)).latent_dist.sample()
            del latents, condition, ref
        vae_peak, vae_flops = tracer.peak, tracer.flops

        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)  # accelerate's bf16 autocast
        with tracing.session({"transformer": main, "reference": reference}, granularity) as tracer, autocast:
            forward_flops = run_step(main, reference, stage, height=height, width=width, frames=frames,
                                     text_length=text_length, flops=lambda: tracer.flops)
        step_peak, backward_flops = tracer.peak, tracer.flops - forward_flops
    return _Trace(tensors, vae_peak, vae_flops, step_peak, forward_flops, backward_flops)


def run_step(main, reference, stage: int, *, height: int, width: int, frames: int, text_length: int,
             flops=None):
    """One training step's forward and backward at micro-batch 1 on zero inputs of the clip's shapes, as the plan
    traces it (``training_loss`` then ``backward()``; the networks as the trainer sets them up); the inputs are
    made inside. Returns ``flops()`` read between the forward and the backward (None without ``flops``)."""
    dtype = main.dtype
    h, w = geometry.latent_size(height, width)
    config = main.config
    x0 = torch.zeros(1, geometry.latent_frames(frames), geometry.LATENT_CHANNELS, h, w)
    audio = None
    if stage == 2:
        audio = torch.zeros(1, frames, config.audio_window, config.audio_layers, config.audio_channels, dtype=dtype)
    loss = training_loss(
        main, reference, stage=stage, latents=x0, noise=torch.zeros_like(x0), timestep=500,
        image_condition=torch.zeros(1, 1, geometry.LATENT_CHANNELS, h, w),
        ref_latent=torch.zeros(1, 1, geometry.LATENT_CHANNELS, h, w),
        prompt_embeds=torch.zeros(1, text_length, config.text_embed_dim, dtype=dtype),
        face_embeds=torch.zeros(1, config.face_embed_dim), audio=audio)
    forward = flops() if flops is not None else None
    loss.backward()
    return forward


def _drop_grad(parameter: torch.Tensor) -> None:
    parameter.grad = None


@functools.lru_cache(maxsize=16)
def _optimizer_transient(decay_groups: tuple[tuple[float, tuple[int, ...]], ...], gpus: int, recipe: Recipe) -> int:
    """Bytes ``torch.optim.AdamW`` (foreach, the CUDA default) allocates beyond its state in a step over this GPU's
    share of the fp32 masters (each trainable tensor split over ``gpus``), in the recipe's weight-decay groups."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        groups = []
        for decay, numels in decay_groups:
            shards = [torch.nn.Parameter(torch.zeros(math.ceil(n / gpus))) for n in numels]
            for shard in shards:
                shard.grad = torch.zeros_like(shard)
            groups.append({"params": shards, "weight_decay": decay})
        optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=recipe.betas, eps=recipe.eps,
                                      foreach=True)
        optimizer.step()  # the first step creates the state (resident, counted there)
        with tracing.session({}, 512) as tracer:
            optimizer.step()
    return tracer.peak


# ---------------------------------------------------------------------------------------------
# engines


def _resident(t: _Tensors, engine: str, gpus: int) -> dict[str, int]:
    """What stays allocated on one GPU between steps, by part."""
    trainable = sum(n for n, _ in t.trainable)
    masters = 4 * sum(n for n, size in t.trainable if size != 4)  # bf16 weights get an fp32 master copy
    if engine == "ddp":
        return {"frozen DiT weights": t.frozen_dit_bytes, "trainable weights": t.trainable_dit_bytes,
                "fp32 masters": masters, "AdamW m+v": 8 * trainable, "EMA": 4 * trainable,
                "VAE": t.weights["vae"]}
    shard = math.ceil(trainable / gpus)
    if engine == "zero2":  # DeepSpeed's bf16 engine holds every parameter in bf16, the fp32 masters in its shards
        return {"frozen DiT weights": t.frozen_dit_bytes, "trainable weights": 2 * trainable,
                "fp32 masters": 4 * shard, "AdamW m+v": 8 * shard, "EMA": 4 * shard, "VAE": t.weights["vae"]}
    return {"frozen DiT weights": math.ceil(t.frozen_dit_bytes / gpus), "trainable weights": 0,
            "fp32 masters": 4 * shard, "AdamW m+v": 8 * shard, "EMA": 4 * shard, "VAE": t.weights["vae"]}


def _phase_parts(trace: _Trace, engine: str, gpus: int, recipe: Recipe) -> dict[str, dict[str, int]]:
    """What each phase adds on top of the resident parts."""
    t = trace.tensors
    trainable = sum(n for n, _ in t.trainable)
    grad_bytes = sum(n * size for n, size in t.trainable)  # in each parameter's own dtype
    shard = math.ceil(trainable / gpus)
    step = {"activations and inputs": trace.step_peak}
    optimizer = {"AdamW temporaries": _optimizer_transient(t.decay_groups, gpus, recipe)}
    masters = 4 * sum(n for n, size in t.trainable if size != 4)
    if engine == "ddp":
        # the traced backward keeps every gradient (.grad), as DDP does; its buckets hold a second copy
        step["DDP gradient buckets"] = grad_bytes
        optimizer.update({"gradients": grad_bytes, "DDP gradient buckets": grad_bytes,
                          **({"fp32 gradients of the masters": masters} if masters else {})})
    elif engine == "zero2":
        own = 2 * shard  # bf16 gradients, reduced into this GPU's shard
        step.update({"reduced gradient shard": own, "reduce bucket": 2 * min(trainable, ZERO2_BUCKET)})
        optimizer.update({"reduced gradient shard": own, "fp32 gradient shard": 4 * shard})
    else:
        block_grads = t.block_trainable * (2 + 4)  # a block's gradients gathered in bf16, reduced in fp32
        step.update({"fp32 gradient shards": 4 * shard, "gathered root modules": t.root_bytes,
                     "gathered blocks (2, prefetch)": 2 * t.block_bytes, "a block's unsharded gradients": block_grads})
        optimizer.update({"fp32 gradient shards": 4 * shard})
    return {"vae-encode": {"VAE activations and batch": trace.vae_peak}, "forward-backward": step,
            "optimizer-step": optimizer}


def _notes(engine: str, lora_rank: int | None, dtype: str) -> tuple[str, ...]:
    notes = [] if dtype == "bfloat16" else [f"{dtype} weights and activations (not the trainer's bf16)"]
    notes += ["device: tensor memory as torch.cuda.max_memory_allocated counts it; the verdict keeps 1 GiB free for "
             "the CUDA context, cuDNN/NCCL workspaces and fragmentation",
             "as hallo3 train holds them: frozen weights in bf16, trained ones in fp32 (their own masters), the step "
             "under bf16 autocast (traced with CPU autocast); AdamW m+v and EMA in fp32; micro-batch 1; gradient "
             "checkpointing per main-DiT block, none in the reference DiT; SDPA as a fused kernel",
             "held besides the DiTs: the VAE (bf16, latents are encoded each step); not T5 (prompts precomputed "
             "by hallo3 prepare) nor wav2vec2 (features precomputed)",
             "optimizer step: torch AdamW with foreach (CUDA's default); a fused AdamW allocates less"]
    if engine in ("zero2", "fsdp2"):
        notes.append("hallo3 train runs on one process or DDP today; the sharded engines are planned as they would "
                     "hold the state (docs/training.md)")
    if engine == "zero2":
        notes.append(f"zero2: every parameter in bf16 (DeepSpeed's bf16 engine), fp32 masters sharded; reduce bucket "
                     f"{ZERO2_BUCKET:.0e} gradients (the release's config), no offload")
    if engine == "fsdp2":
        notes.append("fsdp2: one unit per DiT block plus the root modules; frozen weights sharded in bf16, trainable "
                     "ones as fp32 shards (MixedPrecisionPolicy bf16 params, fp32 reduce)")
    if lora_rank is not None:
        notes.append(f"--lora {lora_rank}: peft adapters (fp32, alpha = rank) on the attention projections of the "
                     "stage's trainable set instead of training it whole")
    return tuple(notes)


def plan_training(
    stage: int,
    *,
    lora_rank: int | None = None,
    gpus: int = 1,
    engine: str | None = None,
    gpu_memory: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    model: str | Preset = "hallo3",
    recipe: Recipe = RELEASE,
    dtype: str = "bfloat16",
    progress: bool = False,
) -> TrainingPlan:
    """Per-GPU peak memory and FLOPs of one training step of ``stage`` (1 or 2) at micro-batch 1.

    ``lora_rank``: LoRA adapters of that rank instead of the stage's full trainable set. ``engine``: ``ddp``,
    ``zero2`` or ``fsdp2`` (default: ``ddp`` with LoRA, ``fsdp2`` without); ``gpus``: data-parallel GPUs to shard
    over. ``gpu_memory``: a card size in GiB to judge besides :data:`GPU_SIZES`. ``height``/``width``/``frames``:
    the clip (default: the preset's, 480×720×49 for the release). ``dtype``: the weights' and activations'
    (``bfloat16``, as the trainer on a GPU; ``float32`` to compare with a CPU run). Traces are cached per process.
    """
    preset = _preset(model)
    if stage not in (1, 2):
        raise UsageError(f"--stage must be 1 or 2, got {stage!r}")
    engine = engine or ("ddp" if lora_rank is not None else "fsdp2")
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise UsageError(f"--lora must be a positive rank, got {lora_rank!r}")
    if lora_rank is not None and engine != "ddp":
        raise UsageError(f"--lora trains with --engine ddp (the adapters are small: nothing to shard), not {engine}")
    if lora_rank is None and engine == "ddp" and gpus > 1:
        raise UsageError("full fine-tuning on several GPUs shards its state: use --engine fsdp2 or zero2 "
                         "(ddp is for --lora)")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UsageError(f"--gpus must be a positive integer, got {gpus!r}")
    if gpu_memory is not None and not (isinstance(gpu_memory, (int, float)) and math.isfinite(gpu_memory)
                                       and gpu_memory > 0):
        raise UsageError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory!r}")
    height, width = frame_size(preset, height, width)
    frames = preset.clip_length if frames is None else int(frames)
    if frames < 1 or (frames - 1) % 4:
        raise UsageError(f"frames must be 4k + 1 (the VAE's temporal compression), got {frames}")
    if dtype not in ("bfloat16", "float32"):
        raise UsageError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    if progress:
        log.info("tracing a stage-%d training step of %s at %d×%d×%d on fake tensors (no weights, no memory; "
                 "seconds)", stage, preset.name, height, width, frames)
    trace = _trace(_configs(preset), stage, lora_rank, getattr(torch, dtype), height, width, frames, preset.text_length,
                   engine == "ddp", recipe)
    resident = _resident(trace.tensors, engine, gpus)
    parts = _phase_parts(trace, engine, gpus, recipe)
    base = sum(resident.values())
    phases = {phase: base + sum(parts[phase].values()) for phase in PHASES}
    peak_phase = max(PHASES, key=lambda phase: phases[phase])
    peak = phases[peak_phase]
    sizes = [*GPU_SIZES, *([gpu_memory] if gpu_memory is not None and gpu_memory not in GPU_SIZES else [])]
    fits = {f"{size:g}": peak + DEVICE_RESERVE <= size * (1 << 30) for size in sizes}
    flops = {"vae-encode": trace.vae_flops, "forward": trace.forward_flops, "backward": trace.backward_flops}
    return TrainingPlan(
        model=preset.name, stage=stage, lora_rank=lora_rank, engine=engine, gpus=gpus, height=height, width=width,
        frames=frames, dtype=dtype, parameters=trace.tensors.parameters,
        trainable_parameters=sum(n for n, _ in trace.tensors.trainable),
        trainable_tensors=len(trace.tensors.trainable), resident=resident, phase_parts=parts, phases=phases,
        peak_bytes=peak, peak_phase=peak_phase, flops_per_step=sum(flops.values()), flops=flops, fits=fits,
        notes=_notes(engine, lora_rank, dtype),
    )


# ---------------------------------------------------------------------------------------------
# text output


def format_training_plan(result: TrainingPlan) -> str:
    """The plan as text: the setting, the peak and its verdicts, then every part per GPU."""
    r = result
    what = f"LoRA rank {r.lora_rank}" if r.lora_rank is not None else "full fine-tuning"
    verdicts = ", ".join(f"{size} GiB {'fits' if ok else 'does not fit'}" for size, ok in r.fits.items())
    lines = [
        f"{r.model} stage {r.stage}, {what}, {r.gpus} GPU{'s' if r.gpus > 1 else ''} ({r.engine}), "
        f"{r.height}×{r.width}×{r.frames} frames, micro-batch 1, {r.dtype}",
        f"trainable: {r.trainable_parameters:,} parameters in {r.trainable_tensors} tensors",
        f"peak per GPU {_gib(r.peak_bytes)} ({r.peak_phase}): {verdicts}",
        f"{_flop(r.flops_per_step)} per step per GPU (VAE encode {_flop(r.flops['vae-encode'])}, forward "
        f"{_flop(r.flops['forward'])}, backward with recomputation {_flop(r.flops['backward'])})",
        "",
    ]
    rows = [("per GPU", "part", "memory")]
    rows += [("resident", name, _gib(size)) for name, size in r.resident.items()]
    for phase in PHASES:
        rows += [(phase, name, _gib(size)) for name, size in r.phase_parts[phase].items()]
        rows.append((phase, "= phase peak", _gib(r.phases[phase])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}")
    lines.append("")
    lines += [f"note: {note}" for note in r.notes]
    return "\n".join(lines)
