"""How sizes and FLOPs are written for people, in one place."""

from __future__ import annotations


def human_size(n: int) -> str:
    """Decimal units, as the Hugging Face Hub shows download sizes (``40.3 GB``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def memory_size(n: int) -> str:
    """Binary units, as device memory is counted (``20.0 GiB``, ``512 MiB``)."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def flops(n: int) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} FLOP"
