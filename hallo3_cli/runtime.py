"""Runtime choices, in one place: device, compute dtype, offloading, weight storage, VAE tiling, compile, cache.

None of them changes what is computed beyond floating-point rounding, except those listed by
:meth:`Runtime.affects_frames` (fp8 storage, VAE tiling, First Block Cache), which are part of a render's
identity. Every list of accepted values is defined here and nowhere else; the CLI, ``plan``, ``doctor``
and the pipeline validate against it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from hallo3_cli.errors import UsageError
from hallo3_cli.errors import reason as first_line

if TYPE_CHECKING:
    import torch


# The lists are plain names so that the CLI validates options without importing torch.
#: Compute dtypes by name (``auto`` = bfloat16 on CUDA, float32 elsewhere) and their torch names.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_CHOICES = ("auto", *DTYPES)
#: Memory modes, fastest first (``--offload`` also takes ``auto``: :data:`OFFLOAD_CHOICES`).
OFFLOAD_MODES = ("none", "model", "group", "sequential")
OFFLOAD_CHOICES = ("auto", *OFFLOAD_MODES)
#: What ``plan`` plans for: a CUDA device (bfloat16) or the CPU (float32, device memory = host memory).
DEVICE_KINDS = ("cuda", "cpu")
#: DiT weight storage (``auto`` = the compute dtype) and their torch names.
WEIGHTS_DTYPES = {"auto": None, "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
WEIGHTS_DTYPE_CHOICES = tuple(WEIGHTS_DTYPES)
#: ``--parallel`` modes of ``render``: ``auto`` = ``jobs`` with ``--batch`` (each process renders its share of
#: the jobs), ``none`` otherwise; ``video`` = every process shares each denoiser call of one video.
PARALLEL_MODES = ("auto", "none", "jobs", "video")
#: Training engines (``hallo3 plan --train --engine``): accelerate DDP, DeepSpeed ZeRO-2, PyTorch FSDP2.
TRAIN_ENGINES = ("ddp", "zero2", "fsdp2")


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
        reason = first_line(err)
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
    fastest mode whose ``plan`` fits the free device memory, see :func:`hallo3_cli.plan.choose_memory_mode`;
    elsewhere ``none``), ``none`` (all loaded networks on the device), ``model`` (each network on the device only
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

    def resolved(self) -> Runtime:
        """This runtime with the device and dtype made concrete, and off CUDA the memory mode too (``none``:
        memory is shared). ``offload="auto"`` on CUDA stays: which mode fits is planning's answer
        (:func:`hallo3_cli.plan.choose_memory_mode`)."""
        device = resolve_device(self.device)
        dtype = dtype_name(resolve_dtype(self.dtype, device))
        runtime = dataclasses.replace(self, device=device, dtype=dtype)
        if runtime.offload == "auto" and not device.startswith("cuda"):
            runtime = dataclasses.replace(runtime, offload="none", reason="not CUDA: memory is shared, nothing moves")
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
