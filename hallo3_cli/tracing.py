"""Tracing PyTorch code on fake tensors: live tensor bytes per module interval, and FLOPs (generic).

Nothing here knows Hallo3: :mod:`hallo3_cli.plan` runs ``Hallo3Pipeline``'s own methods under
:func:`session` and turns the traces into a plan. A dispatch mode follows the lifetime of every tensor
storage created while active (peak of live bytes, also per executing module) and counts FLOPs with
``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention). Fake tensors do no compute.
Repeated modules (``replay`` patterns) are traced once per distinct call and replayed, which is exact
because equal code on equal shapes allocates the same way (a call whose outputs are not all fresh, or that
leaves anything else alive, is always traced for real).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode



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
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

    formulas = dict(flop_registry)
    # torch's registry lacks the CPU flash kernel (the one fake CPU tensors dispatch to) and its backward;
    # sdpa_flop / sdpa_backward_flop are the registered (already shape-wrapped) formulas of the other fused
    # SDPA kernels, whose leading arguments are the same
    formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
    formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop
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
def session(networks: dict[str, torch.nn.Module], granularity: int, replay: tuple[str, ...] = (),
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


class FlashAttention(torch.overrides.TorchFunctionMode):
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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def quiet():
    """diffusers/transformers warn about casting and unused config keys while building: not for the user."""
    import logging

    stack = contextlib.ExitStack()
    for name in ("diffusers", "transformers"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
    return stack


@contextlib.contextmanager
def no_init():
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


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in tensors(module))


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def group_layout(module: torch.nn.Module, block_modules: tuple[str, ...], prefix: str = ""):
    """diffusers' block-level grouping (one block per group): ModuleList/Sequential children are
    blocks, children named in ``block_modules`` are grouped recursively, the rest is one group."""
    blocks: list[tuple[str, int]] = []
    in_blocks: set[int] = set()
    for name, child in module.named_children():
        if name in block_modules:
            sub, _ = group_layout(child, block_modules, f"{prefix}{name}.")
            blocks += sub
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += [(f"{prefix}{name}.{i}", tensor_bytes(block)) for i, block in enumerate(child)]
    for name, _ in blocks:
        in_blocks.update(id(t) for t in tensors(module.get_submodule(name[len(prefix):])))
    unmatched = sum(t.nbytes for t in tensors(module) if id(t) not in in_blocks)
    return blocks, unmatched


def storage_bytes(tree, granularity: int) -> int:
    """Bytes of the distinct storages of the tensors in ``tree``, each rounded up to ``granularity``."""
    leaves = [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage()._cdata: t.untyped_storage() for t in leaves}
    return sum(-(-s.nbytes() // granularity) * granularity for s in storages.values())
