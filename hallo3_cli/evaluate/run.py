"""``hallo3 eval``: score any talking video for lip sync and identity.

Two passes over the video, each decoding one frame at a time:

1. faces: SCRFD on every frame (largest face); ArcFace embeddings of every ``identity_stride``-th
   frame's face, compared with the portrait's (``--ref``) or, without a portrait, with the first
   face found in the video (then the numbers measure identity *drift*, not likeness);
2. lip sync: the SyncNet crops of every frame, from the smoothed face track, streamed through
   :class:`~hallo3_cli.evaluate.scores.SyncScorer`.

Presets without face models (``tiny-random``) crop the whole frame (centre square) and skip
identity, with a warning. Memory does not grow with the video's length beyond a few numbers per
frame (face boxes, 31 distances).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hallo3_cli.errors import InputError
import hallo3_cli.evaluate.frames as vf
from hallo3_cli.evaluate.mfcc import SAMPLE_RATE, to_pcm16
from hallo3_cli.evaluate.scores import FPS, IdentityResult, SyncResult, SyncScorer, check_audio_length, cosine, summarise_seconds
from hallo3_cli.fsutil import atomic_path, check_outputs, require_file

log = logging.getLogger("hallo3")

IDENTITY_STRIDE = 5  # embed every 5th frame: 5 samples per second at 25 fps


@dataclass
class EvalReport:
    """Everything ``hallo3 eval`` measured; :meth:`to_dict` is the ``--json`` object."""

    video: Path
    audio: Path
    reference: Path | None
    model: str
    frames: int
    sync: SyncResult
    identity: IdentityResult | None
    crop: str  # "scrfd" or "whole_frame"
    identity_stride: int
    seconds: dict[str, list] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        ident = self.identity
        per_second = {"start_s": [float(s) for s in range(len(self.seconds.get("sync_confidence", [])))]}
        per_second.update({k: [_finite(v) for v in values] for k, values in self.seconds.items()})
        return {
            "video": str(self.video),
            "audio": str(self.audio),
            "reference": str(self.reference) if self.reference else None,
            "model": self.model,
            "fps": FPS,
            "frames": self.frames,
            "duration_s": self.frames / FPS,
            "windows": self.sync.windows,
            "sync_confidence": _finite(self.sync.confidence),
            "sync_distance": _finite(self.sync.distance),
            "av_offset_frames": self.sync.offset,
            "identity_similarity": _finite(ident.mean) if ident else None,
            "identity_similarity_p5": _finite(ident.p5) if ident else None,
            "face_ratio": _finite(ident.face_ratio) if ident else None,
            "identity_reference": ident.reference if ident else None,
            "identity_reference_frame": ident.reference_frame if ident else None,
            "identity_samples": len(ident.similarities) if ident else 0,
            "identity_stride": self.identity_stride,
            "face_crop": self.crop,
            "per_second": per_second,
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def format_table(report: EvalReport) -> str:
    """The short stdout summary."""
    ident = report.identity
    rows = [
        ("video", f"{report.video} ({report.frames} frames, {report.frames / FPS:.1f} s at {FPS} fps)"),
        ("Sync-C (confidence)", f"{report.sync.confidence:.3f}   higher is better; Hallo3 on HDTF: 6.55"),
        ("Sync-D (distance)", f"{report.sync.distance:.3f}   lower is better; Hallo3 on HDTF: 8.49"),
        ("AV offset", f"{report.sync.offset:+d} frames ({report.sync.offset * 40:+d} ms)"),
    ]
    if ident is None:
        rows.append(("identity", "not measured (no face models in this preset)"))
    else:
        against = "portrait" if ident.reference == "portrait" else f"first face, frame {ident.reference_frame}"
        mean = "-" if not ident.similarities else f"{ident.mean:.3f} mean, {ident.p5:.3f} 5th percentile"
        rows.append(("identity (ArcFace cos)", f"{mean} vs {against}"))
        rows.append(("faces", f"{ident.face_ratio:.0%} of frames"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


# ---------------------------------------------------------------------------------------------


def evaluate_video(
    video: str | Path,
    audio: str | Path | None = None,
    ref: str | Path | None = None,
    model: str = "hallo3",
    device: str = "auto",
    plot: str | Path | None = None,
    identity_stride: int = IDENTITY_STRIDE,
    *,
    analyzer=None,
    syncnet=None,
    allow_download: bool = True,
) -> EvalReport:
    """Score ``video`` (lip sync against ``audio``, default its own track; identity against the
    portrait ``ref``). ``analyzer`` / ``syncnet`` override the preset's models (tests, notebooks)."""
    from hallo3_cli.audio_io import load_audio
    from hallo3_cli.errors import ArgumentError
    from hallo3_cli.fsutil import path_argument
    from hallo3_cli.presets import get_preset
    from hallo3_cli.runtime import resolve_device

    if isinstance(identity_stride, bool) or not isinstance(identity_stride, int):
        raise TypeError(f"identity_stride must be an int, got {type(identity_stride).__name__}")
    if identity_stride < 1:
        raise ArgumentError(f"identity_stride must be >= 1, got {identity_stride}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a model preset name (str), got {type(model).__name__}")
    video = require_file(path_argument(video, "video"))
    audio, ref = path_argument(audio, "audio", optional=True), path_argument(ref, "ref", optional=True)
    plot = path_argument(plot, "plot", optional=True)
    info = vf.probe_video(video)
    if audio is None and not info.has_audio:
        raise InputError("has no audio track; give the speech with --audio", video)
    audio_path = require_file(audio) if audio is not None else video
    ref_path = require_file(ref) if ref is not None else None
    check_outputs([(plot, (".png",))], inputs=[video, audio_path, ref_path])
    preset = get_preset(model)
    device = resolve_device(device)

    pcm = to_pcm16(load_audio(audio_path, SAMPLE_RATE))
    check_audio_length(pcm, audio_path)
    portrait = _load_portrait(ref_path) if ref_path is not None else None

    if analyzer is None or syncnet is None:
        needed = (["face_analysis"] if analyzer is None else []) + (["syncnet"] if syncnet is None else [])
        require_eval_weights(preset, allow_download, needed, video=video)
    if analyzer is None:
        from hallo3_cli.loading import load_face_analyzer

        analyzer = load_face_analyzer(preset, device)
    if syncnet is None:
        from hallo3_cli.evaluate.syncnet import load_syncnet

        syncnet = load_syncnet(preset, device)

    warnings: list[str] = []
    if analyzer is None:
        warnings.append(f"preset {preset.name!r} has no face models: lip crops are the whole frame (centre square) "
                        "and identity is not measured")
        log.warning("%s", warnings[-1])
        identity, track = None, None
    else:
        reference = None
        if portrait is not None:
            face = analyzer.analyze(portrait)
            if not face.found:
                raise InputError("no face found in the portrait", ref_path)
            reference = face.embedding
        identity, boxes, per_frame = _face_pass(video, analyzer, reference, identity_stride)
        if identity.faces == 0:
            raise InputError("no face found in any frame", video)
        if identity.faces < identity.frames:
            warnings.append(f"no face detected in {identity.frames - identity.faces} of {identity.frames} frames "
                            "(their crop boxes are interpolated)")
            log.warning("%s", warnings[-1])
        track = vf.smooth_track(boxes)

    log.info("scoring lip sync of %s", video)
    scorer = SyncScorer(syncnet, pcm, device=device)
    count = 0
    for index, frame in enumerate(vf.iter_frames(video)):
        _progress("lip sync", index)
        bgr = frame[..., ::-1]
        if track is None:
            crop = vf.whole_frame_crop(np.ascontiguousarray(bgr))
        elif index < len(track):
            crop = vf.lip_crop(bgr, *track[index])
        else:  # cannot happen: both passes decode the same frames
            break
        scorer.add(crop)
        count += 1
    if count == 0:
        raise InputError("video holds no frames", video)
    try:
        sync = scorer.finish()
    except ValueError as err:
        raise InputError(str(err), video) from None
    if count / FPS + 0.5 < len(pcm) / SAMPLE_RATE or len(pcm) / SAMPLE_RATE + 0.5 < count / FPS:
        warnings.append(f"audio ({len(pcm) / SAMPLE_RATE:.2f} s) and video ({count / FPS:.2f} s) lengths differ; "
                        "the shorter one is scored")
        log.warning("%s", warnings[-1])

    seconds = sync.per_second(FPS)
    if identity is not None:
        seconds.update(summarise_seconds(dict(zip(identity.sampled, identity.similarities)), per_frame, FPS))
        n = len(seconds["sync_confidence"])
        seconds["identity_similarity"] = seconds["identity_similarity"][:n]
        seconds["face_ratio"] = seconds["face_ratio"][:n]
    report = EvalReport(video, audio_path, ref_path, preset.name, count, sync, identity,
                        "whole_frame" if track is None else "scrfd", identity_stride, seconds, warnings)
    if plot is not None:
        from hallo3_cli.evaluate.plot import plot_scores

        plot_scores(report, plot)
    return report


