"""The one-shot render: face + speech → mp4, with the stage files and finished clips cached
(``.hallo3-cache/`` next to the output, or ``--cache-dir``) so that changing only the seed re-uses the audio
and the reference, and rendering the same thing again only decodes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hallo3_cli import fsutil, geometry, stages
from hallo3_cli.errors import Hallo3Error, InputError, StageFileError
from hallo3_cli.jobs.commands import embed_audio, encode_reference
from hallo3_cli.jobs.common import (RenderSettings, check_arguments, check_settings, job_lock, preset_argument, require_weights,
                                    start_video, warn_random)
from hallo3_cli.jobs.resume import render_key, render_parts
from hallo3_cli.loading import LoraWeights, PipelineLoader, resolve_runtime
from hallo3_cli.runtime import Runtime

log = logging.getLogger("hallo3")


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
    """Face + speech → mp4, with stage files cached in ``cache_dir``; one pipeline for many jobs. ``loader``: the
    pipeline to render with (a :class:`~hallo3_cli.loading.PipelineLoader` of the same preset, e.g. over a
    trainer's in-memory pipeline; its runtime is used), else one is made for ``runtime``."""

    def __init__(self, model: str = "hallo3", *, seed: int = 42, steps: int | None = None, cfg: float | None = None,
                 cache_dir: str | Path | None = None, separate_vocals: bool = False, progress: bool = True,
                 allow_download: bool = True, runtime: Runtime | None = None, parallel=None,
                 lora: LoraWeights | None = None, loader: PipelineLoader | None = None):
        self.preset = preset_argument(model)
        if loader is not None and (loader.preset.name != self.preset.name or parallel is not None or lora is not None):
            raise ValueError("a given loader must be of the same model preset, without parallel or lora (the "
                             "loader's pipeline is used as it is)")
        self.settings = RenderSettings.for_preset(self.preset, seed, steps, cfg, lora)
        check_arguments(runtime=runtime, flags={"separate_vocals": separate_vocals})
        cache_dir = fsutil.path_argument(cache_dir, "cache_dir", optional=True)
        extra = ("audio_separator",) if separate_vocals else ()
        # ``parallel`` (--parallel video): the split is checked and the process group joined first
        self.session = start_video(parallel, self.preset, runtime) if parallel is not None else None
        # an unusable device fails before any download
        if loader is None:
            runtime = self.session.runtime if self.session is not None else resolve_runtime(runtime, self.preset)
        require_weights(self.preset, (stages.AUDIO, stages.REFERENCE, stages.CLIPS), allow_download, progress, extra)
        self.loader = loader or PipelineLoader(self.preset, runtime,
                                               parallel=self.session.config if self.session is not None else None,
                                               lora=lora)
        self.runtime = self.loader.runtime
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.separate_vocals = separate_vocals
        self.progress = progress
        if self.is_main:
            warn_random(self.preset)

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
        return f"{_short_hash(digest, str(self.separate_vocals))}.{self.preset.slug}.audio.safetensors"

    def _reference_name(self, digest: str, prompt: str) -> str:
        lora = self.loader.lora.reference_identity() if self.loader.lora is not None else None
        keys = (digest, prompt, self.runtime.dtype, self.runtime.weights_dtype) + ((json.dumps(lora, sort_keys=True),) if lora else ())
        return f"{_short_hash(*keys)}.{self.preset.slug}.ref.safetensors"

    def audio_stage(self, speech: Path, cache: Path) -> stages.Stage:
        digest = fsutil.sha256_file(speech)
        name = self._audio_name(digest)
        path = cache / name
        with job_lock(cache / f".{name}.lock"):
            stage = _cached_stage(path, stages.AUDIO, self.preset)
            if stage is None or stage.meta["source_sha256"] != digest:
                log.info("embedding %s", speech)
                embed_audio(speech, path, model=self.preset, separate_vocals=self.separate_vocals,
                            progress=self.progress, loader=self.loader)
                self.loader.release("audio_encoder")
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
                encode_reference(image, path, model=self.preset, prompt=prompt, loader=self.loader, lora=self.loader.lora)
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
            from hallo3_cli.jobs.parallel_session import PeerStopped

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
            fsutil.check_output_folder(self.cache_for(output), outputs=[output], inputs=[job.image, job.speech])
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
            record = cache / f"{key}.video.json"
            # ranks > 0 compute every clip with rank 0 but write nothing
            lock = job_lock(cache / f".{key}.lock") if main else contextlib.nullcontext()
            with lock:
                if self.session is None and on_clip is None and _unchanged(output, record):
                    log.info("%s is already this render (same inputs and settings, unchanged since it was written): "
                             "nothing to do", output)
                    return output
                tag = {"model": preset.name, "render_key": key}
                with (VideoWriter(output, preset.width, preset.height, fps=preset.fps, audio=job.speech, crop=crop,
                                  tag=tag) if main else contextlib.nullcontext()) as writer:
                    remaining = audio.meta["num_frames"]
                    for clip in render_parts(self.loader, audio, reference, settings, parts, decode_resumed=main,
                                             progress=self.progress, on_step=on_step, session=self.session):
                        if writer is not None:
                            frames = geometry.new_frames(clip.frames, preset.motion_frames, remaining)
                            writer.write(frames)
                            remaining -= len(frames)
                        if on_clip is not None:
                            on_clip(clip)
                if main:
                    _remember(output, record)
        # The finished clips stay in the cache: the same render again only decodes them, and while the video is
        # still the one written (the record's digest) not even that.
        return output


def _remember(video: Path, record: Path) -> None:
    """Write down (``<render key>.video.json`` in the cache) which bytes this render made: size and sha256."""
    import json

    try:
        with fsutil.atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"size": video.stat().st_size, "sha256": fsutil.sha256_file(video)}) + "\n")
    except (OSError, Hallo3Error) as err:  # only an optimisation: the video itself is written
        log.warning("could not record the finished render in the cache (%s)", err)


