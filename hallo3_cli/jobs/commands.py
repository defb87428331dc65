"""The commands' work on top of ``Hallo3Pipeline``, each writing stage files: ``embed-audio``, ``encode-ref``,
``render --audio A --ref R`` (a clips file) and ``stitch``. The CLI only parses arguments and calls them::

    from hallo3_cli.jobs import embed_audio
    embed_audio("speech.wav", "speech.audio.safetensors", model="tiny-random")

Networks load when a stage needs them (:class:`~hallo3_cli.loading.PipelineLoader`); T5 and the reference network
are freed as soon as their outputs exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import torch

from hallo3_cli import fsutil, geometry, stages
from hallo3_cli.errors import StageFileError
from hallo3_cli.jobs.common import (RenderSettings, check_arguments, check_settings, fingerprint, job_lock, preset_argument,
                                    require_weights, start_video, warn_random)
from hallo3_cli.jobs.resume import render_parts
from hallo3_cli.loading import LoraWeights, PipelineLoader, resolve_runtime
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.runtime import Runtime


# ---------------------------------------------------------------------------------------------
# embed-audio


def embed_audio(speech: str | Path, output: str | Path, *, model: str | Preset = "hallo3", separate_vocals: bool = False,
                device: str = "auto", progress: bool = True, loader: PipelineLoader | None = None) -> Path:
    """Decode ``speech``, optionally isolate the voice, compute the features and write an audio stage file."""
    from hallo3_cli import vocals

    speech = fsutil.require_file(fsutil.path_argument(speech, "speech"))
    check_arguments(flags={"separate_vocals": separate_vocals})
    (output,) = fsutil.check_outputs([(fsutil.path_argument(output, "output"), fsutil.STAGE_SUFFIXES)], inputs=[speech])
    preset = preset_argument(model)
    separator_path = vocals.find_separator_model(preset) if separate_vocals else None
    # only the device matters (wav2vec2 goes straight onto it): no memory mode to plan; an unusable device
    # fails before any weights are checked
    runtime = resolve_runtime(Runtime(device=device, offload="none"), preset)
    require_weights(preset, (stages.AUDIO,))
    pipe = (loader or PipelineLoader(preset, runtime)).need("feature_extractor", "audio_encoder")
    features = speech_features(pipe, speech, separator_path=separator_path, progress=progress)
    return write_audio(features, output, preset, pipe, source_sha256=fsutil.sha256_file(speech),
                       separate_vocals=separate_vocals)


def speech_features(pipe, speech: str | Path, *, separator_path: Path | None = None, progress: bool = True,
                    pad_to_clips: bool = True):
    """The speech features of a recording (or of a video's sound track) as ``embed-audio`` computes them: decoded,
    the voice isolated first with the separator model at ``separator_path`` if given, then wav2vec
    (:meth:`~hallo3_cli.pipeline_hallo3.Hallo3Pipeline.encode_audio`; ``pad_to_clips=False``: the training
    data's unpadded features)."""
    from hallo3_cli import vocals
    from hallo3_cli.audio_io import SAMPLE_RATE, load_audio, resample

    if separator_path is not None:
        mix = load_audio(speech, vocals.SEPARATOR_SAMPLE_RATE, mono=False)
        voice = vocals.separate_vocals(mix, separator_path, progress=progress)
        source = resample(voice.mean(axis=0), vocals.SEPARATOR_SAMPLE_RATE, SAMPLE_RATE)
    else:
        source = load_audio(speech, SAMPLE_RATE)
    return pipe.encode_audio(source, progress=progress, pad_to_clips=pad_to_clips)


def write_audio(features, output: str | Path, preset: Preset, pipe, *, source_sha256: str, separate_vocals: bool,
                pad_to_clips: bool = True) -> Path:
    """An audio stage file of :func:`speech_features`' result."""
    from hallo3_cli.audio import CONTEXT_SECONDS, WINDOW_SECONDS
    from hallo3_cli.audio_io import SAMPLE_RATE

    params = {
        "fps": preset.fps, "clip_length": preset.clip_length, "sample_rate": SAMPLE_RATE,
        "normalize": bool(pipe.feature_extractor.do_normalize), "separate_vocals": bool(separate_vocals),
        "window_seconds": WINDOW_SECONDS, "context_seconds": CONTEXT_SECONDS,
    }
    if not pad_to_clips:  # only then: the params of embed-audio's files key renders, and stay as they were
        params["pad_to_clips"] = False
    meta = {
        "model": preset.name, "weights": fingerprint(preset, stages.AUDIO, params), "params": params,
        "source_sha256": source_sha256, "fps": preset.fps, "num_frames": features.num_frames,
        "clip_length": preset.clip_length, "sample_rate": SAMPLE_RATE,
    }
    return stages.save_stage(output, stages.AUDIO, {"features": features.features}, meta)


# ---------------------------------------------------------------------------------------------
# encode-ref


def encode_reference(image: str | Path, output: str | Path, *, model: str | Preset = "hallo3", prompt: str | None = None,
                     preview: str | Path | None = None, runtime: Runtime | None = None,
                     loader: PipelineLoader | None = None, lora: LoraWeights | None = None) -> Path:
    """Portrait → reference stage file (face embedding and box, VAE latent, prompt, reference bank). ``lora``: the
    adapters of a fine-tuned run (they change the bank when the run adapted the reference network)."""
    from hallo3_cli.image_io import image_format, write_preview

    image = fsutil.require_file(fsutil.path_argument(image, "image"))
    check_arguments(prompt=prompt, runtime=runtime)
    output, *_ = fsutil.check_outputs([(fsutil.path_argument(output, "output"), fsutil.STAGE_SUFFIXES),
                                       (fsutil.path_argument(preview, "preview", optional=True), fsutil.PREVIEW_SUFFIXES)],
                                      inputs=[image])
    image_format(image)  # by content, before any model work (load_image checks it again before decoding)
    preset = preset_argument(model)
    if loader is None:
        runtime = resolve_runtime(runtime, preset)  # an unusable device fails before any weights are checked
        require_weights(preset, (stages.REFERENCE,))
        loader = PipelineLoader(preset, runtime, lora=lora)
    warn_random(preset)
    reference = reference_of(loader, image, prompt)
    # All or nothing: the preview is written to its temporary name first and renamed into place only once
    # the stage file is written.
    with fsutil.atomic_path(preview) if preview is not None else contextlib.nullcontext() as preview_tmp:
        if preview_tmp is not None:
            write_preview(preview_tmp, reference.image, reference.mask, reference.face_box.tolist())
        return write_reference(reference, output, preset, loader.runtime, fsutil.sha256_file(image), loader.lora)


def reference_of(loader: PipelineLoader, image, prompt: str | None):
    """The pipeline's ``encode_reference``, frugally: each network loaded when its step comes and T5-XXL freed
    before the reference DiT loads (both are needed once per portrait, then freed)."""
    portrait = loader.need("face_analyzer").frame_portrait(image)
    prompt = loader.preset.default_prompt if prompt is None else prompt
    prompt_embeds = loader.need("tokenizer", "text_encoder").encode_prompt(prompt)
    loader.release("text_encoder")
    pipe = loader.need("vae", "reference_net")
    reference = pipe.encode_reference(image, prompt, prompt_embeds=prompt_embeds, portrait=portrait)
    loader.release("reference_net")
    return reference


def write_reference(reference, output: Path, preset: Preset, runtime: Runtime, source_sha256: str,
                    lora: LoraWeights | None = None) -> Path:
    params = {"height": preset.height, "width": preset.width, "reference_seed": 0, "dtype": runtime.dtype,
              "weights_dtype": runtime.weights_dtype}
    if lora is not None and lora.reference_identity() is not None:
        params["lora"] = lora.reference_identity()
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
# render --audio --ref: a clips file


def render_clips(audio: str | Path, reference: str | Path, output: str | Path, *, model: str | None = None,
                 seed: int = 42, steps: int | None = None, cfg: float | None = None, runtime: Runtime | None = None,
                 progress: bool = True, allow_download: bool = True, loader: PipelineLoader | None = None,
                 parallel=None, lora: LoraWeights | None = None) -> Path:
    """Stage files → clips file (latents of every clip). Resumable: finished clips are kept in
    ``<output>.parts/`` until the clips file is written. ``parallel`` (a
    :class:`~hallo3_cli.jobs.parallel_session.VideoParallel`): under torchrun, every process shares each
    denoiser call; rank 0 alone writes."""
    if parallel is not None:
        from hallo3_cli.jobs.parallel_session import announce

        announce("preflight")
    audio, reference = fsutil.path_argument(audio, "audio"), fsutil.path_argument(reference, "reference")
    check_arguments(runtime=runtime)
    check_settings(seed, steps, cfg)
    if model is not None:
        model = preset_argument(model).name
    (output,) = fsutil.check_outputs([(fsutil.path_argument(output, "output"), fsutil.STAGE_SUFFIXES)], inputs=[audio, reference])
    # the side paths too, before any work: finished clips beside the output, and its lock file
    parts, lock_path = clips_side_paths(output)
    fsutil.check_output_folder(parts, outputs=[output], inputs=[audio, reference])
    fsutil.check_output_path(lock_path)
    audio_stage = stages.load_stage(audio, stages.AUDIO, model=model)
    reference_stage = stages.load_stage(reference, stages.REFERENCE, model=model or audio_stage.model)
    preset = get_preset(audio_stage.model)
    settings = RenderSettings.for_preset(preset, seed, steps, cfg, lora)
    session = start_video(parallel, preset, runtime) if parallel is not None else None
    main = session is None or session.is_main
    if loader is None:
        # an unusable device fails before any download
        runtime = session.runtime if session is not None else resolve_runtime(runtime, preset)
        require_weights(preset, (stages.CLIPS,), allow_download, progress)
        loader = PipelineLoader(preset, runtime, parallel=session.config if session is not None else None, lora=lora)
    if main:
        warn_random(preset)
    lock = job_lock(lock_path) if main else contextlib.nullcontext()
    with session.guard() if session is not None else contextlib.nullcontext(), lock:
        latents = [clip.latents for clip in render_parts(loader, audio_stage, reference_stage, settings, parts,
                                                         decode_resumed=False, progress=progress, session=session)]
        if main:
            stages.save_stage(
                output,
                stages.CLIPS,
                {"latents": torch.stack(latents)},
                {
                    "model": preset.name, "weights": fingerprint(preset, stages.CLIPS),
                    "params": settings.params(loader.runtime),
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


def clips_side_paths(output: str | Path) -> tuple[Path, Path]:
    """Where a clips file's render keeps its finished clips (``<name>.parts/``) and its lock
    (``.<name>.lock``), beside it; shortened with a digest when a long output name would not fit."""
    return fsutil.side_path(output, suffix=".parts"), fsutil.side_path(output, prefix=".", suffix=".lock")


# ---------------------------------------------------------------------------------------------
# stitch


def stitch(clips: str | Path, output: str | Path, *, audio: str | Path, runtime: Runtime | None = None,
           progress: bool = True, loader: PipelineLoader | None = None) -> Path:
    """Clips file + the original speech → mp4 (H.264 + AAC, 25 fps), streaming clip by clip."""
    from hallo3_cli.audio_io import audio_info
    from hallo3_cli.image_io import crop_box_for_output
    from hallo3_cli.progress import bar
    from hallo3_cli.video_io import VideoWriter

    clips, audio = fsutil.path_argument(clips, "clips"), fsutil.path_argument(audio, "audio")
    check_arguments(runtime=runtime)
    (output,) = fsutil.check_outputs([(fsutil.path_argument(output, "output"), fsutil.VIDEO_SUFFIXES)], inputs=[clips, audio])
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
    pipe = (loader or PipelineLoader(preset, runtime)).need("vae")
    crop = crop_box_for_output(meta["framing"], meta["height"], meta["width"])
    latents = clip_stage["latents"]
    progress_bar = bar(progress, len(latents), "decode")
    with VideoWriter(output, meta["width"], meta["height"], fps=meta["fps"], audio=audio, crop=crop) as writer:
        remaining = meta["num_frames"]
        for clip in latents:
            frames = geometry.new_frames(pipe.decode_latents(clip[None]), meta["motion_frames"], remaining)
            writer.write(frames)
            remaining -= len(frames)
            progress_bar.update()
    progress_bar.close()
    return output
