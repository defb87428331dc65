"""``hallo3 train``: the release's fine-tuning loop (docs/model.md §10.3–10.6; docs/training.md "The trainer") on
accelerate, from one process to many.

    from hallo3_cli.training import TrainConfig, train
    summary = train(TrainConfig("data/", "run/", stage=1, model="tiny-random", steps=100))

One update = ``grad_accum`` micro-batches of ``micro_batch`` samples on each of the ``W`` processes: ``E = W ×
grad_accum`` micro-batch *slots*. Slot ``g`` (``g = rank × grad_accum + k``) of update ``n`` draws its samples,
its condition dropout, its noise and its timestep from its own generator, seeded by ``(seed, n, g)``, and its
timestep from band ``g`` of ``E`` (the release's rank-stratified bands, emulated per micro-step when one process
accumulates). So the same ``E`` gives the same update whatever the split between processes and accumulation,
and a resume only needs the update count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hallo3_cli.errors import ArgumentError, InputError, UsageError
from hallo3_cli.training import checkpoint as ckpt
from hallo3_cli.training.recipe import (
    RELEASE,
    Recipe,
    ema_decay_float32,
    lr_lambda,
    weight_decay_groups,
)
from hallo3_cli.training.step import trainable_parameters, training_loss

log = logging.getLogger("hallo3")

MIXED_PRECISION = ("no", "bf16")
#: ``ddp``: every process holds the whole networks and optimizer (accelerate's DDP); ``fsdp2``: torch's FSDP2
#: (``fully_shard``) shards parameters, gradients and optimizer state per transformer block over the processes.
ENGINES = ("ddp", "fsdp2")
#: LoRA targets by stage (module-name suffixes, PEFT's matching): the attention layers the release trains in that
#: stage (docs/model.md §10.4); the reference network is adapted in stage 1 only.
LORA_TARGETS = {
    1: {"transformer": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                        "attn_face.to_q", "attn_face.to_k", "attn_face.to_v", "attn_face.to_out.0"),
        "reference_net": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")},
    2: {"transformer": ("attn_audio.to_q", "attn_audio.to_k", "attn_audio.to_v", "attn_audio.to_out.0"),
        "reference_net": ()},
}
MODEL_DIR, EMA_MODEL_DIR = "model", "model-ema"
LORA_DIR, EMA_LORA_DIR = "lora", "lora-ema"
LOGS_DIR = "logs"
SUMMARY = "train.json"


@dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters instead of the release's trainable set (a deviation: the release trains no LoRA, §10.4).
    ``targets``/``reference_targets``: module-name suffixes in the main DiT / the reference network (empty: that
    network is not adapted); None: :data:`LORA_TARGETS` of the stage. ``alpha`` None: = ``rank``."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    reference_targets: tuple[str, ...] | None = None

    def resolved(self, stage: int) -> LoraSpec:
        return LoraSpec(self.rank, float(self.rank if self.alpha is None else self.alpha),
                        tuple(LORA_TARGETS[stage]["transformer"] if self.targets is None else self.targets),
                        tuple(LORA_TARGETS[stage]["reference_net"] if self.reference_targets is None
                              else self.reference_targets))


@dataclass
class TrainConfig:
    """One training run. Every number of the release's recipe is in ``recipe`` (:class:`Recipe`); ``lr_steps``
    (default: ``steps``) is the length the LR schedule's warm-up and decay are laid over (the release: 30,000).

    ``model``: a preset or model folder the networks start from (stage 2: a stage-1 run's ``RUN/model`` or the
    release); ``micro_batch`` samples per micro-batch, ``grad_accum`` micro-batches per update and process;
    ``save_every``/``keep``: checkpoints every N updates, the newest ``keep`` kept (None: all); ``resume``:
    continue the run in ``output`` from its newest checkpoint; ``stop_at``: save and stop after that update (a
    time-boxed job; ``resume`` continues it); ``validate_every`` with ``validation_portrait`` and
    ``validation_speech``: render and score a held-out pair every N updates (``hallo3 eval``'s scores); ``engine``:
    one of :data:`ENGINES` (the run's results do not depend on it).
    """

    dataset: Path
    output: Path
    stage: int
    model: str = "hallo3"
    steps: int = RELEASE.train_iters
    lr_steps: int | None = None
    micro_batch: int = RELEASE.micro_batch
    grad_accum: int = 1
    seed: int = 0
    recipe: Recipe = RELEASE
    mixed_precision: str = "no"
    gradient_checkpointing: bool = True
    lora: LoraSpec | None = None
    save_every: int = RELEASE.save_every
    keep: int | None = None
    resume: bool = False
    stop_at: int | None = None
    validate_every: int | None = None
    validation_portrait: Path | None = None
    validation_speech: Path | None = None
    device: str = "auto"
    engine: str = "ddp"
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        self.dataset, self.output = Path(self.dataset), Path(self.output)
        if self.stage not in (1, 2):
            raise ArgumentError(f"stage must be 1 or 2, got {self.stage!r}")
        for name in ("steps", "micro_batch", "grad_accum", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr_steps", "keep", "stop_at", "validate_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ArgumentError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.device not in ("auto", "cpu"):
            raise ArgumentError(f"device must be auto (accelerate's choice) or cpu, got {self.device!r}")
        if self.engine not in ENGINES:
            raise ArgumentError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "fsdp2" and self.lora is not None:
            raise ArgumentError("--lora trains on the ddp engine (its adapters are small); fsdp2 is for full "
                                "fine-tuning")
        if self.engine == "fsdp2" and self.validate_every is not None:
            raise ArgumentError("validate_every runs on the ddp engine only: a validation render runs on rank 0, "
                                "and sharded networks need every rank in each forward")
        if self.lora is not None and (not isinstance(self.lora.rank, int) or self.lora.rank < 1):
            raise ArgumentError(f"LoRA rank must be a positive integer, got {self.lora.rank!r}")
        if self.validate_every is not None and (self.validation_portrait is None or self.validation_speech is None):
            raise ArgumentError("validate_every needs validation_portrait and validation_speech")
        check_recipe(self.recipe)

    @property
    def schedule(self) -> Recipe:
        """The recipe with its LR schedule laid over ``lr_steps`` (default ``steps``)."""
        return replace(self.recipe, train_iters=self.lr_steps or self.steps)

    def identity(self, slots: int) -> dict:
        """What makes two runs the same run (a resume must match it): everything but the run's length, the
        saving and the display. ``slots``: micro-batch slots per update (processes × accumulation)."""
        lora = None if self.lora is None else asdict(self.lora.resolved(self.stage))
        return {"dataset": str(self.dataset.resolve()), "stage": self.stage, "model": self.model, "seed": self.seed,
                "micro_batch": self.micro_batch, "slots": slots, "recipe": _jsonable(asdict(self.schedule)),
                "mixed_precision": self.mixed_precision, "lora": _jsonable(lora),
                "gradient_checkpointing": self.gradient_checkpointing}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def check_recipe(recipe: Recipe) -> None:
    """Every number of a recipe usable (ArgumentError naming it otherwise)."""
    for name in ("drop_text", "drop_image", "drop_reference", "drop_audio", "warmup", "auto_warmup_rate",
                 "motion_mask_rate"):
        value = getattr(recipe, name)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ArgumentError(f"{name} must be in [0, 1], got {value}")
    for name in ("learning_rate", "eps", "grad_clip"):
        value = getattr(recipe, name)
        if not (math.isfinite(value) and value > 0):
            raise ArgumentError(f"{name} must be a positive number, got {value}")
    if not (math.isfinite(recipe.weight_decay) and recipe.weight_decay >= 0):
        raise ArgumentError(f"weight_decay must be >= 0, got {recipe.weight_decay}")
    if not all(math.isfinite(b) and 0 <= b < 1 for b in recipe.betas) or len(recipe.betas) != 2:
        raise ArgumentError(f"betas must be two numbers in [0, 1), got {recipe.betas}")
    if not 0 <= recipe.ema_max_decay < 1:
        raise ArgumentError(f"ema_max_decay must be in [0, 1), got {recipe.ema_max_decay}")
    if recipe.auto_warmup_steps < 0:
        raise ArgumentError(f"auto_warmup_steps must be >= 0, got {recipe.auto_warmup_steps}")


# -- the draws ----------------------------------------------------------------------------------------------------------

def draw_seed(seed: int, step: int, slot: int) -> int:
    """The seed of the generator of micro-batch slot ``slot`` of update ``step``: its dropout, noise, timestep
    and VAE sample depend on nothing else."""
    digest = hashlib.sha256(f"hallo3-train:{seed}:{step}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_indices(step: int, slot: int, slots: int, micro_batch: int) -> list[int]:
    """The dataset indices of slot ``slot`` of update ``step`` (1-based): consecutive, so that every update reads
    ``slots × micro_batch`` fresh samples (round robin over the videos, :class:`Hallo3Dataset`)."""
    first = ((step - 1) * slots + slot) * micro_batch
    return list(range(first, first + micro_batch))


# -- the networks -------------------------------------------------------------------------------------------------------

class TrainableNetworks(torch.nn.Module):
    """The main DiT and the reference network as one module, so that one engine object (DDP, FSDP, DeepSpeed)
    wraps both; ``forward(**inputs)`` is :func:`training_loss` of ``stage``."""

    def __init__(self, transformer, reference_net, stage: int):
        super().__init__()
        self.transformer, self.reference_net, self.stage = transformer, reference_net, stage

    def forward(self, **inputs) -> torch.Tensor:
        inputs.pop("stage", None)
        return training_loss(self.transformer, self.reference_net, stage=self.stage, **inputs)


def _require(module: str, extra: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{why} needs the {module} package: pip install 'hallo3-cli[{extra}]'") from None


def add_lora(networks: TrainableNetworks, spec: LoraSpec) -> None:
    """Adapters on ``spec``'s targets through diffusers' PEFT integration (``add_adapter``); only they train."""
    peft = _require("peft", "train", "--lora")
    networks.requires_grad_(False)
    for label, targets in (("transformer", spec.targets), ("reference_net", spec.reference_targets)):
        if not targets:
            continue
        model = getattr(networks, label)
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise UsageError(f"--lora-targets: the {label} has no module named {missing[0]!r}")
        model.add_adapter(peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(targets),
                                          init_lora_weights=True))
    for name, parameter in networks.named_parameters():
        parameter.requires_grad_("lora_" in name)


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model) if getattr(model, "peft_config", None) else {}


# -- the run --------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a run did: ``steps`` reached, ``updates`` applied and ``skipped`` (non-finite loss), the last update's
    mean ``loss`` (None if it was not finite), the exported folders, and whether it ``stopped`` early (``stop_at``)."""

    output: Path
    steps: int
    updates: int
    skipped: int
    loss: float | None
    exported: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    seconds: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["output"] = str(self.output)
        return json.dumps(data, indent=2, sort_keys=True)


class _Interrupt:
    """SIGINT (Ctrl-C) asks the loop to stop after the update under way (then save, then exit 130)."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this update (Ctrl-C again to quit without it)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _check_geometry(dataset, preset) -> None:
    ours = (preset.height, preset.width, preset.clip_length)
    theirs = (dataset.height, dataset.width, dataset.clip_length)
    if ours != theirs:
        raise InputError(f"was prepared for {theirs[1]}×{theirs[0]} clips of {theirs[2]} frames (model "
                         f"{dataset.model!r}); --model {preset.name} makes {ours[1]}×{ours[0]} clips of {ours[2]}",
                         dataset.root / "manifest.json")


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; returns its :class:`TrainResult` (also written to ``RUN/train.json``).
    Ctrl-C saves a checkpoint and raises KeyboardInterrupt."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    from hallo3_cli.fsutil import require_file
    from hallo3_cli.loading import load_network
    from hallo3_cli.presets import get_preset
    from hallo3_cli.training.dataset import Hallo3Dataset

    if config.validate_every is not None:  # checked now, not at the first validation hours later
        for path in (config.validation_portrait, config.validation_speech):
            require_file(path)
    began = time.perf_counter()
    # accelerate keeps its settings per process: a second run in this process may use another precision
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.distributed_type.name in {"FSDP", "DEEPSPEED", "MEGATRON_LM"}:
        # the trainer shards with torch's fully_shard itself (--engine fsdp2): accelerate enables its FSDP plugin
        # on GPUs only, so its path could not be the one tested on CPU (docs/training.md "Engines")
        raise UsageError(f"the accelerate config asks for {accelerator.distributed_type.name}, which hallo3 train "
                         "does not use: launch without it and pass --engine fsdp2 for sharded training "
                         "(docs/training.md)")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    sharded = config.engine == "fsdp2" and world > 1  # one process: nothing to shard, the same run unsharded
    slots = world * config.grad_accum
    run = config.output
    identity = config.identity(slots)
    if main:
        ckpt.claim_run(run, identity, resume=config.resume)
    accelerator.wait_for_everyone()
    if config.tensorboard and main:
        _require("tensorboard", "train", "TensorBoard logging (or pass --no-tensorboard)")

    preset = get_preset(config.model)
    recipe = config.schedule
    dataset = Hallo3Dataset(config.dataset, config.stage, seed=config.seed,
                            length=config.steps * slots * config.micro_batch, audio_drop_rate=recipe.drop_audio)
    _check_geometry(dataset, preset)

    # bf16: frozen weights in bf16, trained ones kept in float32 (the masters), computed under autocast (§10.6)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    device = accelerator.device
    torch.manual_seed(config.seed)  # LoRA's initial adapters: the same on every process
    transformer = load_network(preset, "transformer", "cpu", dtype)
    reference_net = load_network(preset, "reference", "cpu", dtype)
    vae = load_network(preset, "vae", device, dtype)
    networks = TrainableNetworks(transformer, reference_net, config.stage)
    if config.lora is not None:
        add_lora(networks, config.lora.resolved(config.stage))
    else:
        trainable_parameters(transformer, reference_net, config.stage)
    for _, parameter in networks.named_parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # per block, as the release checkpoints its main DiT (§10.6)
    networks.train()
    networks.to(device)
    if sharded:
        shard_networks(networks, device)
    # (after sharding: fully_shard replaces the parameters by DTensors holding this process's shard)
    named = [(name, p) for name, p in networks.named_parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(
        weight_decay_groups({"transformer": transformer, "reference_net": reference_net}, recipe.weight_decay),
        lr=recipe.learning_rate, betas=tuple(recipe.betas), eps=recipe.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    ema = {name: p.detach().float().clone() for name, p in named}  # sharded as its parameter under fsdp2

    start, updates, skipped = 0, 0, 0
    found = ckpt.checkpoints(run) if config.resume else []
    if found:
        step, path = found[-1]
        loaded = ckpt.load_checkpoint(path)
        names = [name for name, _ in named]
        if sorted(loaded["trainable"]) != sorted(names):
            raise InputError("holds other trainable parameters than this run's", path / ckpt.TRAINABLE)
        load_full_state(networks, named, ema, optimizer, loaded)
        scheduler.load_state_dict(loaded["state"]["scheduler"])
        start, updates, skipped = step, loaded["state"]["updates"], loaded["state"]["skipped"]
        if main:
            log.info("resuming %s after update %d", run, start)
    if main:
        ckpt.write_run(run, identity, _jsonable({**asdict(config), "recipe": asdict(recipe), "world_size": world}))

    if sharded:
        model = networks  # sharded in place; accelerate only places the tensors, casts and reduces
    else:
        model, optimizer = accelerator.prepare(networks, optimizer)
    writer = None
    if config.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / LOGS_DIR))
    meter = _Meter(config.progress and main, start, config.steps)
    last_loss = None
    step = start
    try:
        with _Interrupt() as interrupt:
            for step in range(start + 1, config.steps + 1):
                loss, finite = _update(config, accelerator, model, vae, dataset, step, rank, slots, recipe, sharded)
                flags = accelerator.reduce(torch.tensor([0.0 if finite else 1.0, float(interrupt.requested)],
                                                        device=device), "sum")
                lr = optimizer.param_groups[0]["lr"]  # this update's
                if flags[0] == 0:
                    # over DTensor gradients torch's clip reduces the shards' norms: the global norm (§10.6)
                    grad_norm = accelerator.clip_grad_norm_([p for _, p in named], recipe.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    updates += 1
                    decay = ema_decay_float32(updates, recipe)
                    with torch.no_grad():
                        for name, parameter in named:  # shadow = d·shadow + (1 − d)·new, float32 (§10.6)
                            ema[name].mul_(decay).add_(parameter.detach().float(), alpha=1 - decay)
                else:
                    grad_norm = None
                    skipped += 1
                    if main:
                        log.warning("update %d skipped: the loss is not finite on some process", step)
                optimizer.zero_grad(set_to_none=True)
                last_loss = float(loss) if bool(torch.isfinite(loss)) else None
                meter.update(step, last_loss, lr)
                if writer is not None:
                    writer.add_scalar("train/loss", float(loss), step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/skipped", skipped, step)
                    if grad_norm is not None:
                        writer.add_scalar("train/grad_norm", float(_full(grad_norm)), step)
                stop = flags[1] > 0 or step == config.stop_at
                if step % config.save_every == 0 or stop or step == config.steps:
                    _save(accelerator, run, step, networks, named, ema, optimizer, scheduler, updates, skipped,
                          config)
                if config.validate_every and step % config.validate_every == 0:
                    _validate(accelerator, config, preset, networks, vae, step, writer)
                if flags[1] > 0:
                    raise KeyboardInterrupt
                if stop:
                    break
    finally:
        meter.close()
        if writer is not None:
            writer.close()

    stopped = step < config.steps
    result = TrainResult(run, step, updates, skipped, last_loss, stopped=stopped)
    if not stopped:
        exported = export_run(run, config, preset, networks, named, ema, dtype, main=main)
        result.exported = exported if main else {}
    result.seconds = round(time.perf_counter() - began, 3)
    if main:
        ckpt.write_json(run / SUMMARY, json.loads(result.to_json()))
    accelerator.wait_for_everyone()
    return result


def _update(config, accelerator, model, vae, dataset, step, rank, slots, recipe,
            sharded) -> tuple[torch.Tensor, bool]:
    """The micro-batches of one update on this process: forward, backward (gradients accumulated, synchronised
    on the last); returns the mean loss of all processes' micro-batches and whether this process's were finite."""
    from torch.utils.data import default_collate

    from hallo3_cli.training.conditions import step_inputs

    losses, finite = [], True
    for k in range(config.grad_accum):
        slot = rank * config.grad_accum + k
        batch = default_collate([dataset[i] for i in sample_indices(step, slot, slots, config.micro_batch)])
        batch = {key: value.to(accelerator.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        generator = torch.Generator().manual_seed(draw_seed(config.seed, step, slot))
        with torch.no_grad():
            inputs = step_inputs(batch, vae, stage=config.stage, recipe=recipe, generator=generator, rank=slot,
                                 world_size=slots, micro_step=0, drops=True)
        synced = k == config.grad_accum - 1
        if sharded:  # FSDP2's no_sync: keep unsharded gradients until the last micro-batch reduce-scatters them
            model.set_requires_gradient_sync(synced)
        with (contextlib.nullcontext() if synced or sharded else accelerator.no_sync(model)), accelerator.autocast():
            loss = model(**inputs)
        finite = finite and bool(torch.isfinite(loss))
        accelerator.backward(loss / config.grad_accum)  # the gradient of the mean over the update's micro-batches
        losses.append(loss.detach().float())
    return accelerator.reduce(torch.stack(losses).mean(), "mean"), finite


def _save(accelerator, run, step, networks, named, ema, optimizer, scheduler, updates, skipped, config) -> None:
    """A checkpoint in the one format of every engine: full tensors by trainer name, gathered on all processes
    (a collective), written by the main process."""
    trainable, ema_full, optimizer_state = full_state(networks, named, ema, optimizer)
    if accelerator.is_main_process:
        state = {"updates": updates, "skipped": skipped, "scheduler": _jsonable(scheduler.state_dict()),
                 "data_position": step}
        ckpt.save_checkpoint(run, step, trainable=trainable, ema=ema_full, optimizer_state=optimizer_state,
                             state=state, keep=config.keep)
    accelerator.wait_for_everyone()


# -- sharding and full state dicts ------------------------------------------------------------------------------------

def shard_networks(networks: TrainableNetworks, device: torch.device) -> None:
    """FSDP2 over all processes: each transformer block of both DiTs is one unit (all-gathered for its forward and
    backward, its gradients reduce-scattered), the rest (embeddings, projections, norms) the root's. In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hallo3_cli.models.blocks import Hallo3Block

    import warnings

    # A block returns views (slices of its outputs); FSDP2 warns that an in-place op on one would skip its backward
    # all-gather. Nothing downstream modifies them in place (their gradients equal the unsharded run's in
    # tests/test_train.py, the reference network's blocks without checkpointing), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPHallo3Block\) returned a view",
                            category=UserWarning)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for module in list(networks.modules()):
        if isinstance(module, Hallo3Block):
            fully_shard(module, mesh=mesh)
    fully_shard(networks, mesh=mesh)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(networks, named, ema, optimizer) -> tuple[dict, dict, dict]:
    """The trained parameters, their EMA and the optimizer's state as full CPU tensors keyed by trainer name (the
    optimizer's by parameter name, torch.distributed.checkpoint's full format), whatever the engine. Every process
    must call it; under FSDP2 only the main process gets them (the others: empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = {name for name, _ in named}
    options = _state_options(cpu_offload=True, ignore_frozen_params=True)
    trainable = {k: v for k, v in get_model_state_dict(networks, options=options).items() if k in names}
    ema_full = {name: _full(tensor).cpu() for name, tensor in ema.items()}
    if optimizer.state:
        optimizer_state = get_optimizer_state_dict(networks, optimizer, options=options)
    else:  # no update yet: torch's getter would create the state with a zero-gradient step, changing the run
        ids = {id(p): name for name, p in named}
        optimizer_state = {"state": {}, "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [ids[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups]}
    return trainable, ema_full, optimizer_state


def load_full_state(networks, named, ema, optimizer, loaded: dict) -> None:
    """A checkpoint's full tensors (:func:`full_state`'s) into the networks, the EMA and the optimizer, each
    process taking its shard under FSDP2."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    set_model_state_dict(networks, loaded["trainable"], options=_state_options(strict=False))
    with torch.no_grad():
        for name, tensor in ema.items():
            full = loaded["ema"][name].to(tensor.device)
            if isinstance(tensor, DTensor):  # every process read the file: its own slice, no communication
                full = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.copy_(full)
    # not strict: parameters that never had a gradient (the reference network's last block) have no state
    if loaded["optimizer"]["state"]:
        set_optimizer_state_dict(networks, optimizer, loaded["optimizer"], options=_state_options(strict=False))
        # torch initialises every state with a zero-gradient step first: stateless in the run stays stateless
        for name, parameter in named:
            if name not in loaded["optimizer"]["state"]:
                optimizer.state.pop(parameter, None)