EVAL_WEIGHTS = ("face_analysis", "syncnet")
"""The only weights ``hallo3 eval`` needs: SCRFD + ArcFace (277.6 MB) and SyncNet (54.6 MB) of the preset."""


def require_eval_weights(model, allow_download: bool = True, components=EVAL_WEIGHTS, *, video=None) -> None:
    """Fail (or, if allowed, download) before any work when the weights ``hallo3 eval`` needs are missing. The
    message names exactly those components and, for a video a ``tiny-random`` render made (its mp4 says so)
    or whenever the release weights are missing, the offline alternative ``--model tiny-random``."""
    from hallo3_cli.errors import ModelError
    from hallo3_cli.hub import ensure_weights
    from hallo3_cli.presets import TINY_RANDOM, get_preset

    preset = get_preset(model) if isinstance(model, str) else model
    try:
        ensure_weights(preset, components, allow_download=allow_download)
    except ModelError as err:
        if preset.name == TINY_RANDOM:
            raise
        made_with = rendered_with(video) if video is not None else None
        if made_with == TINY_RANDOM:
            hint = (f"; this video was rendered with --model {TINY_RANDOM}: score it offline with "
                    f"'hallo3 eval {video} --model {TINY_RANDOM}' (random SyncNet, no identity: a smoke test)")
        else:
            hint = (f"; a video rendered with --model {TINY_RANDOM} is scored offline with --model {TINY_RANDOM} "
                    "(random SyncNet, no identity: a smoke test)")
        raise ModelError(str(err) + hint) from None


