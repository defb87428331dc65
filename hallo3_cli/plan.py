"""``hallo3 plan``: predicted peak device memory, host memory and FLOPs of a render (issue 6).

Nothing here is a hand-typed table. Every network is built from its real class at the preset's
configuration twice, without memory: on the ``meta`` device for its weights (bytes per module, after
diffusers' layerwise casting for ``--weights-dtype fp8``), and on fake tensors (``FakeTensorMode``) to
run the device work of each render step the way :class:`~hallo3_cli.render.Renderer` and
:class:`~hallo3_cli.reference.ReferenceEncoder` do it (same calls, shapes and dtypes, mirrored in
``_RenderSteps``). While they run, a dispatch mode follows the lifetime of every tensor storage they
create (peak of live bytes, also per executing module) and counts FLOPs with
``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention). Fake tensors do no
compute: the production model traces in seconds. Repeated blocks (DiT layers,
VAE encoder/decoder calls on equal shapes) are traced once and replayed, which is exact because
equal code on equal shapes allocates the same way (checked: a block whose outputs are not all
fresh, or that leaves anything else alive, is always traced for real).

A render has three phases, in order: ``embed-audio`` (wav2vec2), ``encode-ref`` (VAE encode of the
reference, T5 prompt encoding, reference DiT; T5 is released before the reference DiT loads, the
reference DiT after its pass) and ``clip`` (per clip: VAE encode of 3 frames, audio projection,
``steps`` DiT forwards at batch 2 for CFG, VAE decode of 13 latent frames). The memory modes
(``render.Runtime``) are applied to the traced timeline:

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
import functools
import json
import math
import re
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

from hallo3_cli.audio import encode_span
from hallo3_cli.errors import Hallo3Error
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.render import OFFLOAD_MODES, default_offload
from hallo3_cli.render import WEIGHTS_DTYPES as _STORAGE

WEIGHTS_DTYPES = tuple(_STORAGE)
DEVICE_KINDS = ("cuda", "cpu")
_COMPUTE = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

#: The T5-XXL v1.1 encoder of the release (``THUDM/CogVideoX-5b-I2V`` ``text_encoder/config.json``).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
#: Longest span the wav2vec2 encoder attends over at once (``audio.WINDOW_SECONDS``; longer inputs are windowed).
AUDIO_SECONDS = 30.0
#: Networks that ``Renderer.place`` treats as block networks (layerwise casting, group offloading).
BLOCK_NETWORKS = ("transformer", "reference", "text_encoder")
#: ``block_modules`` given to diffusers' group offloading per network (none: only direct ModuleList children
#: are blocks, so T5, whose blocks sit in ``encoder.block``, is offloaded as one group).
GROUP_BLOCK_MODULES: dict[str, tuple[str, ...]] = {"transformer": (), "reference": (), "text_encoder": ("encoder",)}

_GiB = 1 << 30


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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        """One JSON object; ``peak_device_bytes``, ``peak_host_bytes`` and ``flops_per_clip`` at top level."""
        return json.dumps(self.to_dict(), indent=indent)

    def step(self, phase: str, step: str) -> StepPlan:
        return next(s for s in self.breakdown if s.phase == phase and s.step == step)


# ---------------------------------------------------------------------------------------------
# tracing on fake tensors


class _Tracer(TorchDispatchMode):
    """Follows the storages created while active: live bytes, their peak per module interval, and FLOPs.

    An interval is the stretch between two module boundaries (a forward starting or ending); each
    records the stack of executing module names and the peak of live bytes within it, which is what
    the offload modes need (what is resident depends on which module runs).
    """

    def __init__(self, granularity: int, cpu_workspaces: bool = False):
        super().__init__()
        self.granularity = granularity
        self.cpu_workspaces = cpu_workspaces
        self.live = 0
        self.flops = 0
        self.stack: list[str] = []
        self.intervals: list[tuple[tuple[str, ...], int]] = []
        self._interval_peak = 0
        self._storages: dict[int, tuple[weakref.ref, int]] = {}
        self._serial = 0

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self._storages.pop(key, None) is not None:
            self.live -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = -(-storage.nbytes() // self.granularity) * self.granularity
        self._serial += 1
        self._storages[key] = (weakref.ref(storage, functools.partial(self._free, key, nbytes)), self._serial)
        self.live += nbytes
        self._interval_peak = max(self._interval_peak, self.live)

    def serial_of(self, tensor: torch.Tensor) -> int:
        entry = self._storages.get(tensor.untyped_storage()._cdata)
        return entry[1] if entry is not None else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views and in-place ops allocate nothing
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._track(leaf)
        if self.cpu_workspaces and func is torch.ops.aten.convolution.default:
            self._interval_peak = max(self._interval_peak, self.live + _cpu_conv_workspace(*args, out=out))
        return out

    def boundary(self) -> None:
        self.intervals.append((tuple(self.stack), self._interval_peak))
        self._interval_peak = self.live

    def enter(self, name: str) -> None:
        self.boundary()
        self.stack.append(name)

    def leave(self, name: str) -> None:
        self.boundary()
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    @property
    def peak(self) -> int:
        return max([self._interval_peak, *(peak for _, peak in self.intervals)])


def _flop_formulas() -> dict:
    from torch.utils.flop_counter import flop_registry, sdpa_flop

    formulas = dict(flop_registry)
    # torch's registry lacks the CPU flash kernel (the one fake CPU tensors dispatch to); sdpa_flop
    # is the registered (already shape-wrapped) formula of the other fused SDPA kernels
    formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
    return formulas


_FLOP_FORMULAS = _flop_formulas()


def _cpu_conv_workspace(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, out) -> int:
    """Scratch memory a CPU convolution holds besides its output (measured on this torch):
    oneDNN reorders its input (and weights) into a blocked layout; the slow 3D kernel builds an
    im2col matrix unless the kernel is 1×1×1 with unit stride and no padding."""
    backend = torch._C._select_conv_backend(
        input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, None
    )
    name = backend.name
    if name.startswith("Mkldnn"):
        return input.nbytes + weight.nbytes
    if name.startswith("Slow"):
        kernel = tuple(weight.shape[2:])
        if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and all(p == 0 for p in padding):
            return 0
        columns = input.shape[0] * (input.shape[1] // groups) * math.prod(kernel) * math.prod(out.shape[2:])
        return columns * input.element_size()
    return 0


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Input:
    index: int


@dataclass
class _Recording:
    intervals: list[tuple[tuple[str, ...], int]]
    flops: int
    outputs: object  # pytree of _Spec (fresh tensor) / _Input (an input passed through) / other leaves


_UNSAFE = object()


class _Replayer:
    """Traces each distinct call of a repeated module once, then replays its allocations and FLOPs."""

    def __init__(self, tracer: _Tracer):
        self.tracer = tracer
        self.recordings: dict = {}

    def wrap(self, module: torch.nn.Module, name: str):
        original = module.forward
        signature = (type(module).__name__, tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))

        def forward(*args, **kwargs):
            key = (signature, _call_key((args, kwargs)))
            recording = self.recordings.get(key)
            if recording is _UNSAFE:
                return original(*args, **kwargs)
            if recording is None:
                out, self.recordings[key] = self._record(name, original, args, kwargs)
                return out
            return self._replay(name, recording, args, kwargs)

        module.forward = forward
        return lambda: module.__dict__.pop("forward", None)

    def _record(self, name, original, args, kwargs):
        tracer = self.tracer
        live, flops, first, serial = tracer.live, tracer.flops, len(tracer.intervals), tracer._serial
        depth = len(tracer.stack)
        out = original(*args, **kwargs)
        inputs = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        fresh, keys = 0, set()

        def template(leaf):
            nonlocal fresh
            if not isinstance(leaf, torch.Tensor):
                return leaf
            if tracer.serial_of(leaf) > serial:
                key = leaf.untyped_storage()._cdata
                if key in keys or leaf.storage_offset() != 0:
                    raise _NotReplayable
                keys.add(key)
                fresh += -(-leaf.untyped_storage().nbytes() // tracer.granularity) * tracer.granularity
                return _Spec(tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype)
            for index, tensor in enumerate(inputs):
                if leaf is tensor:
                    return _Input(index)
            raise _NotReplayable

        try:
            outputs = tree_map(template, out)
        except _NotReplayable:
            return out, _UNSAFE
        if tracer.live - live != fresh:  # the call left something else alive (a cache): not replayable
            return out, _UNSAFE
        prefix = name + "."
        current = (tuple(tracer.stack), tracer._interval_peak)  # still open: the leave hook closes it
        intervals = [
            (tuple(s[len(prefix):] if s.startswith(prefix) else "\0" + s for s in stack[depth:]), peak - live)
            for stack, peak in [*tracer.intervals[first:], current]
        ]
        return out, _Recording(intervals, tracer.flops - flops, outputs)

    def _replay(self, name, recording: _Recording, args, kwargs):
        tracer = self.tracer
        inputs = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        base, live = tuple(tracer.stack), tracer.live
        for relative, peak in recording.intervals[:-1]:
            stack = base + tuple(s[1:] if s.startswith("\0") else f"{name}.{s}" for s in relative)
            tracer.intervals.append((stack, live + peak))

        def build(leaf):
            if isinstance(leaf, _Spec):
                return torch.empty_strided(leaf.shape, leaf.stride, dtype=leaf.dtype)
            if isinstance(leaf, _Input):
                return inputs[leaf.index]
            return leaf

        out = tree_map(build, recording.outputs)
        tracer.flops += recording.flops
        tracer._interval_peak = max(tracer.live, live + recording.intervals[-1][1])
        return out


class _NotReplayable(Exception):
    pass


def _call_key(tree) -> tuple:
    leaves, spec = tree_flatten(tree)
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype)):
            key.append(leaf)
        else:
            key.append(type(leaf).__name__)
    return (str(spec), tuple(key))


@dataclass(frozen=True)
class Trace:
    """One traced step: the live tensor bytes per module interval (inputs included), and FLOPs."""

    network: str
    input_bytes: int
    peak_bytes: int
    flops: int
    intervals: tuple[tuple[tuple[str, ...], int], ...]

    @property
    def activation_bytes(self) -> int:
        """Peak above the step's inputs: what running the step adds."""
        return self.peak_bytes - self.input_bytes


