"""What the commands share: a render's settings, the weights a command needs, the cache lock."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hallo3_cli import fsutil, options, stages
from hallo3_cli.errors import ArgumentError, Hallo3Error, StageFileError
from hallo3_cli.loading import LoraWeights
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.runtime import Runtime

log = logging.getLogger("hallo3")

#: Several processes on one cache folder (or output) wait in turn.
job_lock = fsutil.exclusive_lock


@dataclass(frozen=True)
class RenderSettings:
    """What a render depends on besides the stage files and the runtime: the seed, the sampling settings and the
    LoRA adapters applied (``loading.LoraWeights``, None: the base model)."""

    seed: int = 42
    steps: int = 50
    cfg: float = 3.5
    lora: LoraWeights | None = None

    @classmethod
    def for_preset(cls, preset: Preset, seed: int = 42, steps: int | None = None, cfg: float | None = None,
                   lora: LoraWeights | None = None) -> RenderSettings:
        """The settings of a render with ``preset``'s defaults for ``None``; each value checked (the Python API's
        arguments: ``TypeError``/``ValueError`` naming ``seed``, ``steps``, ``cfg`` or ``lora``)."""
        check_settings(seed, steps, cfg)
        if lora is not None and not isinstance(lora, LoraWeights):
            raise TypeError(f"lora must be a hallo3_cli.loading.LoraWeights (LoraWeights.parse('PATH[:SCALE]')) or None, "
                            f"got {type(lora).__name__}")
        return cls(seed=seed, steps=preset.steps if steps is None else steps, cfg=preset.cfg if cfg is None else float(cfg),
                   lora=lora)

    def params(self, runtime: Runtime) -> dict:
        """The stage-file ``params`` of a render with these settings."""
        params = {"seed": self.seed, "steps": self.steps, "cfg": self.cfg, "dtype": runtime.dtype, **runtime.affects_frames()}
        if self.lora is not None:  # (absent without adapters: files and keys of plain renders stay as they were)
            params.update(self.lora.identity())
        return params


def check_settings(seed, steps=None, cfg=None) -> None:
    """A render's ``seed`` (an int), ``steps`` and ``cfg`` (``None``: the preset's) within the ranges of
    :mod:`hallo3_cli.options`; ``TypeError``/``ValueError`` naming the argument, before any work."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    try:
        if steps is not None:
            options.check_steps(steps, "steps")
        if cfg is not None:
            options.check_guidance(cfg, "cfg")
    except ValueError as err:
        raise ArgumentError(str(err)) from None


def preset_argument(model, name: str = "model") -> Preset:
    """``model`` (a preset name or a :class:`Preset`) as a Preset; ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(model, Preset):
        return model
    if not isinstance(model, str):
        raise TypeError(f"{name} must be a model preset name (str) or a Preset, got {type(model).__name__}")
    try:
        return get_preset(model)
    except Hallo3Error as err:
        raise ArgumentError(f"{name}: {err}") from None


def check_arguments(*, prompt=None, runtime=None, flags: dict | None = None) -> None:
    """The Python API's other arguments of a job: ``prompt`` a str or None, ``runtime`` a
    :class:`~hallo3_cli.runtime.Runtime` or None, ``flags`` booleans by name; ``TypeError`` naming the argument."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    if runtime is not None and not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a hallo3_cli.runtime.Runtime or None, got {type(runtime).__name__}")
    for name, value in (flags or {}).items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def fingerprint(preset: Preset, kind: stages.StageKind, params: dict | None = None) -> str:
    """The weights fingerprint written into (and checked against, see ``stages.weights_components``) a stage file."""
    return preset.fingerprint(*stages.weights_components(kind, preset, params))


def require_weights(preset: Preset, kinds: tuple[stages.StageKind, ...], allow_download: bool = False,
                    progress: bool = True, extra: tuple[str, ...] = ()) -> None:
    """Fail (or, if allowed, download) before loading anything when the weights that make ``kinds`` of stage
    files (and ``extra`` components) are missing."""
    from hallo3_cli.hub import ensure_weights

    needed = tuple(c for kind in kinds for c in stages.weights_components(kind, preset)) + extra
    ensure_weights(preset, needed, allow_download=allow_download, progress=progress)


_WARNED: set[str] = set()


def warn_random(preset: Preset) -> None:
    """Say once per process that a random preset's output is noise."""
    if preset.is_random and preset.name not in _WARNED:
        _WARNED.add(preset.name)
        log.warning("model preset %r has RANDOM weights: its output is noise (for tests and trials only)", preset.name)


def start_video(parallel, preset: Preset, runtime: Runtime | None):
    """``--parallel video``: the split checked and the process group joined, before anything loads."""
    from hallo3_cli.jobs.parallel_session import start_video as start

    return start(parallel, preset, runtime or Runtime())


def check_stages(preset: Preset, audio: stages.Stage, reference: stages.Stage, lora: LoraWeights | None = None) -> None:
    """The stage files of one render belong to ``preset``, to each other, and to the LoRA adapters of the render
    (a reference made with or without another adapted reference network is refused)."""
    wanted = lora.reference_identity() if lora is not None else None
    if reference.params.get("lora") != wanted:
        how = "without the reference adapters of --lora" if wanted else "with LoRA adapters of the reference network"
        raise StageFileError(f"was made {how}; encode the portrait again with the same --lora", reference.path)
    for stage in (audio, reference):
        if stage.model != preset.name:
            raise StageFileError(f"was made with model preset {stage.model!r}, not {preset.name!r}", stage.path)
    if audio.meta["clip_length"] != preset.clip_length or audio.meta["fps"] != preset.fps:
        raise StageFileError("was made for another clip length or frame rate", audio.path)
    if tuple(reference["image"].shape[1:]) != (preset.height, preset.width):
        raise StageFileError(
            f"holds a {reference['image'].shape[2]}×{reference['image'].shape[1]} frame, "
            f"the {preset.name} model renders {preset.width}×{preset.height}",
            reference.path,
        )
