"""The video loop (SPEC §7): clips of 49 frames extrapolated with 2 motion frames, resumable.

Each clip draws all its randomness (pixel mask of the motion frames, VAE posterior sample,
initial noise, sampler noise) from its own CPU generator seeded from ``(seed, clip index)``, in the
official order. So a clip depends only on the stage files, the settings and the previous clip's
motion frames: every finished clip's latents are persisted and a rerun continues from the last
finished one (re-decoding it for its motion frames; decoding is deterministic) with frames identical
to an uninterrupted run (SPEC §7, "Randomness").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hallo3_cli import sampler, stages
from hallo3_cli.errors import Hallo3Error, StageFileError
from hallo3_cli.presets import Preset, resolve_device

MASK_RATE = 0.1  # share of motion-frame pixels zeroed (SPEC §7.3)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise Hallo3Error(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


OFFLOAD_MODES = ("none", "model", "group", "sequential")


def default_offload(device: str) -> str:
    """``auto`` offloading: on CUDA the DiT (17.8 GB in bf16) and the VAE decoder's activations do
    not fit 24 GB together, so each network visits the device only while it runs (same results,
    a few seconds of transfers per clip); elsewhere memory is shared, so nothing moves."""
    return "model" if device.startswith("cuda") else "none"
WEIGHTS_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Runtime:
    """How the networks use memory and compute; none of it changes what is computed beyond fp rounding.

    ``offload``: ``auto`` (``model`` on CUDA, where the DiT must leave room for the VAE decode; else
    ``none``), ``none`` (all loaded networks on the device), ``model`` (each network moves to the
    device only while it runs; accelerate hooks), ``group`` (diffusers group offloading, one block at a
    time), ``sequential`` (accelerate, one leaf module at a time). ``weights_dtype``: storage of the
    DiT weights (``fp8`` = float8_e4m3fn via diffusers layerwise casting, computed in the compute dtype).
    ``vae_tiling``: tiled VAE encode/decode. ``compile``: ``torch.compile`` of the repeated DiT block.
    ``cache``: First Block Cache threshold (skips the remaining blocks of a step when the first block's
    residual changed less than this); None = off.
    """

    offload: str = "auto"
    weights_dtype: str = "auto"
    vae_tiling: bool = False
    compile: bool = False
    cache: float | None = None

    def resolved(self, device: str) -> "Runtime":
        """This runtime with ``auto`` made concrete for ``device``."""
        if self.offload != "auto":
            return self
        return dataclasses.replace(self, offload=default_offload(device))

    def affects_frames(self) -> dict:
        """The options that change the clips beyond fp rounding (part of a render's identity)."""
        return {"weights_dtype": self.weights_dtype, "vae_tiling": self.vae_tiling, "cache": self.cache}

    def __post_init__(self):
        if self.offload != "auto" and self.offload not in OFFLOAD_MODES:
            raise Hallo3Error(f"--offload must be auto or one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise Hallo3Error(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}")
        if self.cache is not None and not 0 < self.cache < 1:
            raise Hallo3Error(f"--cache threshold must be between 0 and 1, got {self.cache}")
        if self.compile and self.offload in ("group", "sequential"):
            raise Hallo3Error("--compile works with --offload none or model, not with group or sequential offloading")


@dataclass(frozen=True)
class RenderSettings:
    """What a render depends on besides the stage files."""

    seed: int = 42
    steps: int = 50
    cfg: float = 3.5

    def __post_init__(self):
        if self.steps < 1:
            raise Hallo3Error(f"--steps must be at least 1, got {self.steps}")
        if self.steps > 1000:
            raise Hallo3Error(f"--steps must be at most 1000, got {self.steps}")


def clip_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of clip ``index`` (same stream on every device)."""
    digest = hashlib.sha256(f"hallo3:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def num_clips(num_frames: int, clip_length: int, motion_frames: int) -> int:
    """Clips needed to cover ``num_frames`` video frames (SPEC §7.2).

    The official code renders ``ceil(padded / 47)`` clips and trims the video afterwards; clips past
    the unpadded length only produce frames that are cut, so they are not rendered.
    """
    return math.ceil(num_frames / (clip_length - motion_frames))


def clip_audio(features: torch.Tensor, index: int, clip_length: int, motion_frames: int, window: int = 5) -> torch.Tensor:
    """Windowed audio of clip ``index``: ``(clip_length, window, layers, channels)`` (SPEC §7.4).

    A 2-frame prefix (zeros for clip 0, else the two frames before the clip's new frames), the
    clip's new frames, then the last frame repeated up to ``clip_length``.
    """
    from hallo3_cli.audio import window_features

    new = clip_length - motion_frames
    start = index * new
    stop = min(start + new, features.shape[0])
    body = window_features(features, start, stop, window)
    if index == 0:
        prefix = torch.zeros_like(body[:1]).expand(motion_frames, *body.shape[1:])
    else:
        prefix = window_features(features, start - motion_frames, start, window)
    audio = torch.cat([prefix, body])
    if audio.shape[0] < clip_length:
        audio = torch.cat([audio, audio[-1:].expand(clip_length - audio.shape[0], *audio.shape[1:])])
    return audio


def render_key(
    audio: stages.Stage, reference: stages.Stage, settings: RenderSettings, weights: str, dtype: torch.dtype,
    runtime: Runtime | None = None,
) -> str:
    """Identifies a render: same key ⇔ same clips. Used to validate persisted clips on resume."""
    payload = {
        "audio": audio.meta["source_sha256"], "audio_params": audio.params, "audio_weights": audio.weights,
        "reference": reference.meta["source_sha256"], "reference_params": reference.params,
        "reference_weights": reference.weights, "prompt": reference.meta["prompt"],
        "seed": settings.seed, "steps": settings.steps, "cfg": settings.cfg,
        "model": audio.model, "weights": weights, "dtype": str(dtype), "clip_format": stages.CLIP.version,
        "runtime": (runtime or Runtime()).affects_frames(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class Progress:
    """Clip and step progress on stderr: tqdm bars on a terminal, one line per clip (with ETA) in logs."""

    def __init__(self, enabled: bool, clips: int, steps: int, done: int = 0):
        self.enabled, self.clips, self.done, self.started = enabled, clips, done, time.perf_counter()
        self.fresh = 0
        self.clip_bar = self.step_bar = None
        self.interactive = enabled and sys.stderr.isatty()
        if self.interactive:
            from tqdm import tqdm

            self.clip_bar = tqdm(total=clips, initial=done, desc="clips", unit="clip", file=sys.stderr, position=0)
            self.step_bar = tqdm(total=steps, desc="steps", unit="step", file=sys.stderr, position=1, leave=False)
        elif enabled and done:
            print(f"hallo3: resuming after {done}/{clips} finished clips", file=sys.stderr, flush=True)

    def start_clip(self, index: int) -> None:
        if self.step_bar is not None:
            self.step_bar.reset()
            self.step_bar.set_description(f"clip {index + 1} steps")

    def step(self, *_) -> None:
        if self.step_bar is not None:
            self.step_bar.update()

    def finish_clip(self) -> None:
        self.done += 1
        self.fresh += 1
        if self.clip_bar is not None:
            self.clip_bar.update()
        elif self.enabled:
            spent = time.perf_counter() - self.started
            eta = spent / self.fresh * (self.clips - self.done)
            print(f"hallo3: clip {self.done}/{self.clips} done ({spent:.0f} s so far, ETA {eta:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in (self.step_bar, self.clip_bar):
            if bar is not None:
                bar.close()


@dataclass
class Clip:
    """A finished clip: its latents, and (when decoded) its frames in [-1, 1] ``(clip_length, 3, H, W)``."""

    index: int
    latents: torch.Tensor
    frames: torch.Tensor | None


class Renderer:
    """Holds the networks a render needs (loaded once; reused across a batch) and places them in memory."""

    def __init__(self, preset: Preset, device: str = "auto", dtype: str | torch.dtype = "auto", runtime: Runtime | None = None):
        self.preset = preset
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.runtime = (runtime or Runtime()).resolved(self.device)
        self._transformer = None
        self._vae = None
        self._offload_hooks: dict[int, object] = {}

    @property
    def load_device(self) -> str:
        """Where weights are loaded: straight to the device unless an offload mode keeps them on the host
        or they are first cast to a smaller storage dtype (cast on the host, then moved)."""
        casting = WEIGHTS_DTYPES[self.runtime.weights_dtype] not in (None, self.dtype)
        return self.device if self.runtime.offload == "none" and not casting else "cpu"

    def place(self, model: torch.nn.Module, *, blocks: bool = True, block_modules: list[str] | None = None) -> torch.nn.Module:
        """Apply the runtime's weight storage and offloading to a freshly loaded network.

        ``blocks``: the network has transformer blocks (DiTs, T5) that group offloading and layerwise
        casting act on; the VAE and wav2vec stay whole on the device in group mode. ``block_modules``:
        submodules whose own block lists group offloading should use (T5 keeps its in ``encoder``).
        """
        runtime = self.runtime
        storage = WEIGHTS_DTYPES[runtime.weights_dtype]
        if blocks and storage is not None and storage != self.dtype and hasattr(model, "enable_layerwise_casting"):
            model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=self.dtype)
        if runtime.offload == "none" or (runtime.offload == "group" and not blocks):
            return model.to(self.device)
        if runtime.offload == "model":
            from accelerate import cpu_offload_with_hook

            model, hook = cpu_offload_with_hook(model, self.device)
            self._offload_hooks[id(model)] = hook
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
        hook = self._offload_hooks.get(id(model)) if model is not None else None
        if hook is not None:
            hook.offload()

    def forget(self, model: torch.nn.Module | None) -> None:
        """Drop a network for good (T5, reference DiT) and return its device memory."""
        if model is not None:
            self.done_with(model)
            self._offload_hooks.pop(id(model), None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def transformer(self):
        if self._transformer is None:
            from hallo3_cli.loading import load_transformer

            model = self.place(load_transformer(self.preset, self.load_device, self.dtype))
            if self.runtime.cache is not None:
                from diffusers.hooks import FirstBlockCacheConfig

                model.enable_cache(FirstBlockCacheConfig(threshold=self.runtime.cache))
            if self.runtime.compile:
                model.compile_repeated_blocks(fullgraph=False, dynamic=False)
            self._transformer = model
        return self._transformer

    @property
    def vae(self):
        if self._vae is None:
            from hallo3_cli.loading import load_vae

            vae = load_vae(self.preset, self.load_device, self.dtype)
            if self.runtime.vae_tiling:
                vae.enable_tiling()
            self._vae = self.place(vae, blocks=False)
        return self._vae

    @property
    def weights(self) -> str:
        return self.preset.fingerprint("transformer", "vae")

    def key(self, audio: stages.Stage, reference: stages.Stage, settings: RenderSettings) -> str:
        """The identity of a render with this renderer (see :func:`render_key`)."""
        return render_key(audio, reference, settings, self.weights, self.dtype, self.runtime)

    # -- pieces ------------------------------------------------------------------------------
    @torch.no_grad()
    def condition_latent(self, image: torch.Tensor, motion: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE latent of ``[image, m(motion_1), m(motion_2)]`` ×scale, zero-padded to the clip's latent frames."""
        _, height, width = image.shape
        keep = (torch.rand(height, width, generator=generator) > MASK_RATE).to(motion.dtype)
        frames = torch.cat([image[None], motion * keep]).to(self.device, self.dtype)  # (3, 3, H, W)
        posterior = self.vae.encode(frames.permute(1, 0, 2, 3)[None]).latent_dist
        latent = posterior.sample(generator=generator) * self.preset.vae_scale  # (1, 16, 1, h, w)
        self.done_with(self.vae)
        latent = latent.permute(0, 2, 1, 3, 4)
        latent_frames = (self.preset.clip_length - 1) // 4 + 1
        pad = torch.zeros(1, latent_frames - 1, *latent.shape[2:], device=latent.device, dtype=latent.dtype)
        return torch.cat([latent, pad], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(1, frames, 16, h, w)`` → frames ``(clip_length, 3, H, W)`` in [-1, 1].

        Clamped as the official code does (to [0, 1] after ``(x + 1) / 2``), so the last two frames
        are exactly the motion frames of the next clip.
        """
        z = (latents.to(self.device, self.dtype) / self.preset.vae_scale).permute(0, 2, 1, 3, 4)
        video = self.vae.decode(z).sample[0].permute(1, 0, 2, 3).float()
        self.done_with(self.vae)
        return ((video + 1) / 2).clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def denoise_clip(
        self,
        condition: torch.Tensor,
        audio: torch.Tensor,
        context: dict,
        settings: RenderSettings,
        generator: torch.Generator,
        callback: Callable | None = None,
    ) -> torch.Tensor:
        """Sample one clip's latents ``(1, frames, 16, h, w)`` (float32) with CFG on x0 (SPEC §6)."""
        model = self.transformer
        # Projected once per clip, outside the step loop; the unconditional half (zero audio) once per render.
        audio_tokens = torch.cat([context["uncond_audio"], model.project_audio(audio.to(self.device, self.dtype))])
        cond = torch.cat([condition, condition])
        shape = (1, *condition.shape[1:2], 16, *condition.shape[3:])
        x = sampler.initial_noise(shape, generator)

        def denoise(x_t: torch.Tensor, t: float, alpha: torch.Tensor) -> torch.Tensor:
            pair = torch.cat([x_t, x_t])
            with self._cache_context(model):
                v = model(
                    hidden_states=torch.cat([pair.to(self.device, self.dtype), cond], dim=2),
                    encoder_hidden_states=context["text"],
                    timestep=torch.tensor([t, t], device=self.device),
                    audio_tokens=audio_tokens,
                    face_tokens=context["face"],
                    ref_states=context["bank"],
                    return_dict=False,
                )[0].float().cpu()
            x0 = sampler.v_to_x0(pair, v, alpha)
            return sampler.cfg(x0[:1], x0[1:], settings.cfg)

        if self.runtime.cache is not None:
            model._reset_stateful_cache()  # every clip starts from pure noise: no carry-over between clips
        latents = sampler.sample(denoise, x, sampler.schedule(settings.steps), noise=generator, callback=callback)
        self.done_with(model)
        return latents

    def _cache_context(self, model):
        if self.runtime.cache is None:
            return contextlib.nullcontext()
        return model.cache_context("cfg")  # one state: the CFG halves run as one batch

    def context(self, reference: stages.Stage) -> dict:
        """Per-render tensors on the device: CFG text pair, face tokens, reference bank."""
        text = reference["prompt_embeds"].to(self.device, self.dtype)[None]
        face = reference["face_embedding"].to(self.device, self.dtype)[None]
        config = self.transformer.config
        silence = torch.zeros(1, self.preset.clip_length, config.audio_window, config.audio_layers, config.audio_channels,
                              device=self.device, dtype=self.dtype)
        with torch.no_grad():
            face_tokens = self.transformer.project_face(torch.cat([face, face]))
            uncond_audio = self.transformer.project_audio(silence)  # uncond audio = zeros (SPEC §5.6)
        bank = reference["ref_bank"].to(self.device, self.dtype)
        return {
            "text": torch.cat([torch.zeros_like(text), text]),  # [uncond, cond]; uncond text is zeros (SPEC §6)
            "face": face_tokens,  # the face is NOT dropped for the unconditional half
            "uncond_audio": uncond_audio,
            "bank": [entry[None] for entry in bank],
        }

    # -- the loop ------------------------------------------------------------------------------
    def check_stages(self, audio: stages.Stage, reference: stages.Stage) -> None:
        preset = self.preset
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

    def clips(
        self,
        audio: stages.Stage,
        reference: stages.Stage,
        settings: RenderSettings,
        parts_dir: Path,
        *,
        decode_resumed: bool,
        progress: bool = True,
    ) -> Iterator[Clip]:
        """Yield every clip in order, rendering those not yet persisted in ``parts_dir``.

        Freshly rendered clips come with their frames (the decode is needed for the motion frames
        anyway); persisted clips are decoded only if ``decode_resumed`` (and the last one, whose
        frames seed the next clip).
        """
        self.check_stages(audio, reference)
        preset = self.preset
        key = self.key(audio, reference, settings)
        features = audio["features"]
        total = num_clips(audio.meta["num_frames"], preset.clip_length, preset.motion_frames)
        parts_dir.mkdir(parents=True, exist_ok=True)
        resumed = _finished_parts(parts_dir, key, total)
        bar = Progress(progress, total, settings.steps, done=len(resumed))
        image = reference["image"].float()
        motion = image[None].expand(preset.motion_frames, -1, -1, -1)  # clip 0: the image twice (SPEC §7.3)
        context = None
        try:
            for index in range(total):
                if index < len(resumed):
                    latents = resumed[index]["latents"]
                    needs_motion = index == len(resumed) - 1 and index < total - 1
                    frames = self.decode(latents[None]) if decode_resumed or needs_motion else None
                    if needs_motion:
                        motion = frames[-preset.motion_frames:].cpu()
                    yield Clip(index, latents, frames if decode_resumed else None)
                    continue
                if context is None:
                    context = self.context(reference)
                bar.start_clip(index)
                generator = clip_generator(settings.seed, index)
                condition = self.condition_latent(image, motion, generator)
                audio_clip = clip_audio(features, index, preset.clip_length, preset.motion_frames)[None]
                latents = self.denoise_clip(condition, audio_clip, context, settings, generator, bar.step)
                latents = latents.to(self.dtype)[0].cpu()  # what is stored is exactly what is decoded
                frames = self.decode(latents[None])
                motion = frames[-preset.motion_frames:].cpu()
                stages.save_stage(
                    parts_dir / _part_name(index),
                    stages.CLIP,
                    {"latents": latents},
                    {
                        "model": preset.name, "weights": self.weights, "params": render_params(settings, self.dtype, self.runtime),
                        "source_sha256": key, "index": index, "render_key": key,
                    },
                )
                bar.finish_clip()
                yield Clip(index, latents, frames)
        finally:
            bar.close()
            with contextlib.suppress(OSError):
                parts_dir.rmdir()  # only if empty: a failed render leaves no empty .parts/ behind


def render_params(settings: RenderSettings, dtype: torch.dtype, runtime: Runtime | None = None) -> dict:
    return {"seed": settings.seed, "steps": settings.steps, "cfg": settings.cfg, "dtype": str(dtype).removeprefix("torch."),
            **(runtime or Runtime()).affects_frames()}


def _part_name(index: int) -> str:
    return f"clip_{index:05d}.safetensors"


def _finished_parts(parts_dir: Path, key: str, total: int) -> list[stages.Stage]:
    """The leading run of valid persisted clips of this render (a corrupt or foreign part ends it)."""
    parts = []
    for index in range(total):
        path = parts_dir / _part_name(index)
        if not path.exists():
            break
        try:
            part = stages.load_stage(path, stages.CLIP)
        except StageFileError:
            break
        if part.meta["render_key"] != key or part.meta["index"] != index:
            break
        parts.append(part)
    return parts


@contextlib.contextmanager
def job_lock(path: Path):
    """An exclusive advisory lock on ``path`` (several processes on one cache folder wait in turn).

    The lock file is deleted when the holder is done. A waiter that wakes up holding a deleted file
    (its inode is no longer the one at ``path``) starts over, so no two processes ever hold it.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding the lock: see above
        handle.close()


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"
