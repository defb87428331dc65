"""Renders that survive interruption: every finished clip is persisted as soon as it exists (a ``hallo3.clip``
stage file in ``<output>.parts/`` or the cache), and the same render resumes from the leading run of valid
parts (same render key ⇔ same clips)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from hallo3_cli import fsutil, geometry, stages
from hallo3_cli.errors import Hallo3Error, StageFileError
from hallo3_cli.jobs.common import RenderSettings, check_stages, fingerprint
from hallo3_cli.loading import PipelineLoader
from hallo3_cli.presets import Preset
from hallo3_cli.progress import Progress
from hallo3_cli.runtime import Runtime


def render_key(audio: stages.Stage, reference: stages.Stage, settings: RenderSettings, preset: Preset, runtime: Runtime) -> str:
    """Identifies a render: same key ⇔ same clips. Used to validate persisted clips on resume."""
    payload = {
        "audio": audio.meta["source_sha256"], "audio_params": audio.params, "audio_weights": audio.weights,
        "reference": reference.meta["source_sha256"], "reference_params": reference.params,
        "reference_weights": reference.weights, "prompt": reference.meta["prompt"],
        "seed": settings.seed, "steps": settings.steps, "cfg": settings.cfg,
        "model": audio.model, "weights": fingerprint(preset, stages.CLIPS), "dtype": str(runtime.torch_dtype),
        "clip_format": stages.CLIP.version, "runtime": runtime.affects_frames(),
    }
    if settings.lora is not None:
        payload["lora"] = settings.lora.identity()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


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


def render_parts(loader: PipelineLoader, audio: stages.Stage, reference: stages.Stage, settings: RenderSettings,
                 parts_dir: Path, *, decode_resumed: bool, progress: bool = True, on_step=None, session=None):
    """Yield every clip in order (``Hallo3Clip``), rendering with ``loader``'s pipeline those not yet persisted in
    ``parts_dir``; each fresh clip is persisted there as soon as it exists (the resume unit).
    ``on_step(clip_index, step, num_steps)`` runs after every denoising step (raise to cancel: the clips
    finished so far stay persisted). ``decode_resumed``: the clips' frames are wanted (persisted clips are
    decoded again, and the last clip too); False: latents only. ``session`` (``--parallel video``): every
    rank renders, rank 0 alone persists, and all resume from the clips rank 0 found."""
    preset, runtime = loader.preset, loader.runtime
    check_stages(preset, audio, reference, settings.lora)
    key = render_key(audio, reference, settings, preset, runtime)
    total = geometry.num_clips(audio.meta["num_frames"], preset.clip_length, preset.motion_frames)
    main = session is None or session.is_main
    if main:
        fsutil.ensure_output_folder(parts_dir)  # (a failure: one line, exit 4)
    resumed = _finished_parts(parts_dir, key, total) if main else []
    if session is not None:
        count = session.agree(len(resumed))  # nothing is written until every rank has read them
        if not main:
            resumed = _finished_parts(parts_dir, key, count)
            if len(resumed) != count:
                raise Hallo3Error(f"rank 0 found {count} finished clips in {parts_dir}, this rank reads {len(resumed)} "
                                  "(every rank must see the same cache folder)")
    bar = Progress(progress and main, total, settings.steps, done=len(resumed), decode_resumed=decode_resumed)
    meta = {"model": preset.name, "weights": fingerprint(preset, stages.CLIPS), "params": settings.params(runtime),
            "source_sha256": key, "render_key": key}
    current = {"clip": len(resumed)}

    def started(pipe_, index, total_):
        current["clip"] = index
        bar.start_clip(pipe_, index, total_)

    def stepped(pipe_, step, timestep, tensors):
        bar.step()
        if on_step is not None:
            on_step(current["clip"], step, settings.steps)
        return {}

    try:
        clips = loader.need("transformer", "vae").generate_clips(
            stages.audio_from_stage(audio), stages.reference_from_stage(reference), seed=settings.seed,
            num_inference_steps=settings.steps, guidance_scale=settings.cfg,
            finished=[part["latents"] for part in resumed], decode_finished=decode_resumed,
            decode_last=decode_resumed,  # frames are wanted (mp4) or only latents (clips file)
            callback_on_step_end=stepped, callback_on_clip_start=started, progress=False,
        )
        for clip in clips:
            if clip.index >= len(resumed) and main:
                stages.save_stage(parts_dir / _part_name(clip.index), stages.CLIP, {"latents": clip.latents},
                                  {**meta, "index": clip.index})
                bar.finish_clip()
            elif decode_resumed:
                bar.resumed_clip(clip.index)
            yield clip
    finally:
        bar.close()
        if main:
            with contextlib.suppress(OSError):
                parts_dir.rmdir()  # only if empty: a failed render leaves no empty .parts/ behind