def rendered_with(video: str | Path) -> str | None:
    """The model preset named in the metadata of a video ``hallo3 render`` wrote (``None``: not ours, or unreadable)."""
    from hallo3_cli.video_io import read_render_tag

    tag = read_render_tag(video)
    return tag.get("model") if tag else None


def eval_path(video: str | Path) -> Path:
    """Where ``render --eval`` writes the scores of ``video``: ``out.mp4`` → ``out.eval.json`` beside it."""
    return Path(video).with_suffix(".eval.json")


def evaluate_render(video, speech, portrait, model: str = "hallo3", device: str = "auto", allow_download: bool = True) -> Path:
    """Score a finished render and write the JSON next to it (``out.mp4`` -> ``out.eval.json``; ``render
    --eval`` checks that path and :func:`require_eval_weights` before rendering)."""
    video = Path(video)
    target = eval_path(video)
    check_outputs([(target, (".json",))], inputs=[video, speech, portrait])
    report = evaluate_video(video, audio=speech, ref=portrait, model=model, device=device, allow_download=allow_download)
    with atomic_path(target) as tmp:
        tmp.write_text(report.to_json() + "\n")
    return target


# ---------------------------------------------------------------------------------------------


def _progress(what: str, index: int, every: int = 60 * FPS) -> None:
    if index and index % every == 0:
        log.info("%s: %d s of video done", what, index // FPS)


def _load_portrait(path: Path) -> np.ndarray:
    from hallo3_cli.image_io import load_image

    return np.asarray(load_image(path).convert("RGB"), np.uint8)


def _face_pass(video: Path, analyzer, reference, stride: int):
    """Detect the largest face in every frame; embed every ``stride``-th one."""
    boxes, has_face, sampled, similarities = [], [], [], []
    reference_frame = None
    for index, frame in enumerate(vf.iter_frames(video)):
        _progress("faces", index)
        faces = analyzer.detector.detect(frame)
        if len(faces) == 0:
            boxes.append(np.full(4, np.nan))
            has_face.append(False)
            continue
        best = faces.largest()
        boxes.append(np.asarray(faces.boxes[best], np.float64))
        has_face.append(True)
        if reference is None:
            reference, reference_frame = analyzer.recognizer.embed(frame, faces.kps[best]), index
        if index % stride == 0:
            sampled.append(index)
            similarities.append(cosine(analyzer.recognizer.embed(frame, faces.kps[best]), reference))
    if not boxes:
        raise InputError("video holds no frames", video)
    identity = IdentityResult(
        frames=len(boxes), faces=int(sum(has_face)), sampled=sampled, similarities=similarities,
        reference="portrait" if reference_frame is None else "first_face_frame", reference_frame=reference_frame,
    )
    return identity, np.stack(boxes), np.asarray(has_face, np.float64)
