"""The commands' work on top of ``Hallo3Pipeline``: stage files, caching, resume, batches and sharding.

Each public function is one command (``embed-audio``, ``encode-ref``, ``render`` in its three forms,
``stitch``); the CLI only parses arguments and calls them::

    from hallo3_cli.jobs import render_video
    render_video("face.png", "speech.wav", "out.mp4", model="tiny-random")

The pipelines built here load lazily (each network on first use; T5 and the reference network freed as
soon as their outputs exist) and place every network as the :class:`~hallo3_cli.runtime.Runtime` says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hallo3_cli import fsutil, stages
from hallo3_cli.errors import Hallo3Error, InputError, StageFileError
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.runtime import Runtime

log = logging.getLogger("hallo3")

@dataclass(frozen=True)
class RenderSettings:
    """What a render depends on besides the stage files and the runtime."""

    seed: int = 42
    steps: int = 50
    cfg: float = 3.5

    @classmethod
    def for_preset(cls, preset: Preset, seed: int = 42, steps: int | None = None, cfg: float | None = None) -> RenderSettings:
        return cls(seed=seed, steps=preset.steps if steps is None else steps, cfg=preset.cfg if cfg is None else cfg)

    def params(self, runtime: Runtime) -> dict:
        """The stage-file ``params`` of a render with these settings."""
        return {"seed": self.seed, "steps": self.steps, "cfg": self.cfg, "dtype": runtime.dtype, **runtime.affects_frames()}


def fingerprint(preset: Preset, kind: stages.StageKind, params: dict | None = None) -> str:
    """The weights fingerprint written into (and checked against, see ``stages.weights_components``) a stage file."""
    return preset.fingerprint(*stages.weights_components(kind, preset, params))


def require_weights(preset: Preset, kinds: tuple[stages.StageKind, ...], allow_download: bool = False,
                    progress: bool = True, extra: tuple[str, ...] = ()) -> None:
    """Fail (or, if allowed, download) before loading anything when the weights that make ``kinds`` of stage
    files (and ``extra`` components) are missing."""
    from hallo3_cli.download import ensure_weights

    needed = tuple(c for kind in kinds for c in stages.weights_components(kind, preset)) + extra
    ensure_weights(preset, needed, allow_download=allow_download, progress=progress)


_WARNED: set[str] = set()


def _warn_random(preset: Preset) -> None:
    if preset.is_random and preset.name not in _WARNED:  # once per process
        _WARNED.add(preset.name)
        log.warning("model preset %r has RANDOM weights: its output is noise (for tests and trials only)", preset.name)


def _pipeline(preset: Preset, runtime: Runtime | None, *, allow_download: bool = False, progress: bool = True,
              parallel=None):
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    pipe = Hallo3Pipeline.from_preset(preset, runtime, lazy=True, allow_download=allow_download, progress=progress,
                                      parallel=parallel)
    pipe.set_progress_bar_config(disable=True)  # jobs show their own clip/step progress
    return pipe


job_lock = fsutil.exclusive_lock  # several processes on one cache folder wait in turn


def _start_video(parallel, preset: Preset, runtime: Runtime | None):
    """``--parallel video``: the split checked and the process group joined, before anything loads."""
    from hallo3_cli.parallel.session import start_video

    return start_video(parallel, preset, runtime or Runtime())


# ---------------------------------------------------------------------------------------------
# stage files <-> pipeline objects


def audio_from_stage(stage: stages.Stage):
    from hallo3_cli.pipeline_hallo3 import Hallo3Audio

    return Hallo3Audio(stage["features"], stage.meta["num_frames"])


def reference_from_stage(stage: stages.Stage):
    from hallo3_cli.pipeline_hallo3 import Hallo3Reference

    meta = stage.meta
    return Hallo3Reference(
        **{name: stage[name] for name in Hallo3Reference.TENSORS}, framing=meta["framing"],
        source_width=meta["source_width"], source_height=meta["source_height"], face_found=meta["face_found"],
        prompt=meta["prompt"],
    )


def check_stages(preset: Preset, audio: stages.Stage, reference: stages.Stage) -> None:
    """The stage files of one render belong to ``preset`` and to each other."""
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


# ---------------------------------------------------------------------------------------------
# embed-audio


def embed_audio(speech: str | Path, output: str | Path, *, model: str | Preset = "hallo3", separate_vocals: bool = False,
                device: str = "auto", progress: bool = True, pipe=None) -> Path:
    """Decode ``speech``, optionally isolate the voice, compute the features and write an audio stage file."""
    from hallo3_cli import vocals
    from hallo3_cli.audio import CONTEXT_SECONDS, WINDOW_SECONDS
    from hallo3_cli.audio_io import SAMPLE_RATE, load_audio, resample

    speech = fsutil.require_file(speech)
    (output,) = fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES)], inputs=[speech])
    preset = get_preset(model) if isinstance(model, str) else model
    separator_path = vocals.find_separator_model(preset) if separate_vocals else None
    # only the device matters (wav2vec2 goes straight onto it): no memory mode to plan; an unusable device
    # fails before any weights are checked
    runtime = Runtime(device=device, offload="none").resolved(preset)
    require_weights(preset, (stages.AUDIO,))
    pipe = pipe or _pipeline(preset, runtime)
    if separator_path is not None:
        mix = load_audio(speech, vocals.SEPARATOR_SAMPLE_RATE, mono=False)
        voice = vocals.separate_vocals(mix, separator_path, progress=progress)
        source = resample(voice.mean(axis=0), vocals.SEPARATOR_SAMPLE_RATE, SAMPLE_RATE)
    else:
        source = speech
    features = pipe.encode_audio(source, progress=progress)
    params = {
        "fps": preset.fps, "clip_length": preset.clip_length, "sample_rate": SAMPLE_RATE,
        "normalize": bool(pipe.component("feature_extractor").do_normalize), "separate_vocals": bool(separate_vocals),
        "window_seconds": WINDOW_SECONDS, "context_seconds": CONTEXT_SECONDS,
    }
    meta = {
        "model": preset.name, "weights": fingerprint(preset, stages.AUDIO, params), "params": params,
        "source_sha256": fsutil.sha256_file(speech), "fps": preset.fps, "num_frames": features.num_frames,
        "clip_length": preset.clip_length, "sample_rate": SAMPLE_RATE,
    }
    return stages.save_stage(output, stages.AUDIO, {"features": features.features}, meta)


# ---------------------------------------------------------------------------------------------
# encode-ref


def encode_reference(image: str | Path, output: str | Path, *, model: str | Preset = "hallo3", prompt: str | None = None,
                     preview: str | Path | None = None, runtime: Runtime | None = None, pipe=None) -> Path:
    """Portrait → reference stage file (face embedding and box, VAE latent, prompt, reference bank)."""
    from hallo3_cli.image_io import write_preview

    image = fsutil.require_file(image)
    output, *_ = fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES), (preview, fsutil.PREVIEW_SUFFIXES)], inputs=[image])
    preset = get_preset(model) if isinstance(model, str) else model
    if pipe is None:
        runtime = (runtime or Runtime()).resolved(preset)  # an unusable device fails before any weights are checked
        require_weights(preset, (stages.REFERENCE,))
        pipe = _pipeline(preset, runtime)
    _warn_random(preset)
    reference = pipe.encode_reference(image, prompt)
    # All or nothing: the preview is written to its temporary name first and renamed into place only once
    # the stage file is written.
    with fsutil.atomic_path(preview) if preview is not None else contextlib.nullcontext() as preview_tmp:
        if preview_tmp is not None:
            write_preview(preview_tmp, reference.image, reference.mask, reference.face_box.tolist())
        return write_reference(reference, output, preset, pipe.placement.runtime, fsutil.sha256_file(image))


def write_reference(reference, output: Path, preset: Preset, runtime: Runtime, source_sha256: str) -> Path:
    params = {"height": preset.height, "width": preset.width, "reference_seed": 0, "dtype": runtime.dtype,
              "weights_dtype": runtime.weights_dtype}
    return stages.save_stage(
        output,
        stages.REFERENCE,
        {name: getattr(reference, name) for name in reference.TENSORS},
        {
            "model": preset.name, "weights": fingerprint(preset, stages.REFERENCE), "params": params,
            "source_sha256": source_sha256, "framing": reference.framing, "source_width": reference.source_width,
            "source_height": reference.source_height, "face_found": reference.face_found, "prompt": reference.prompt,
        },
    )


# ---------------------------------------------------------------------------------------------
# render: the resumable clip loop


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


def render_parts(pipe, preset: Preset, audio: stages.Stage, reference: stages.Stage, settings: RenderSettings,
                 parts_dir: Path, *, decode_resumed: bool, progress: bool = True, on_step=None, session=None):
    """Yield every clip in order (``Hallo3Clip``), rendering with ``pipe`` those not yet persisted in
    ``parts_dir``; each fresh clip is persisted there as soon as it exists (the resume unit).
    ``on_step(clip_index, step, num_steps)`` runs after every denoising step (raise to cancel: the clips
    finished so far stay persisted). ``decode_resumed``: the clips' frames are wanted (persisted clips are
    decoded again, and the last clip too); False: latents only. ``session`` (``--parallel video``): every
    rank renders, rank 0 alone persists, and all resume from the clips rank 0 found."""
    from hallo3_cli.pipeline_hallo3 import num_clips
    from hallo3_cli.progress import Progress

    check_stages(preset, audio, reference)
    runtime = pipe.placement.runtime
    key = render_key(audio, reference, settings, preset, runtime)
    total = num_clips(audio.meta["num_frames"], preset.clip_length, preset.motion_frames)
    main = session is None or session.is_main
    if main:
        parts_dir.mkdir(parents=True, exist_ok=True)
    resumed = _finished_parts(parts_dir, key, total) if main else []
    if session is not None:
        count = session.agree(len(resumed))  # nothing is written until every rank has read them
        if not main:
            resumed = _finished_parts(parts_dir, key, count)
            if len(resumed) != count:
                raise Hallo3Error(f"rank 0 found {count} finished clips in {parts_dir}, this rank reads {len(resumed)} "
                                  "(every rank must see the same cache folder)")
    bar = Progress(progress and main, total, settings.steps, done=len(resumed))
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
        clips = pipe.generate_clips(
            audio_from_stage(audio), reference_from_stage(reference), seed=settings.seed,
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
            yield clip
    finally:
        bar.close()
        if main:
            with contextlib.suppress(OSError):
                parts_dir.rmdir()  # only if empty: a failed render leaves no empty .parts/ behind


def render_clips(audio: str | Path, reference: str | Path, output: str | Path, *, model: str | None = None,
                 seed: int = 42, steps: int | None = None, cfg: float | None = None, runtime: Runtime | None = None,
                 progress: bool = True, allow_download: bool = True, pipe=None, parallel=None) -> Path:
    """Stage files → clips file (latents of every clip). Resumable: finished clips are kept in
    ``<output>.parts/`` until the clips file is written. ``parallel`` (a
    :class:`~hallo3_cli.parallel.session.VideoParallel`): under torchrun, every process shares each
    denoiser call; rank 0 alone writes."""
    if parallel is not None:
        from hallo3_cli.parallel import session as parallel_session

        parallel_session.announce("preflight")
    (output,) = fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES)], inputs=[audio, reference])
    audio_stage = stages.load_stage(audio, stages.AUDIO, model=model)
    reference_stage = stages.load_stage(reference, stages.REFERENCE, model=model or audio_stage.model)
    preset = get_preset(audio_stage.model)
    settings = RenderSettings.for_preset(preset, seed, steps, cfg)
    session = _start_video(parallel, preset, runtime) if parallel is not None else None
    main = session is None or session.is_main
    if pipe is None:
        # an unusable device fails before any download
        runtime = session.runtime if session is not None else (runtime or Runtime()).resolved(preset)
        require_weights(preset, (stages.CLIPS,), allow_download, progress)
        pipe = _pipeline(preset, runtime, allow_download=allow_download, progress=progress,
                         parallel=session.config if session is not None else None)
    if main:
        _warn_random(preset)
    parts = output.with_name(output.name + ".parts")
    lock = job_lock(output.with_name(f".{output.name}.lock")) if main else contextlib.nullcontext()
    with session.guard() if session is not None else contextlib.nullcontext(), lock:
        latents = [clip.latents for clip in render_parts(pipe, preset, audio_stage, reference_stage, settings, parts,
                                                         decode_resumed=False, progress=progress, session=session)]
        if main:
            stages.save_stage(
                output,
                stages.CLIPS,
                {"latents": torch.stack(latents)},
                {
                    "model": preset.name, "weights": fingerprint(preset, stages.CLIPS),
                    "params": settings.params(pipe.placement.runtime),
                    "source_sha256": stages.source_digest(audio_stage.meta["source_sha256"], reference_stage.meta["source_sha256"]),
                    "num_frames": audio_stage.meta["num_frames"], "fps": preset.fps, "clip_length": preset.clip_length,
                    "motion_frames": preset.motion_frames, "framing": reference_stage.meta["framing"],
                    "height": preset.height, "width": preset.width,
                },
            )
            shutil.rmtree(parts, ignore_errors=True)
    if session is not None:
        session.close()
    return output


# ---------------------------------------------------------------------------------------------
# stitch


def stitch(clips: str | Path, output: str | Path, *, audio: str | Path, runtime: Runtime | None = None,
           progress: bool = True, pipe=None) -> Path:
    """Clips file + the original speech → mp4 (H.264 + AAC, 25 fps), streaming clip by clip."""
    from hallo3_cli.audio_io import audio_info
    from hallo3_cli.image_io import crop_box_for_output
    from hallo3_cli.progress import bar
    from hallo3_cli.video_io import VideoWriter

    (output,) = fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES)], inputs=[clips, audio])
    clip_stage = stages.load_stage(clips, stages.CLIPS)
    audio_info(audio)  # fail early, with the file named, on an unreadable recording
    preset = get_preset(clip_stage.model)
    require_weights(preset, (), extra=("vae",))
    meta = clip_stage.meta
    if (meta["height"], meta["width"]) != (preset.height, preset.width):
        raise StageFileError(f"holds {meta['width']}×{meta['height']} clips, the preset renders {preset.width}×{preset.height}", clips)
    # decode as the render did: its dtype, and its tiling (tiling changes the frames)
    runtime = runtime or Runtime()
    runtime = dataclasses.replace(runtime, dtype=clip_stage.params.get("dtype", runtime.dtype),
                                  vae_tiling=bool(clip_stage.params.get("vae_tiling", False)))
    pipe = pipe or _pipeline(preset, runtime)
    crop = crop_box_for_output(meta["framing"], meta["height"], meta["width"])
    latents = clip_stage["latents"]
    progress_bar = bar(progress, len(latents), "decode")
    with VideoWriter(output, meta["width"], meta["height"], fps=meta["fps"], audio=audio, crop=crop) as writer:
        remaining = meta["num_frames"]
        for clip in latents:
            frames = pipe.decode_latents(clip[None])[meta["motion_frames"]:]
            writer.write(frames[:remaining])
            remaining -= min(remaining, len(frames))
            progress_bar.update()
    progress_bar.close()
    return output


# ---------------------------------------------------------------------------------------------
# one-shot render: face + speech → mp4, stage files cached


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cached_stage(path: Path, kind, preset) -> stages.Stage | None:
    """A valid cached stage file, or None (a stale or corrupt one is simply rebuilt)."""
    if not path.exists():
        return None
    try:
        return stages.load_stage(path, kind, model=preset.name)
    except (StageFileError, InputError):
        return None


@dataclass
class Job:
    """One render job: a portrait, a speech recording, a prompt and where the video goes."""

    image: Path
    speech: Path
    output: Path
    prompt: str | None = None


class VideoRenderer:
    """Face + speech → mp4, with stage files cached in ``cache_dir``; one pipeline for many jobs."""

    def __init__(self, model: str = "hallo3", *, seed: int = 42, steps: int | None = None, cfg: float | None = None,
                 cache_dir: str | Path | None = None, separate_vocals: bool = False, progress: bool = True,
                 allow_download: bool = True, runtime: Runtime | None = None, parallel=None):
        self.preset = get_preset(model)
        self.settings = RenderSettings.for_preset(self.preset, seed, steps, cfg)
        extra = ("audio_separator",) if separate_vocals else ()
        # ``parallel`` (--parallel video): the split is checked and the process group joined first
        self.session = _start_video(parallel, self.preset, runtime) if parallel is not None else None
        # an unusable device fails before any download
        runtime = self.session.runtime if self.session is not None else (runtime or Runtime()).resolved(self.preset)
        require_weights(self.preset, (stages.AUDIO, stages.REFERENCE, stages.CLIPS), allow_download, progress, extra)
        self.pipe = _pipeline(self.preset, runtime, allow_download=allow_download, progress=progress,
                              parallel=self.session.config if self.session is not None else None)
        self.runtime = self.pipe.placement.runtime
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.separate_vocals = separate_vocals
        self.progress = progress
        if self.is_main:
            _warn_random(self.preset)

    @property
    def is_main(self) -> bool:
        """Whether this process writes (always, except on ranks > 0 of a ``--parallel video`` render)."""
        return self.session is None or self.session.is_main

    def close(self) -> None:
        """Leave the process group of a ``--parallel video`` renderer (after its last job)."""
        if self.session is not None:
            self.session.close()

    def cache_for(self, output: Path) -> Path:
        return self.cache_dir if self.cache_dir is not None else output.parent / ".hallo3-cache"

    def _audio_name(self, digest: str) -> str:
        return f"{_short_hash(digest, str(self.separate_vocals))}.{self.preset.name}.audio.safetensors"

    def _reference_name(self, digest: str, prompt: str) -> str:
        return (f"{_short_hash(digest, prompt, self.runtime.dtype, self.runtime.weights_dtype)}"
                f".{self.preset.name}.ref.safetensors")

    def audio_stage(self, speech: Path, cache: Path) -> stages.Stage:
        digest = fsutil.sha256_file(speech)
        name = self._audio_name(digest)
        path = cache / name
        with job_lock(cache / f".{name}.lock"):
            stage = _cached_stage(path, stages.AUDIO, self.preset)
            if stage is None or stage.meta["source_sha256"] != digest:
                log.info("embedding %s", speech)
                embed_audio(speech, path, model=self.preset, separate_vocals=self.separate_vocals,
                            progress=self.progress, pipe=self.pipe)
                self.pipe.release("audio_encoder")
                stage = stages.load_stage(path, stages.AUDIO, model=self.preset.name)
        return stage

    def reference_stage(self, image: Path, prompt: str | None, cache: Path) -> stages.Stage:
        prompt = self.preset.default_prompt if prompt is None else prompt
        digest = fsutil.sha256_file(image)
        name = self._reference_name(digest, prompt)
        path = cache / name
        with job_lock(cache / f".{name}.lock"):
            stage = _cached_stage(path, stages.REFERENCE, self.preset)
            if stage is None or stage.meta["source_sha256"] != digest or stage.meta["prompt"] != prompt:
                log.info("encoding %s", image)
                encode_reference(image, path, model=self.preset, prompt=prompt, pipe=self.pipe)
                stage = stages.load_stage(path, stages.REFERENCE, model=self.preset.name)
        return stage

    def stages_for(self, job: Job, cache: Path) -> tuple[stages.Stage, stages.Stage]:
        """The job's audio and reference stage files (cached). In a ``--parallel video`` render rank 0
        computes them, the others wait and read them from the cache (T5, wav2vec and the reference
        network run once); a failure there stops the job on every rank, reported by rank 0."""
        if self.session is None:
            return self.audio_stage(job.speech, cache), self.reference_stage(job.image, job.prompt, cache)
        failure = None
        if self.is_main:
            try:
                self.audio_stage(job.speech, cache)
                self.reference_stage(job.image, job.prompt, cache)
            except Hallo3Error as err:
                failure = err
        if not self.session.agree(0 if failure is not None else 1):
            from hallo3_cli.parallel.session import PeerStopped

            err = failure if failure is not None else PeerStopped(f"rank 0 could not prepare {job.output.name}")
            err.agreed = True  # every rank stops this job together
            raise err
        prompt = self.preset.default_prompt if job.prompt is None else job.prompt
        audio_path = cache / self._audio_name(fsutil.sha256_file(job.speech))
        reference_path = cache / self._reference_name(fsutil.sha256_file(job.image), prompt)
        return (stages.load_stage(audio_path, stages.AUDIO, model=self.preset.name),
                stages.load_stage(reference_path, stages.REFERENCE, model=self.preset.name))

    def render(self, job: Job, on_clip=None, on_step=None) -> Path:
        """Render one job into ``job.output`` (an mp4). ``on_clip(clip)`` sees each clip as it is written,
        ``on_step(clip_index, step, num_steps)`` each denoising step (raise from either to cancel: finished
        clips stay in the cache and the same render resumes from them)."""
        from hallo3_cli.audio_io import audio_info
        from hallo3_cli.image_io import crop_box_for_output, load_image
        from hallo3_cli.video_io import VideoWriter

        try:
            fsutil.require_file(job.image)
            fsutil.require_file(job.speech)
            (output,) = fsutil.check_outputs([(job.output, fsutil.VIDEO_SUFFIXES)], inputs=[job.image, job.speech])
            audio_info(job.speech)
            load_image(job.image)  # both inputs readable before anything is computed or cached
            cache = fsutil.ensure_output_folder(self.cache_for(output)) if self.is_main else self.cache_for(output)
        except Hallo3Error as err:
            err.agreed = True  # (--parallel video) every rank checks the same files: all skip this job together
            raise
        main = self.is_main
        with self.session.guard() if self.session is not None else contextlib.nullcontext():
            audio, reference = self.stages_for(job, cache)
            preset, settings = self.preset, self.settings
            key = render_key(audio, reference, settings, preset, self.runtime)
            parts = cache / f"{key}.parts"
            crop = crop_box_for_output(reference.meta["framing"], preset.height, preset.width)
            # ranks > 0 compute every clip with rank 0 but write nothing
            lock = job_lock(cache / f".{key}.lock") if main else contextlib.nullcontext()
            with lock, (VideoWriter(output, preset.width, preset.height, fps=preset.fps, audio=job.speech, crop=crop)
                        if main else contextlib.nullcontext()) as writer:
                remaining = audio.meta["num_frames"]
                for clip in render_parts(self.pipe, preset, audio, reference, settings, parts, decode_resumed=main,
                                         progress=self.progress, on_step=on_step, session=self.session):
                    if writer is not None:
                        frames = clip.frames[preset.motion_frames:][:remaining]
                        writer.write(frames)
                        remaining -= len(frames)
                    if on_clip is not None:
                        on_clip(clip)
        # The finished clips stay in the cache: the same render again only decodes them.
        return output


def render_video(image: str | Path, speech: str | Path, output: str | Path, *, model: str = "hallo3",
                 prompt: str | None = None, **options) -> Path:
    """Face + speech → mp4 in one call (see :class:`VideoRenderer` for the options)."""
    if options.get("parallel") is not None:
        from hallo3_cli.parallel import session as parallel_session

        parallel_session.announce("preflight")  # the checks below fail alike on every rank
    fsutil.require_file(image)
    fsutil.require_file(speech)
    # fail on typos, and on outputs that would destroy an input, before fetching or loading any weights
    fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES)], inputs=[image, speech])
    fsutil.check_output_folder(options.get("cache_dir") or Path(output).parent / ".hallo3-cache")
    renderer = VideoRenderer(model, **options)
    result = renderer.render(Job(Path(image), Path(speech), Path(output), prompt))
    renderer.close()
    return result


# ---------------------------------------------------------------------------------------------
# batch


def read_jobs(jobs_file: str | Path, out_dir: str | Path, seed: int) -> list[Job | Hallo3Error]:
    """Parse ``prompt@@image@@audio`` lines (the official input format). Relative paths resolve against
    the jobs file's folder. A malformed line becomes an error entry (reported, the others still run).

    The file must be UTF-8 (a byte-order mark is allowed). Outputs are named
    ``<image stem>-<audio stem>-seed_<seed>-<digest>.mp4``, the digest (8 hex) being that of the job's
    three fields: different jobs never share an output; a line repeating an earlier job is reported
    as an error entry instead of being rendered (or listed) twice.
    """
    jobs_file = fsutil.require_file(jobs_file)
    base = jobs_file.parent
    out_dir = Path(out_dir)
    raw = jobs_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the jobs file as UTF-8", jobs_file) from None
    jobs: list[Job | Hallo3Error] = []
    first_line: dict[Path, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("@@")
        if len(fields) != 3:
            jobs.append(InputError(f"line {number}: expected 'prompt@@image@@audio'", jobs_file))
            continue
        prompt, image, speech = (field.strip() for field in fields)
        image_path, speech_path = base / image, base / speech
        digest = hashlib.sha256("@@".join((prompt, image, speech)).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{image_path.stem[:80]}-{speech_path.stem[:80]}-seed_{seed}-{digest}.mp4"
        output = out_dir / name
        if output in first_line:
            jobs.append(InputError(f"line {number}: the same job as line {first_line[output]} (both would write {name}); skipped", jobs_file))
            continue
        first_line[output] = number
        jobs.append(Job(image_path, speech_path, output, prompt or None))
    for problem in (job for job in jobs if isinstance(job, Hallo3Error)):
        log.warning("%s", problem)  # pre-flight: said before any rendering (and again in the final summary)
    return jobs


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's share of ``items`` (round-robin by rank)."""
    return items[rank::world_size]