@contextlib.contextmanager
def _session(networks: dict[str, torch.nn.Module], granularity: int, replay: tuple[str, ...] = (),
             cpu_workspaces: bool = False):
    """Trace calls of ``networks``: module boundaries are recorded, modules named in ``replay``
    (``network:dotted.glob``) are traced once per distinct call and replayed."""
    tracer = _Tracer(granularity, cpu_workspaces)
    replayer = _Replayer(tracer)
    handles, restores = [], []
    for label, network in networks.items():
        patterns = [re.compile(p.split(":", 1)[1].replace(".", r"\.").replace("*", r"[^.]+") + "$")
                    for p in replay if p.split(":", 1)[0] == label]
        for name, module in network.named_modules():
            handles.append(module.register_forward_pre_hook(functools.partial(_enter, tracer, name)))
            handles.append(module.register_forward_hook(functools.partial(_leave, tracer, name)))
            if name and any(p.match(name) for p in patterns):
                restores.append(replayer.wrap(module, name))
    try:
        with tracer:
            yield tracer
    finally:
        for handle in handles:
            handle.remove()
        for restore in restores:
            restore()


def _enter(tracer, name, module, args):
    tracer.enter(name)


def _leave(tracer, name, module, args, output):
    tracer.leave(name)


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """SDPA as a fused kernel (output + log-sum-exp, no score matrix), as CUDA runs these shapes.

    Fake tensors on a CPU-only build cannot ask a GPU which kernel it would use; torch's CPU choice
    is the fused one too for these calls, but this makes the CUDA prediction independent of it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value = args[:3]
            if kwargs.get("attn_mask") is None and len(args) <= 3 and not kwargs.get("enable_gqa"):
                scale = kwargs.get("scale")
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query, key, value, 0.0, bool(kwargs.get("is_causal", False)), scale=scale
                )[0]
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the networks of a preset


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of every network of a preset, and the render geometry."""

    transformer: dict
    reference: dict
    vae: dict
    text_encoder: dict
    wav2vec: dict
    height: int
    width: int
    clip_length: int
    text_length: int
    vae_scale: float
    steps: int

    @classmethod
    def of(cls, preset: Preset) -> Architecture:
        if preset.is_random:
            from hallo3_cli.loading import transformer_config

            widths = preset.config("vae")
            blocks = len(widths["block_out_channels"])
            vae = {
                "block_out_channels": tuple(widths["block_out_channels"]),
                "down_block_types": ("CogVideoXDownBlock3D",) * blocks,
                "up_block_types": ("CogVideoXUpBlock3D",) * blocks,
                "layers_per_block": widths["layers_per_block"],
                "norm_num_groups": widths["norm_num_groups"],
                "latent_channels": 16,
                "sample_height": preset.height,
                "sample_width": preset.width,
            }
            text = dict(preset.config("text_encoder"), feed_forward_proj="gated-gelu")
            transformer = transformer_config(preset, main=True)
            reference = transformer_config(preset, main=False)
            wav2vec = preset.config("wav2vec")
        else:
            # The release: the classes' defaults are its configuration (tests check them against the
            # official checkpoint manifest), diffusers' CogVideoX VAE defaults, T5-XXL, wav2vec2-base.
            transformer, reference, vae, wav2vec = {}, {}, {}, {}
            text = dict(T5_XXL)
        return cls(transformer, reference, vae, text, wav2vec, preset.height, preset.width, preset.clip_length,
                   preset.text_length, preset.vae_scale, preset.steps)

    def key(self) -> str:
        """What the traces depend on (everything but the number of steps), as a cache key."""
        fields = asdict(self)
        del fields["steps"]
        return json.dumps(fields, sort_keys=True, default=str)


