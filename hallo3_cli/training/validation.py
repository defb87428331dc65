"""Validation renders while training (issue 20, "Watchable"): the held-out portrait and speech rendered with the
networks being trained, through ``hallo3 render``'s own code path (:class:`~hallo3_cli.jobs.VideoRenderer` over
the trainer's in-memory pipeline), and scored with ``hallo3 eval`` (:func:`~hallo3_cli.evaluate.evaluate_video`)::

    result = validate(pipe, run_dir, step, portrait="face.jpg", speech="speech.wav", model="hallo3")
    log_scores(writer, result)    # TensorBoard: validation/sync_c, sync_d, av_offset, identity, face_ratio

In the run folder::

    validation/speech.wav               the held-out speech, cut to the rendered length (16 kHz mono)
    validation/step-000500.mp4          the render at step 500
    validation/step-000500.eval.json    its scores (``hallo3 eval --json``'s object, plus the step), or why not scored

A render is short (its first clip by default) and never stops the training for want of scores: when the scoring
networks are not available (offline, not downloaded) or the video cannot be scored (no face found), the result
says "not scored: <why>".
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import wave
from pathlib import Path

from hallo3_cli import fsutil
from hallo3_cli.errors import ArgumentError, Hallo3Error, reason

VALIDATION = "validation"
SPEECH = "speech.wav"
#: The scores ``validate`` returns (None when not measured) and :func:`log_scores` writes, from ``hallo3 eval``'s
#: JSON: Sync-C, Sync-D, AV offset (frames), identity (mean ArcFace cosine to the portrait), share of frames with a face.
SCORES = {"sync_c": "sync_confidence", "sync_d": "sync_distance", "av_offset": "av_offset_frames",
          "identity": "identity_similarity", "face_ratio": "face_ratio"}


def validation_paths(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """Where the render of ``step`` and its scores go: ``run_dir/validation/step-{step:06d}.mp4`` and
    ``….eval.json`` beside it (the name ``hallo3 render --eval`` gives)."""
    from hallo3_cli.evaluate import eval_path

    video = Path(run_dir) / VALIDATION / f"step-{step:06d}.mp4"
    return video, eval_path(video)


def _check(step, max_seconds, seed) -> None:
    for name, value in (("step", step), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ArgumentError(f"{name} must be an integer >= 0, got {value!r}")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not math.isfinite(max_seconds) or max_seconds <= 0):
        raise ArgumentError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")


def write_held_out_speech(speech: Path, target: Path, frames: int, fps: int) -> Path:
    """The first ``frames`` video frames' worth of ``speech`` (all of it if shorter) as a 16 kHz mono 16-bit wav,
    written atomically: what the validation renders, muxes and scores."""
    from hallo3_cli.audio_io import SAMPLE_RATE, load_audio
    from hallo3_cli.evaluate.mfcc import to_pcm16

    samples = load_audio(speech, SAMPLE_RATE)[: frames * SAMPLE_RATE // fps]
    with fsutil.atomic_path(target) as tmp, wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(to_pcm16(samples).tobytes())
    return target


def _runtime_of(pipe):
    """The runtime the pipeline's networks are in: its device and the DiT's dtype, nothing offloaded."""
    from hallo3_cli.runtime import Runtime, dtype_name

    return Runtime(device=str(pipe.execution_device), dtype=dtype_name(pipe.transformer.dtype), offload="none")


@contextlib.contextmanager
def _eval_mode(pipe):
    """The pipeline's networks in eval mode for the render, their train/eval flags restored after."""
    modules = [m for m in pipe.components.values() if hasattr(m, "training") and hasattr(m, "modules")]
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in flags:
            sub.training = training