def _validate(accelerator, config, preset, networks, vae, step, writer) -> None:
    """A render of the held-out portrait and speech with the networks as they are now, scored as ``hallo3 eval``
    scores (:func:`~hallo3_cli.training.validation.validate`; main process, the others wait)."""
    if accelerator.is_main_process:
        from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline
        from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler
        from hallo3_cli.training.validation import log_scores, validate

        pipe = Hallo3Pipeline(transformer=networks.transformer, reference_net=networks.reference_net, vae=vae,
                              scheduler=Hallo3DPMSolverSDEScheduler(), **preset.pipeline_config())
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            # one clip of speech, at least 1 s (hallo3's shortest speech is 0.5 s; short test clips are less)
            seconds = max(1.0, (preset.clip_length - preset.motion_frames) / preset.fps)
            result = validate(pipe, config.output, step, portrait=config.validation_portrait,
                              speech=config.validation_speech, model=preset, seed=config.seed, max_seconds=seconds)
        if result.get("not_scored"):
            log.info("validation render at step %d: %s (not scored: %s)", step, result["video"], result["not_scored"])
        if writer is not None:
            log_scores(writer, result)
    accelerator.wait_for_everyone()


class _Meter:
    """Progress on stderr: a tqdm bar (step, loss, lr, it/s, ETA) on a terminal, a line every 30 s in logs."""

    def __init__(self, enabled: bool, start: int, total: int):
        import sys

        from hallo3_cli import progress

        self.enabled, self.start, self.total = enabled, start, total
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = progress.bar(self.interactive, total, "train", unit="step") if self.interactive else None
        if self.bar is not None:
            self.bar.update(start)
        self.began = self.last = time.perf_counter()

    def update(self, step: int, loss: float | None, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            self.bar.update(1)
            return
        from hallo3_cli.progress import LOG_EVERY

        now = time.perf_counter()
        if self.enabled and (now - self.last >= LOG_EVERY or step == self.total):
            self.last = now
            rate = (step - self.start) / max(now - self.began, 1e-9)
            eta = (self.total - step) / rate if rate else float("inf")
            log.info("step %d/%d  loss %s  lr %.3g  %.2f it/s  ETA %.0f s", step, self.total,
                     "nan" if loss is None else f"{loss:.4g}", lr, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- exporting ---------------------------------------------------------------------------------------------------------

def export_run(run: Path, config: TrainConfig, preset, networks: TrainableNetworks, named, ema, dtype, *,
               main: bool = True) -> dict:
    """The finished run's results: ``RUN/model`` (raw weights) and ``RUN/model-ema`` as model folders, or for LoRA
    ``RUN/lora`` and ``RUN/lora-ema`` (adapter files ``hallo3 render --lora`` reads). Every process calls it (the
    full weights are gathered from the shards under FSDP2); the ``main`` one writes."""
    if config.lora is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        raw = get_model_state_dict(networks, options=_state_options(cpu_offload=True))
        ema_full = {name: _full(tensor).cpu() for name, tensor in ema.items()}
        if not main:
            return {}
        out = {}
        for folder, weights in ((MODEL_DIR, {}), (EMA_MODEL_DIR, ema_full)):
            export_model(run / folder, preset, networks.transformer, networks.reference_net, dtype,
                         state={**raw, **weights})
            out[folder] = str(run / folder)
        return out
    if not main:  # LoRA runs on DDP: the main process holds every adapter
        return {}
    raw = {name: p.detach().clone() for name, p in named}
    out = {}
    try:
        for folder, weights in ((LORA_DIR, raw), (EMA_LORA_DIR, ema)):
            with torch.no_grad():
                for name, parameter in named:
                    parameter.copy_(weights[name])
            export_lora(run / folder, networks)
            out[folder] = str(run / folder)
    finally:
        with torch.no_grad():
            for name, parameter in named:
                parameter.copy_(raw[name])
    return out


def export_lora(folder: Path, networks: TrainableNetworks) -> None:
    """``pytorch_lora_weights.safetensors`` (the main DiT's adapters, diffusers' format with its adapter
    metadata) and, when the reference network was adapted, ``reference_lora_weights.safetensors`` (keys
    ``reference_net.*``): what :class:`hallo3_cli.loading.LoraWeights` reads."""
    from hallo3_cli.loading import LORA_FILE, REFERENCE_LORA_FILE
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    with ckpt.atomic_folder(folder) as tmp:
        for label, file in (("transformer", LORA_FILE), ("reference_net", REFERENCE_LORA_FILE)):
            model = getattr(networks, label)
            state = lora_state(model)
            if not state:
                continue
            metadata = model.peft_config["default"].to_dict()
            metadata = {f"{label}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
            Hallo3Pipeline.write_lora_layers(
                state_dict={f"{label}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()},
                save_directory=str(tmp), is_main_process=True, weight_name=file, save_function=None,
                safe_serialization=True, lora_adapter_metadata=metadata)


def export_model(folder: Path, preset, transformer, reference_net, dtype, state: dict | None = None) -> None:
    """A model folder (``model_index.json`` + one folder per component) that ``Hallo3Pipeline.from_pretrained`` and
    ``--model`` load: the two DiTs as trained (in ``dtype``), the frozen components hard-linked (else copied) from
    the base model's folders, or for a random preset written from its seeded weights. ``state``: the two DiTs'
    weights as one state dict (keys ``transformer.*``, ``reference_net.*``; default: the modules' own)."""
    import os
    import shutil

    from safetensors.torch import save_file

    from hallo3_cli.components import COMPONENTS, FACE_FOLDER

    trained = {"transformer": transformer, "reference_net": reference_net}
    with ckpt.atomic_folder(folder) as tmp:
        if preset.is_random:
            from hallo3_cli.loading import PipelineLoader
            from hallo3_cli.runtime import Runtime

            loader = PipelineLoader(preset, Runtime(device="cpu", dtype="float32", offload="none"))
            others = [c.name for c in COMPONENTS if c.name not in trained and c.name != "scheduler"]
            pipe = loader.need(*others)
            pipe.register_modules(scheduler=loader.load("scheduler"))
            pipe.save_pretrained(str(tmp))  # the two DiTs are written below
            index = json.loads((tmp / "model_index.json").read_text())
            faces = preset.table.get("face_models")
            faces = Path(faces) if faces else None
        else:
            from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

            for entry in COMPONENTS:
                if entry.name in trained or entry.name == "scheduler":
                    continue
                source = preset.home / entry.name if preset.is_folder else preset.require(entry.folder)
                _link_tree(Path(source), tmp / entry.name, os, shutil)
            Hallo3DPMSolverSDEScheduler().save_config(str(tmp / "scheduler"))
            if preset.is_folder:
                index = json.loads((preset.home / "model_index.json").read_text())
            else:
                import diffusers

                index = {"_class_name": "Hallo3Pipeline", "_diffusers_version": diffusers.__version__,
                         **{c.name: [c.library, c.class_name] for c in COMPONENTS}, **preset.pipeline_config()}
            faces = preset.home / FACE_FOLDER if preset.is_folder else (
                preset.require(FACE_FOLDER) if preset.is_installed(FACE_FOLDER) else None)
        if faces is not None and Path(faces).is_dir():
            _link_tree(Path(faces), tmp / FACE_FOLDER, os, shutil)
        for name, model in trained.items():
            entry = next(c for c in COMPONENTS if c.name == name)
            index[name] = [entry.library, entry.class_name]
            shutil.rmtree(tmp / name, ignore_errors=True)
            (tmp / name).mkdir()
            model.save_config(str(tmp / name))
            weights = model.state_dict() if state is None else {
                key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
            weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
            save_file(weights, str(tmp / name / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _link_tree(source: Path, dest: Path, os, shutil) -> None:
    """Hard links of every file under ``source`` (copies across file systems)."""
    for file in sorted(source.rglob("*")):
        target = dest / file.relative_to(source)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file.resolve(), target)
        except OSError:
            shutil.copy2(file, target)