def _build(network: str, config: dict):
    if network == "transformer":
        from hallo3_cli.models import Hallo3Transformer3DModel

        return Hallo3Transformer3DModel(**config)
    if network == "reference":
        from hallo3_cli.models import Hallo3ReferenceNet

        return Hallo3ReferenceNet(**config)
    if network == "vae":
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX(**config)
    if network == "text_encoder":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**config, is_encoder_decoder=False, use_cache=False))
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(**config))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _network_dtype(network: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if network == "wav2vec" else dtype  # audio.load_audio_encoder: always float32


def _quiet():
    """diffusers/transformers warn about casting and unused config keys while building: not for the user."""
    import logging

    stack = contextlib.ExitStack()
    for name in ("diffusers", "transformers"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
    return stack


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
    with _quiet(), torch.device("meta"):
        module = _build_on(network, config, dtype)
    compute_total = _tensor_bytes(module)
    castable = network in BLOCK_NETWORKS and hasattr(module, "enable_layerwise_casting")
    if storage is not None and storage != dtype and castable:
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)  # what Renderer.place does
    direct = {name: sum(p.nbytes for p in m.parameters(recurse=False)) for name, m in module.named_modules()}
    cast_extra = {
        name: sum(p.numel() * (dtype.itemsize - p.dtype.itemsize) for p in m.parameters(recurse=False))
        for name, m in module.named_modules()
        if any(p.dtype == storage for p in m.parameters(recurse=False)) and storage != dtype
    }
    blocks, unmatched = _group_layout(module, GROUP_BLOCK_MODULES.get(network, ()))
    block_tensors = {id(t): t for name, _ in blocks for t in _tensors(module.get_submodule(name))}
    pinned = sum(_pow2(t.nbytes) for t in block_tensors.values())
    return _Weights(
        total=_tensor_bytes(module),
        compute_total=compute_total,
        direct=direct,
        buffers=sum(b.nbytes for b in module.buffers()),
        cast_extra=cast_extra,
        unmatched=unmatched,
        blocks=tuple(blocks),
        pinned=pinned,
    )


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in _tensors(module))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _group_layout(module: torch.nn.Module, block_modules: tuple[str, ...], prefix: str = ""):
    """diffusers' block-level grouping (one block per group): ModuleList/Sequential children are
    blocks, children named in ``block_modules`` are grouped recursively, the rest is one group."""
    blocks: list[tuple[str, int]] = []
    in_blocks: set[int] = set()
    for name, child in module.named_children():
        if name in block_modules:
            sub, _ = _group_layout(child, block_modules, f"{prefix}{name}.")
            blocks += sub
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += [(f"{prefix}{name}.{i}", _tensor_bytes(block)) for i, block in enumerate(child)]
    for name, _ in blocks:
        in_blocks.update(id(t) for t in _tensors(module.get_submodule(name[len(prefix):])))
    unmatched = sum(t.nbytes for t in _tensors(module) if id(t) not in in_blocks)
    return blocks, unmatched