def validate(pipe, run_dir: str | Path, step: int, *, portrait: str | Path, speech: str | Path, model,
             seed: int = 0, num_inference_steps: int | None = None, guidance_scale: float | None = None,
             max_seconds: float | None = None, prompt: str | None = None, score: bool = True,
             progress: bool = False) -> dict:
    """Render ``portrait`` + ``speech`` with ``pipe`` (a :class:`~hallo3_cli.Hallo3Pipeline` holding the networks
    being trained; ``model``: its preset, a name or :class:`~hallo3_cli.presets.Preset`) as ``hallo3 render`` does,
    into ``run_dir/validation/step-{step:06d}.mp4``, and score it with ``hallo3 eval``.

    ``max_seconds``: how much of the speech (default: one clip, 47 new frames at 25 fps = 1.88 s); ``seed``,
    ``num_inference_steps``, ``guidance_scale``, ``prompt``: the render's (None: the preset's). ``score=False``
    renders only. Components ``pipe`` lacks (T5, wav2vec, face models) load from the preset for the render and are
    freed after; its own stay as they are (the networks' train/eval modes are restored). Call it on one process.

    Returns ``{"step", "video", "scores" (the JSON's path), "sync_c", "sync_d", "av_offset", "identity",
    "face_ratio", "not_scored"}``: the numbers None and ``not_scored`` the reason when not scored.
    """
    from hallo3_cli.jobs import Job, VideoRenderer
    from hallo3_cli.jobs.common import preset_argument
    from hallo3_cli.loading import PipelineLoader

    _check(step, max_seconds, seed)
    portrait = fsutil.require_file(fsutil.path_argument(portrait, "portrait"))
    speech = fsutil.require_file(fsutil.path_argument(speech, "speech"))
    preset = preset_argument(model)
    video, scores_path = validation_paths(fsutil.path_argument(run_dir, "run_dir"), step)
    held_out = video.parent / SPEECH
    folder = fsutil.ensure_output_folder(video.parent)
    fsutil.check_outputs([(video, fsutil.VIDEO_SUFFIXES), (scores_path, (".json",)), (held_out, (".wav",))],
                         inputs=[portrait, speech])
    first_clip = preset.clip_length - preset.motion_frames  # the frames one clip adds to a video
    frames = first_clip if max_seconds is None else max(1, round(max_seconds * preset.fps))
    write_held_out_speech(speech, held_out, frames, preset.fps)

    # a fresh cache for every render: the reference network (trained in stage 1) changes the reference stage file
    cache = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=folder))
    try:
        with _eval_mode(pipe):
            loader = PipelineLoader(preset, _runtime_of(pipe), pipe=pipe)
            renderer = VideoRenderer(preset, seed=seed, steps=num_inference_steps, cfg=guidance_scale, cache_dir=cache,
                                     progress=progress, allow_download=False, loader=loader)
            renderer.render(Job(portrait, held_out, video, prompt))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    result = {"step": step, "video": video, "scores": scores_path, **dict.fromkeys(SCORES), "not_scored": None}
    record = {"step": step, "video": str(video), "seed": seed, "steps": renderer.settings.steps,
              "cfg": renderer.settings.cfg}
    if score:
        from hallo3_cli.evaluate import evaluate_video

        try:
            report = evaluate_video(video, audio=held_out, ref=portrait, model=preset.name,
                                    device=str(pipe.execution_device), allow_download=False).to_dict()
        except Hallo3Error as err:  # weights missing, no face found, ...: the training goes on
            result["not_scored"] = reason(err)
        else:
            record.update(report)
            result.update({key: report[field] for key, field in SCORES.items()})
    else:
        result["not_scored"] = "scoring turned off"
    if result["not_scored"] is not None:
        record["not_scored"] = result["not_scored"]
    with fsutil.atomic_path(scores_path) as tmp:
        tmp.write_text(json.dumps(record) + "\n")
    return result


def log_scores(writer, result: dict) -> None:
    """Write a :func:`validate` result to a TensorBoard ``SummaryWriter``: each score measured as the scalar
    ``validation/<name>`` at the result's step; when not scored, the reason as the text ``validation/not_scored``."""
    step = result["step"]
    for name in SCORES:
        if result.get(name) is not None:
            writer.add_scalar(f"{VALIDATION}/{name}", float(result[name]), step)
    if result.get("not_scored"):
        writer.add_text(f"{VALIDATION}/not_scored", f"not scored: {result['not_scored']}", step)
