"""Runtime choices, in one place: device, compute dtype, offloading, weight storage, VAE tiling, compile, cache.

None of them changes what is computed beyond floating-point rounding, except those listed by
:meth:`Runtime.affects_frames` (fp8 storage, VAE tiling, First Block Cache), which are part of a render's
identity. Every list of accepted values is defined here and nowhere else; the CLI, ``plan``, ``doctor``
and the pipeline validate against it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from hallo3_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hallo3")

# The lists are plain names so that the CLI validates options without importing torch.
#: Compute dtypes by name (``auto`` = bfloat16 on CUDA, float32 elsewhere) and their torch names.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_CHOICES = ("auto", *DTYPES)
#: Memory modes, fastest first.
OFFLOAD_MODES = ("none", "model", "group", "sequential")
#: What ``plan`` plans for: a CUDA device (bfloat16) or the CPU (float32, device memory = host memory).
DEVICE_KINDS = ("cuda", "cpu")
#: DiT weight storage (``auto`` = the compute dtype) and their torch names.
WEIGHTS_DTYPES = {"auto": None, "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
WEIGHTS_DTYPE_CHOICES = tuple(WEIGHTS_DTYPES)
#: ``--parallel`` modes of ``render``: ``auto`` = ``jobs`` with ``--batch`` (each process renders its share of
#: the jobs), ``none`` otherwise; ``video`` = every process shares each denoiser call of one video.
PARALLEL_MODES = ("auto", "none", "jobs", "video")


def parallel_mode(mode: str, *, batch: bool) -> str:
    """The concrete ``--parallel`` mode (``auto`` resolved); ``jobs`` needs ``--batch``."""
    if mode not in PARALLEL_MODES:
        raise UsageError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if mode == "auto":
        return "jobs" if batch else "none"
    if mode == "jobs" and not batch:
        raise UsageError("--parallel jobs shares the jobs of --batch between processes; "
                         "to split one video over them use --parallel video")
    return mode


#: Device memory kept free for what ``plan`` does not count (CUDA context, cuDNN workspaces, fragmentation).
DEVICE_RESERVE = 1 << 30
#: What ``--offload auto`` tries on CUDA, fastest first: (offload, VAE tiling).
AUTO_CANDIDATES = (("none", False), ("none", True), ("model", False), ("model", True), ("group", False),
                   ("group", True), ("sequential", True))


def storage_dtype(weights_dtype: str) -> torch.dtype | None:
    """The torch dtype of a ``--weights-dtype`` name (None for ``auto``)."""
    import torch

    name = WEIGHTS_DTYPES[weights_dtype]
    return None if name is None else getattr(torch, name)


def resolve_device(device: str = "auto") -> str:
    """``auto`` → cuda if available, then mps, else cpu; anything else is validated by torch (one line)."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise UsageError(f"--device {device!r} is not usable here: {reason}") from None
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return getattr(torch, DTYPES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Runtime:
    """How the networks use the machine.

    ``device``/``dtype``: ``auto`` or a torch device / dtype name. ``offload``: ``auto`` (on CUDA the
    fastest mode whose ``plan`` fits the free device memory, see :func:`choose_memory_mode`; elsewhere
    ``none``), ``none`` (all loaded networks on the device), ``model`` (each network on the device only
    while it runs; accelerate hooks), ``group`` (diffusers group offloading, one block at a time),
    ``sequential`` (accelerate, one leaf module at a time). ``weights_dtype``: storage of the DiT
    weights (``fp8`` = float8_e4m3fn via diffusers layerwise casting, computed in ``dtype``).
    ``vae_tiling``: tiled VAE encode/decode. ``compile``: ``torch.compile`` of the repeated DiT block.
    ``cache``: First Block Cache threshold (0 < c < 1), None = off.
    """

    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    weights_dtype: str = "auto"
    vae_tiling: bool = False
    compile: bool = False
    cache: float | None = None
    reason: str = dataclasses.field(default="", compare=False)  # why ``auto`` chose what it did

    def __post_init__(self):
        if self.offload != "auto" and self.offload not in OFFLOAD_MODES:
            raise UsageError(f"--offload must be auto or one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise UsageError(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.cache is not None and not (math.isfinite(self.cache) and 0 < self.cache < 1):
            raise UsageError(f"--cache threshold must be between 0 and 1, got {self.cache}")
        if self.compile and self.offload in ("group", "sequential"):
            raise UsageError("--compile works with --offload none or model, not with group or sequential offloading")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, resolve_device(self.device) if self.device == "auto" else self.device)

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The DiT weights' storage dtype when it differs from the compute dtype, else None."""
        storage = storage_dtype(self.weights_dtype)
        return None if storage in (None, self.torch_dtype) else storage

    def resolved(self, preset=None) -> Runtime:
        """This runtime with every ``auto`` made concrete (device, dtype, and the memory mode, which on
        CUDA is planned for ``preset``)."""
        device = resolve_device(self.device)
        dtype = dtype_name(resolve_dtype(self.dtype, device))
        runtime = dataclasses.replace(self, device=device, dtype=dtype)
        if runtime.offload == "auto":
            runtime = choose_memory_mode(runtime, preset)
        return runtime

    def affects_frames(self) -> dict:
        """The options that change the clips beyond fp rounding (part of a render's identity)."""
        return {"weights_dtype": self.weights_dtype, "vae_tiling": self.vae_tiling, "cache": self.cache}

    def describe(self) -> str:
        parts = [f"{self.device}, {self.dtype}, offload {self.offload}"]
        if self.weights_dtype != "auto":
            parts.append(f"weights {self.weights_dtype}")
        if self.vae_tiling:
            parts.append("VAE tiling")
        if self.compile:
            parts.append("compile")
        if self.cache is not None:
            parts.append(f"cache {self.cache}")
        return ", ".join(parts)


def free_device_memory(device: str) -> int | None:
    """Free bytes on a CUDA device (None elsewhere: memory is shared with the host)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def choose_memory_mode(runtime: Runtime, preset=None, free: int | None = None) -> Runtime:
    """``--offload auto``: off CUDA ``none``; on CUDA the fastest of :data:`AUTO_CANDIDATES` whose planned
    peak (plus :data:`DEVICE_RESERVE`) fits the free device memory, adding VAE tiling only when that is
    what makes it fit (``--vae-tiling`` given: always tiled). Nothing fits: the least-memory mode, with
    a warning. The choice and its reason are in ``Runtime.reason``."""
    device = resolve_device(runtime.device)
    if not device.startswith("cuda"):
        return dataclasses.replace(runtime, device=device, offload="none", reason="not CUDA: memory is shared, nothing moves")
    free = free_device_memory(device) if free is None else free
    if preset is None or free is None:
        return dataclasses.replace(runtime, offload="model", reason="device memory unknown: model offloading")
    from hallo3_cli.plan import plan

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


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


class Placement:
    """Puts freshly loaded networks where a (resolved) :class:`Runtime` says, and moves them back after use."""

    def __init__(self, runtime: Runtime):
        if "auto" in (runtime.device, runtime.dtype, runtime.offload):
            raise ValueError("Placement needs a resolved Runtime (call Runtime.resolved())")
        self.runtime = runtime
        self.device = runtime.device
        self.dtype = runtime.torch_dtype
        self._hooks: dict[int, object] = {}

    @property
    def load_device(self) -> str:
        """Where weights are loaded: straight to the device unless an offload mode keeps them on the host
        or they are first cast to a smaller storage dtype (cast on the host, then moved)."""
        return self.device if self.runtime.offload == "none" and self.runtime.storage_dtype is None else "cpu"

    def place(self, model: torch.nn.Module, *, blocks: bool = True, block_modules: list[str] | None = None) -> torch.nn.Module:
        """Apply weight storage and offloading to a freshly loaded network.

        ``blocks``: the network has transformer blocks (DiTs, T5) that group offloading and layerwise
        casting act on; the VAE and wav2vec stay whole on the device in group mode. ``block_modules``:
        submodules whose own block lists group offloading should use (T5 keeps its in ``encoder``).
        """
        import torch

        runtime = self.runtime
        storage = runtime.storage_dtype
        if blocks and storage is not None and hasattr(model, "enable_layerwise_casting"):
            model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=self.dtype)
        if runtime.offload == "none" or (runtime.offload == "group" and not blocks):
            return model.to(self.device)
        if runtime.offload == "model":
            from accelerate import cpu_offload_with_hook

            model, hook = cpu_offload_with_hook(model, self.device)
            self._hooks[id(model)] = hook
            return model
        if runtime.offload == "group":
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(
                model, onload_device=torch.device(self.device), offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1, use_stream=self.device.startswith("cuda"),
                block_modules=block_modules, low_cpu_mem_usage=True,  # no second (pinned) host copy
            )
            return model
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device=self.device)

    def done_with(self, model: torch.nn.Module | None) -> None:
        """In ``model`` offload mode, move a network back to the host after its phase."""
        hook = self._hooks.get(id(model)) if model is not None else None
        if hook is not None:
            hook.offload()

    def forget(self, model: torch.nn.Module | None) -> None:
        """Drop a network for good (T5, reference DiT) and return its device memory."""
        import torch

        if model is not None:
            self.done_with(model)
            self._hooks.pop(id(model), None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