# ---------------------------------------------------------------------------------------------
# the steps of a render, as the Renderer runs them


_REPLAY = (
    "transformer:transformer_blocks.*",
    "reference:transformer_blocks.*",
    "text_encoder:encoder.block.*",
    "wav2vec:encoder.layers.*",
    "vae:encoder",
    "vae:decoder",
)


@functools.lru_cache(maxsize=16)
def _traces(architecture_key: str, dtype: torch.dtype, height: int, width: int, vae_tiling: bool,
            device_kind: str, names: tuple[str, ...] | None = None, folded_cross_attention: bool = True) -> dict[str, Trace]:
    """Trace the steps of a render (all, or ``names``) at ``height``×``width`` on fake tensors.

    ``folded_cross_attention=False`` traces the SDPA path that the face/audio cross-attentions take
    when their weights are not plain device tensors at call time (see :func:`_folds_cross_attention`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    arch = json.loads(architecture_key)
    granularity = 512 if device_kind == "cuda" else 64
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    selected = [(name, network, run) for name, network, run in _RenderSteps.STEPS if names is None or name in names]
    needed = {network for _, network, _ in selected} | {"transformer"}  # the render context is shaped by the DiT
    with _quiet(), fake:
        nets = {n: _build_on(n, arch[n], _network_dtype(n, dtype)) for n in _NETWORKS if n in needed}
    if vae_tiling and "vae" in nets:
        nets["vae"].enable_tiling()
    if not folded_cross_attention:
        from hallo3_cli.models.attention_processor import Hallo3CrossAttnProcessor

        for block in nets["transformer"].transformer_blocks:
            block.attn_face.set_processor(Hallo3CrossAttnProcessor())
            block.attn_audio.set_processor(Hallo3CrossAttnProcessor())
    steps = _RenderSteps(nets, arch, dtype, height, width, granularity)
    sdpa = _FlashAttention() if device_kind == "cuda" else contextlib.nullcontext()
    traces = {}
    with fake, torch.no_grad(), sdpa, _quiet():
        for name, network, run in selected:
            run = getattr(steps, run)
            with _session({network: nets[network]}, granularity, _REPLAY, cpu_workspaces=device_kind == "cpu") as tracer:
                inputs, outputs = run()
            del outputs
            traces[name] = Trace(network, inputs, tracer.peak, tracer.flops, tuple(tracer.intervals))
    return traces


def _build_on(network: str, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Build in ``dtype`` under whatever device/fake context is active (``.to(dtype)`` cannot swap
    fake tensors), without running weight initialisers (values are never read)."""
    with _default_dtype(dtype), _no_init():
        return _build(network, config).eval().requires_grad_(False)