def _unchanged(video: Path, record: Path) -> bool:
    """Whether ``video`` is exactly the file this render wrote before (same size and sha256 as its record):
    then rendering again would decode every clip to rewrite identical bytes."""
    import json

    try:
        if not video.is_file() or not record.is_file():
            return False
        known = json.loads(record.read_text())
        return (isinstance(known, dict) and known.get("size") == video.stat().st_size
                and known.get("sha256") == fsutil.sha256_file(video))
    except (OSError, ValueError):
        return False


def render_video(image: str | Path, speech: str | Path, output: str | Path, *, model: str = "hallo3",
                 prompt: str | None = None, **options) -> Path:
    """Face + speech → mp4 in one call (see :class:`VideoRenderer` for the options)."""
    if options.get("parallel") is not None:
        from hallo3_cli.jobs.parallel_session import announce

        announce("preflight")  # the checks below fail alike on every rank
    image, speech = fsutil.path_argument(image, "image"), fsutil.path_argument(speech, "speech")
    output = fsutil.path_argument(output, "output")
    fsutil.require_file(image)
    fsutil.require_file(speech)
    check_arguments(prompt=prompt, runtime=options.get("runtime"))
    check_settings(options.get("seed", 42), options.get("steps"), options.get("cfg"))
    preset_argument(model)
    cache_dir = fsutil.path_argument(options.get("cache_dir"), "cache_dir", optional=True)
    # fail on typos, and on outputs that would destroy an input, before fetching or loading any weights
    fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES)], inputs=[image, speech])
    fsutil.check_output_folder(cache_dir or output.parent / ".hallo3-cache", outputs=[output], inputs=[image, speech])
    renderer = VideoRenderer(model, **options)
    result = renderer.render(Job(Path(image), Path(speech), Path(output), prompt))
    renderer.close()
    return result