def render_batch(jobs_file: str | Path, out_dir: str | Path, *, model: str = "hallo3", seed: int = 42,
                 shard_jobs: bool = True, **options) -> tuple[list[Path], list[str]]:
    """Render every job of a jobs file (skipping finished outputs). Under ``torchrun`` the jobs are
    shared by rank (``RANK``/``WORLD_SIZE``; ``--parallel jobs``) unless ``shard_jobs`` is False
    (``--parallel none``) or ``parallel`` is given (``--parallel video``: every job on all processes,
    one after the other; only rank 0 writes and reports). Returns (written outputs, error messages)."""
    video = options.get("parallel") is not None
    if video:
        from hallo3_cli.parallel import session as parallel_session

        parallel_session.announce("preflight")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    jobs = read_jobs(jobs_file, out_dir, seed)  # a bad jobs file fails before out_dir exists
    if shard_jobs and not video:
        jobs = shard(jobs, rank, world)
    out_dir = fsutil.ensure_output_folder(out_dir)
    written, errors = [], []
    renderer = None
    for job in jobs:
        if isinstance(job, Hallo3Error):
            errors.append(str(job))
            continue
        if job.output.exists():
            log.info("%s exists, skipping", job.output)
            written.append(job.output)
            continue
        renderer = renderer or VideoRenderer(model, seed=seed, **options)  # missing weights stop the batch
        try:
            written.append(renderer.render(job))
        except Hallo3Error as err:
            if video and not getattr(err, "agreed", False):
                raise  # the ranks no longer agree on where they are: stop them all
            errors.append(str(err))
            if renderer.is_main:
                log.error("%s", err)
    if video:
        if renderer is not None:
            renderer.close()
        return (written, errors) if rank == 0 else ([], [])
    if world > 1 and shard_jobs:
        _wait_for_other_ranks()
    return written, errors


def _wait_for_other_ranks() -> None:
    """Under torchrun a rank that exits non-zero gets its siblings killed: wait until all are done."""
    import datetime

    import torch.distributed as dist

    if not os.environ.get("MASTER_ADDR"):
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    dist.barrier()
    dist.destroy_process_group()
