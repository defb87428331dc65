"""The accepted range of each render setting, in one place: the CLI, the pipeline and the page check against
these (inclusive bounds)."""

from __future__ import annotations

import math

#: Sampling steps (the scheduler's table has 1000 entries).
STEPS = (1, 1000)
#: Classifier-free guidance scale (the release uses 3.5).
GUIDANCE = (0.0, 100.0)
#: LoRA adapter scale (0: the base model; 1: the adapter as trained).
LORA_SCALE = (0.0, 10.0)
#: The release's settings: 50 steps, guidance 3.5, and the prompt its inference script gives every portrait.
RELEASE = {"steps": 50, "cfg": 3.5,
           "default_prompt": "A person is talking to the camera with natural facial expressions and head movements."}


def check_steps(value, name: str = "steps") -> int:
    """``value`` as a number of steps, or ``ValueError`` naming ``name`` and the range."""
    low, high = STEPS
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value


def check_guidance(value, name: str = "guidance_scale") -> float:
    """``value`` as a guidance scale, or ``ValueError`` naming ``name`` and the range."""
    low, high = GUIDANCE
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(scale) or not low <= scale <= high:
        raise ValueError(f"{name} must be a finite number from {low:g} to {high:g}, got {value!r}")
    return scale