@contextlib.contextmanager
def _no_init():
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for name in names:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


class _RenderSteps:
    """The device work of each render step, written as render.py / reference.py / audio.py do it.

    Each step creates its device inputs (including what persists on the device across the clip loop:
    the render context and the previous clip's frames), runs, and returns ``(bytes of those inputs,
    its outputs)``; the caller holds the outputs, as the Renderer does.
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

    def __init__(self, nets, arch, dtype, height, width, granularity):
        self.nets, self.arch, self.dtype = nets, arch, dtype
        self.height, self.width = height, width
        self.granularity = granularity
        self.latent_frames = (arch["clip_length"] - 1) // 4 + 1
        self.h, self.w = height // 8, width // 8

    def _bytes(self, *tensors) -> int:
        g = self.granularity
        leaves = [t for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage()._cdata: t.untyped_storage() for t in leaves}
        return sum(-(-s.nbytes() // g) * g for s in storages.values())

    # embed-audio ---------------------------------------------------------------------------
    def wav2vec(self):
        model = self.nets["wav2vec"]
        samples = int(AUDIO_SECONDS * 16000)
        frames = int(AUDIO_SECONDS * 25)
        x = torch.zeros(samples)
        conv = model.feature_extractor(x[None])[0].transpose(0, 1)
        conv = torch.nn.functional.interpolate(conv.T[None], size=frames, mode="linear", align_corners=True)[0].T
        hidden, _ = model.feature_projection(conv[None])
        del conv
        return self._bytes(x), encode_span(model.encoder, hidden)

    # encode-ref ----------------------------------------------------------------------------
    def reference_latent(self):
        vae = self.nets["vae"]
        framed = torch.zeros(1, 3, 1, self.height, self.width, dtype=self.dtype)
        posterior = vae.encode(framed).latent_dist
        latent = posterior.sample(generator=torch.Generator().manual_seed(0)) * self.arch["vae_scale"]
        return self._bytes(framed), latent.permute(0, 2, 1, 3, 4)

    def text_encoder(self):
        ids = torch.zeros(1, self.arch["text_length"], dtype=torch.long)
        embeds = self.nets["text_encoder"](ids)[0][0].to(self.dtype)
        return self._bytes(ids), embeds

    def reference(self):
        width = self.nets["reference"].config.text_embed_dim
        ref_latent = torch.zeros(1, 1, 16, self.h, self.w, dtype=self.dtype)
        prompt = torch.zeros(self.arch["text_length"], width, dtype=self.dtype)
        uncond = torch.zeros(1, *prompt.shape, dtype=self.dtype)
        entries = self.nets["reference"](hidden_states=ref_latent, encoder_hidden_states=uncond)
        bank = torch.stack([entry[0] for entry in entries])
        return self._bytes(ref_latent, prompt, uncond), bank

    # clip ----------------------------------------------------------------------------------
    def _context(self):
        """What ``Renderer.context`` keeps on the device for the whole clip loop, and the previous
        clip's decoded frames (still referenced while the next clip renders)."""
        config = self.nets["transformer"].config
        text = torch.zeros(2, self.arch["text_length"], config.text_embed_dim, dtype=self.dtype)
        face = torch.zeros(2, config.face_tokens, config.face_cross_attention_dim, dtype=self.dtype)
        audio = (self.latent_frames, config.audio_context_tokens, config.audio_cross_attention_dim)
        uncond_audio = torch.zeros(1, *audio, dtype=self.dtype)
        bank_entry = (1, self.h * self.w // config.patch_size**2, config.num_attention_heads * config.attention_head_dim)
        bank = [torch.zeros(bank_entry, dtype=self.dtype) for _ in self.nets["transformer"].transformer_blocks]
        frames = torch.zeros(self.arch["clip_length"], 3, self.height, self.width)
        return {"text": text, "face": face, "uncond_audio": uncond_audio, "bank": bank, "frames": frames}

    def condition(self):
        context = self._context()
        vae = self.nets["vae"]
        frames = torch.zeros(3, 3, self.height, self.width, dtype=self.dtype)
        posterior = vae.encode(frames.permute(1, 0, 2, 3)[None]).latent_dist
        latent = posterior.sample(generator=torch.Generator().manual_seed(0)) * self.arch["vae_scale"]
        latent = latent.permute(0, 2, 1, 3, 4)
        pad = torch.zeros(1, self.latent_frames - 1, *latent.shape[2:], dtype=latent.dtype)
        condition = torch.cat([latent, pad], dim=1)
        return self._bytes(context, frames), (context, condition)

    def project_audio(self):
        context = self._context()
        model = self.nets["transformer"]
        config = model.config
        window = (config.audio_window, config.audio_layers, config.audio_channels)
        audio = torch.zeros(1, self.arch["clip_length"], *window, dtype=self.dtype)
        tokens = torch.cat([context["uncond_audio"], model.project_audio(audio)])
        return self._bytes(context, audio), (context, tokens)

    def denoise(self):
        context = self._context()
        model = self.nets["transformer"]
        condition = torch.zeros(1, self.latent_frames, 16, self.h, self.w, dtype=self.dtype)
        tokens = torch.zeros(2, *context["uncond_audio"].shape[1:], dtype=self.dtype)  # projected once per clip
        cond = torch.cat([condition, condition])
        inputs = self._bytes(context, condition, tokens, cond)
        pair = torch.zeros(2, self.latent_frames, 16, self.h, self.w, dtype=self.dtype)  # x_t pair, moved from the host
        v = model(
            hidden_states=torch.cat([pair, cond], dim=2),
            encoder_hidden_states=context["text"],
            timestep=torch.tensor([999.0, 999.0]),
            audio_tokens=tokens,
            face_tokens=context["face"],
            ref_states=context["bank"],
            return_dict=False,
        )[0].float()
        return inputs, (context, cond, v)

    def decode(self):
        context = self._context()
        vae = self.nets["vae"]
        latents = torch.zeros(1, self.latent_frames, 16, self.h, self.w, dtype=self.dtype)
        inputs = self._bytes(context, latents)
        z = (latents / self.arch["vae_scale"]).permute(0, 2, 1, 3, 4)
        video = vae.decode(z).sample[0].permute(1, 0, 2, 3).float()
        frames = ((video + 1) / 2).clamp(0, 1) * 2 - 1
        return inputs, (context, frames)


# ---------------------------------------------------------------------------------------------
# applying a memory mode


#: (phase, step, network, the other networks loaded meanwhile, how often it runs); "load …" steps
#: place a network (Renderer loads each on first use; wav2vec2 is freed after its phase, T5 before the
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
_NETWORKS = ("wav2vec", "vae", "text_encoder", "reference", "transformer")
_NAMES = {"wav2vec": "wav2vec2", "vae": "VAE", "text_encoder": "T5", "reference": "reference DiT", "transformer": "DiT"}


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
        parts.append(f"{_NAMES[network]} (executing modules + buffers)")
    elif mode._grouped(network):
        names = [name for name, _ in w.blocks]
        inside = any(s in names for s in stack)
        blocks = ("2 blocks + " if mode.prefetch else "1 block + ") if inside else ""
        parts.append(f"{_NAMES[network]} ({blocks}non-block modules)")
    else:
        parts.append(_NAMES[network])
    parts += [_idle_name(mode, o) for o in others if mode.idle_on_device(o)]
    return ", ".join(parts)


def _idle_name(mode: _Mode, network: str) -> str:
    return _NAMES[network] + (" buffers" if mode.offload == "sequential" and mode._offloaded(network) else "")


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
) -> Plan:
    """Predicted peak device memory, peak host memory and FLOPs of rendering with ``model``.

    ``offload``/``weights_dtype``/``vae_tiling`` are the render's memory settings (``render.Runtime``;
    ``weights_dtype="auto"`` stores the DiTs in the compute dtype). ``device_kind``: ``cuda`` (compute
    in bfloat16 unless ``dtype`` says otherwise) or ``cpu`` (float32; device and host are the same
    memory, so offloading changes nothing). ``height``/``width``/``steps`` default to the preset's.
    Traces are cached per process: further modes of the same model and size cost milliseconds.
    """
    preset = _preset(model)
    if offload == "auto":
        offload = default_offload(device_kind)
    if offload not in OFFLOAD_MODES:
        raise Hallo3Error(f"--offload must be auto or one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise Hallo3Error(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    if device_kind not in DEVICE_KINDS:
        raise Hallo3Error(f"device kind must be one of {', '.join(DEVICE_KINDS)}, got {device_kind!r}")
    compute = _compute_dtype(dtype, device_kind)
    arch = Architecture.of(preset)
    height = arch.height if height is None else int(height)
    width = arch.width if width is None else int(width)
    steps = arch.steps if steps is None else int(steps)
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise Hallo3Error(f"--height and --width must be positive multiples of 16, got {height}×{width}")
    if height * width > arch.height * arch.width:
        raise Hallo3Error(f"{height}×{width} is larger than the {preset.name} model's {arch.height}×{arch.width} "
                          "(its learned positional table covers that many tokens)")
    if steps < 1:
        raise Hallo3Error(f"--steps must be at least 1, got {steps}")

    weights = _all_weights(arch, compute, _STORAGE[weights_dtype])
    folded = _folds_cross_attention(offload if device_kind == "cuda" else "none", _STORAGE[weights_dtype], compute)
    traces = _traces(arch.key(), compute, height, width, vae_tiling, device_kind, folded_cross_attention=folded)
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


def _folds_cross_attention(offload: str, storage: torch.dtype | None, compute: torch.dtype) -> bool:
    """Whether the face/audio cross-attentions fold their output projection into the values
    (``Hallo3FoldedCrossAttnProcessor``): not when the weights reach the device only inside each
    Linear's own call (sequential offloading) or are stored in another dtype (fp8 layerwise casting)."""
    return offload != "sequential" and (storage is None or storage == compute)


def _preset(model: str | Preset) -> Preset:
    return model if isinstance(model, Preset) else get_preset(model)


def _compute_dtype(dtype: str, device_kind: str) -> torch.dtype:
    if dtype not in _COMPUTE:
        raise Hallo3Error(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _COMPUTE[dtype] or (torch.bfloat16 if device_kind == "cuda" else torch.float32)


def _all_weights(arch: Architecture, compute: torch.dtype, storage: torch.dtype | None) -> dict[str, _Weights]:
    storage = None if storage == compute else storage
    configs = json.loads(arch.key())
    return {n: _weights(n, json.dumps(configs[n], sort_keys=True), compute, storage) for n in _NETWORKS}


def weight_bytes(model: str | Preset = "hallo3", *, weights_dtype: str = "auto", dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes of each network's weights (parameters and buffers) as stored, from the meta-built modules."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise Hallo3Error(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    weights = _all_weights(Architecture.of(_preset(model)), _compute_dtype(dtype, "cuda"), _STORAGE[weights_dtype])
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
) -> dict[str, Trace]:
    """The traced render steps behind a plan (``"clip/denoise"``, ``"clip/vae-decode"``, ...): live
    tensor bytes on the device per module interval, and FLOPs per run."""
    preset = _preset(model)
    arch = Architecture.of(preset)
    return _traces(arch.key(), _compute_dtype(dtype, device_kind), height or arch.height, width or arch.width,
                   vae_tiling, device_kind, None if steps is None else tuple(steps))


def run_step(step: str, networks: dict[str, torch.nn.Module], model: str | Preset, *, height: int, width: int,
             dtype: torch.dtype = torch.float32) -> int:
    """Run a render step's device work on real ``networks`` exactly as :func:`trace` traces it (to
    measure it); returns the bytes of the inputs it creates. Networks the step does not run may be
    missing (the DiT's configuration is taken from a meta-built copy)."""
    arch = json.loads(Architecture.of(_preset(model)).key())
    networks = dict(networks)
    if "transformer" not in networks:
        with _quiet(), torch.device("meta"):
            networks["transformer"] = _build_on("transformer", arch["transformer"], dtype)
    runs = {name: method for name, _, method in _RenderSteps.STEPS}
    if step not in runs:
        raise Hallo3Error(f"unknown step {step!r}; known: {', '.join(runs)}")
    with torch.no_grad():
        return getattr(_RenderSteps(networks, arch, dtype, height, width, 64), runs[step])()[0]


def _rows(mode: _Mode, weights: dict[str, _Weights], traces: dict[str, Trace], steps: int,
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


def _gib(n: int) -> str:
    return f"{n / _GiB:.1f} GiB" if n >= _GiB else f"{n / (1 << 20):.0f} MiB"


def _flop(n: int) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} FLOP"


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
