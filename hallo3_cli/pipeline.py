"""The public, high-level API behind the commands: each function is one command's work.

    from hallo3_cli.pipeline import render_video
    render_video("face.png", "speech.wav", "out.mp4", model="tiny-random")
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hallo3_cli import fsutil, stages
from hallo3_cli.errors import Hallo3Error, InputError, StageFileError
from hallo3_cli.presets import get_preset
from hallo3_cli.render import Renderer, RenderSettings, Runtime, job_lock, render_params

log = logging.getLogger("hallo3")


def _settings(preset, seed: int, steps: int | None, cfg: float | None) -> RenderSettings:
    return RenderSettings(seed=seed, steps=preset.steps if steps is None else steps, cfg=preset.cfg if cfg is None else cfg)


#: Components each stage needs (``models.toml`` folders), checked before anything is loaded.
AUDIO_COMPONENTS = ("wav2vec",)
REFERENCE_COMPONENTS = ("vae", "reference", "text_encoder", "tokenizer", "face_analysis")
RENDER_COMPONENTS = ("transformer", "vae")


def require_weights(preset, components, allow_download: bool = False, progress: bool = True) -> None:
    """Fail (or, if allowed, download) before loading anything when weights are missing."""
    from hallo3_cli.download import ensure_weights

    ensure_weights(preset, components, allow_download=allow_download, progress=progress)


def _warn_random(preset) -> None:
    if preset.is_random:
        log.warning("model preset %r has RANDOM weights: its output is noise (for tests and trials only)", preset.name)


# ---------------------------------------------------------------------------------------------
# encode-ref


def encode_reference(
    image: str | Path,
    output: str | Path,
    *,
    model: str = "hallo3",
    prompt: str | None = None,
    preview: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    runtime: Runtime | None = None,
) -> Path:
    """Portrait → reference stage file (face embedding and box, VAE latent, prompt, reference bank)."""
    from hallo3_cli.reference import ReferenceEncoder

    fsutil.require_file(image)
    fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES), (preview, fsutil.PREVIEW_SUFFIXES)], inputs=[image])
    preset = get_preset(model)
    renderer = Renderer(preset, device, dtype, runtime)  # an unusable device fails before any weights are checked
    require_weights(preset, REFERENCE_COMPONENTS)
    _warn_random(preset)
    encoder = ReferenceEncoder(renderer)
    return encoder.encode(image, output, prompt=prompt, preview=preview)


# ---------------------------------------------------------------------------------------------
# render from stage files → clips file


def render_clips(
    audio: str | Path,
    reference: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    seed: int = 42,
    steps: int | None = None,
    cfg: float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    allow_download: bool = True,
    runtime: Runtime | None = None,
    renderer: Renderer | None = None,
) -> Path:
    """Stage files → clips file (latents of every clip). Resumable: finished clips are kept in
    ``<output>.parts/`` until the clips file is written."""
    (output,) = fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES)], inputs=[audio, reference])
    audio_stage = stages.load_stage(audio, stages.AUDIO, model=model)
    reference_stage = stages.load_stage(reference, stages.REFERENCE, model=model or audio_stage.model)
    preset = get_preset(audio_stage.model)
    settings = _settings(preset, seed, steps, cfg)
    renderer = renderer or Renderer(preset, device, dtype, runtime)  # an unusable device fails before any download
    require_weights(preset, RENDER_COMPONENTS, allow_download, progress)
    _warn_random(preset)
    parts = output.with_name(output.name + ".parts")
    with job_lock(output.with_name(f".{output.name}.lock")):
        latents = [clip.latents for clip in renderer.clips(audio_stage, reference_stage, settings, parts, decode_resumed=False, progress=progress)]
        stages.save_stage(
            output,
            stages.CLIPS,
            {"latents": torch.stack(latents)},
            {
                "model": preset.name,
                "weights": renderer.weights,
                "params": render_params(settings, renderer.dtype, renderer.runtime),
                "source_sha256": stages.source_digest(audio_stage.meta["source_sha256"], reference_stage.meta["source_sha256"]),
                "num_frames": audio_stage.meta["num_frames"],
                "fps": preset.fps,
                "clip_length": preset.clip_length,
                "motion_frames": preset.motion_frames,
                "framing": reference_stage.meta["framing"],
                "height": preset.height,
                "width": preset.width,
            },
        )
        shutil.rmtree(parts, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------
# stitch


def stitch(
    clips: str | Path,
    output: str | Path,
    *,
    audio: str | Path,
    device: str = "auto",
    progress: bool = True,
    runtime: Runtime | None = None,
    renderer: Renderer | None = None,
) -> Path:
    """Clips file + the original speech → mp4 (H.264 + AAC, 25 fps), streaming clip by clip."""
    from hallo3_cli.audio_io import audio_info
    from hallo3_cli.image_io import crop_box_for_output
    from hallo3_cli.video_io import VideoWriter

    (output,) = fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES)], inputs=[clips, audio])
    clip_stage = stages.load_stage(clips, stages.CLIPS)
    audio_info(audio)  # fail early, with the file named, on an unreadable recording
    preset = get_preset(clip_stage.model)
    require_weights(preset, ("vae",))
    meta = clip_stage.meta
    dtype = clip_stage.params.get("dtype", "auto")
    tiling = bool(clip_stage.params.get("vae_tiling", False))  # decode as the render did: tiling changes the frames
    runtime = Runtime(vae_tiling=tiling) if runtime is None else dataclasses.replace(runtime, vae_tiling=tiling)
    renderer = renderer or Renderer(preset, device, dtype, runtime)
    if (meta["height"], meta["width"]) != (preset.height, preset.width):
        raise StageFileError(f"holds {meta['width']}×{meta['height']} clips, the preset renders {preset.width}×{preset.height}", clips)
    crop = crop_box_for_output(meta["framing"], meta["height"], meta["width"])
    latents = clip_stage["latents"]
    bar = _bar(progress, len(latents), "decode")
    with VideoWriter(output, meta["width"], meta["height"], fps=meta["fps"], audio=audio, crop=crop) as writer:
        remaining = meta["num_frames"]
        for clip in latents:
            frames = renderer.decode(clip[None])[meta["motion_frames"]:]
            writer.write(frames[:remaining])
            remaining -= min(remaining, len(frames))
            bar.update()
    bar.close()
    return output


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr, disable=not enabled)


# ---------------------------------------------------------------------------------------------
# one-shot render: face + speech → mp4


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cached_stage(path: Path, kind, preset, weights: str | None = None) -> stages.Stage | None:
    """A valid cached stage file, or None (a stale or corrupt one is simply rebuilt)."""
    if not path.exists():
        return None
    try:
        return stages.load_stage(path, kind, model=preset.name, weights=weights)
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
    """Face + speech → mp4, with stage files cached in ``cache_dir``; models load once for many jobs."""

    def __init__(
        self,
        model: str = "hallo3",
        *,
        seed: int = 42,
        steps: int | None = None,
        cfg: float | None = None,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | Path | None = None,
        separate_vocals: bool = False,
        progress: bool = True,
        allow_download: bool = True,
        runtime: Runtime | None = None,
    ):
        from hallo3_cli.reference import ReferenceEncoder

        self.preset = get_preset(model)
        self.settings = _settings(self.preset, seed, steps, cfg)
        needed = AUDIO_COMPONENTS + REFERENCE_COMPONENTS + RENDER_COMPONENTS + (("audio_separator",) if separate_vocals else ())
        self.renderer = Renderer(self.preset, device, dtype, runtime)  # an unusable device fails before any download
        require_weights(self.preset, needed, allow_download, progress)
        self.references = ReferenceEncoder(self.renderer)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.separate_vocals = separate_vocals
        self.progress = progress
        self._audio_encoder = None
        _warn_random(self.preset)

    def cache_for(self, output: Path) -> Path:
        return self.cache_dir if self.cache_dir is not None else output.parent / ".hallo3-cache"

    def audio_stage(self, speech: Path, cache: Path) -> stages.Stage:
        from hallo3_cli.audio import embed_audio_file

        digest = fsutil.sha256_file(speech)
        name = f"{_short_hash(digest, str(self.separate_vocals))}.{self.preset.name}.audio.safetensors"
        path = cache / name
        with job_lock(cache / f".{name}.lock"):
            stage = _cached_stage(path, stages.AUDIO, self.preset)
            if stage is None or stage.meta["source_sha256"] != digest:
                log.info("embedding %s", speech)
                embed_audio_file(speech, path, model=self.preset.name, separate_vocals=self.separate_vocals,
                                 device=self.renderer.device, progress=self.progress)
                stage = stages.load_stage(path, stages.AUDIO, model=self.preset.name)
        return stage

    def reference_stage(self, image: Path, prompt: str | None, cache: Path) -> stages.Stage:
        prompt = self.preset.default_prompt if prompt is None else prompt
        digest = fsutil.sha256_file(image)
        dtype = str(self.renderer.dtype).removeprefix("torch.")
        name = f"{_short_hash(digest, prompt, dtype, self.renderer.runtime.weights_dtype)}.{self.preset.name}.ref.safetensors"
        path = cache / name
        with job_lock(cache / f".{name}.lock"):
            stage = _cached_stage(path, stages.REFERENCE, self.preset)
            if stage is None or stage.meta["source_sha256"] != digest or stage.meta["prompt"] != prompt:
                log.info("encoding %s", image)
                self.references.encode(image, path, prompt=prompt)
                self.references.release()
                stage = stages.load_stage(path, stages.REFERENCE, model=self.preset.name)
        return stage

    def render(self, job: Job) -> Path:
        """Render one job into ``job.output`` (an mp4)."""
        from hallo3_cli.audio_io import audio_info
        from hallo3_cli.image_io import crop_box_for_output
        from hallo3_cli.video_io import VideoWriter

        fsutil.require_file(job.image)
        fsutil.require_file(job.speech)
        (output,) = fsutil.check_outputs([(job.output, fsutil.VIDEO_SUFFIXES)], inputs=[job.image, job.speech])
        audio_info(job.speech)
        cache = fsutil.ensure_output_folder(self.cache_for(output))
        audio = self.audio_stage(job.speech, cache)
        reference = self.reference_stage(job.image, job.prompt, cache)
        preset, settings = self.preset, self.settings
        key = self.renderer.key(audio, reference, settings)
        parts = cache / f"{key}.parts"
        crop = crop_box_for_output(reference.meta["framing"], preset.height, preset.width)
        with job_lock(cache / f".{key}.lock"):
            with VideoWriter(output, preset.width, preset.height, fps=preset.fps, audio=job.speech, crop=crop) as writer:
                remaining = audio.meta["num_frames"]
                for clip in self.renderer.clips(audio, reference, settings, parts, decode_resumed=True, progress=self.progress):
                    frames = clip.frames[preset.motion_frames:][:remaining]
                    writer.write(frames)
                    remaining -= len(frames)
        # The finished clips stay in the cache: the same render again only decodes them.
        return output


def render_video(
    image: str | Path,
    speech: str | Path,
    output: str | Path,
    *,
    model: str = "hallo3",
    prompt: str | None = None,
    **options,
) -> Path:
    """Face + speech → mp4 in one call (see :class:`VideoRenderer` for the options)."""
    fsutil.require_file(image)
    fsutil.require_file(speech)
    # fail on typos, and on outputs that would destroy an input, before fetching or loading any weights
    fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES)], inputs=[image, speech])
    fsutil.check_output_folder(options.get("cache_dir") or Path(output).parent / ".hallo3-cache")
    return VideoRenderer(model, **options).render(Job(Path(image), Path(speech), Path(output), prompt))


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


def render_batch(jobs_file: str | Path, out_dir: str | Path, *, model: str = "hallo3", seed: int = 42, **options) -> tuple[list[Path], list[str]]:
    """Render every job of a jobs file (skipping finished outputs). Under ``torchrun`` the jobs are
    shared by rank (``RANK``/``WORLD_SIZE``). Returns (written outputs, error messages)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    jobs = shard(read_jobs(jobs_file, out_dir, seed), rank, world)  # a bad jobs file fails before out_dir exists
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
            errors.append(str(err))
            log.error("%s", err)
    if world > 1:
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
