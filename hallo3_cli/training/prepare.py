"""``hallo3 prepare``: talking-head videos → a verified training dataset of stage files (docs/model.md §10.1).

    from hallo3_cli.training import prepare_dataset, check_dataset
    result = prepare_dataset(["raw/"], "data/", model="tiny-random")     # result.kept, result.skipped
    check_dataset("data/").problems                                       # [] when every file verifies

Sources: a folder in the release's layout (``videos/*.mp4`` + ``caption/<stem>.txt``), a folder of videos with
optional same-stem ``.txt`` captions beside them, a list file (one video path per line, relative to the list's
folder; ``#`` comments), or video files; mp4, mov, mkv and webm, decoded with PyAV (no ffmpeg binary). ``prompt``
captions the videos that have no caption file (without it they are skipped, as the release drops them).

Per video (the layout is in :mod:`hallo3_cli.training.dataset`): the picture at 25 fps (other and variable rates
are resampled by holding the frame on screen at each 1/25 s, as ``hallo3 eval`` does), every frame squashed to
the training square (480×480 for the release, bicubic, whatever the aspect: ``image_io.frame_image(...,
framing="squash")``) and stored as JPEG (quality 95, full-resolution chroma) or PNG; the speech features of its
sound track (``embed-audio``'s code, the voice isolated first as the release always does when the preset has the
separator, NOT padded to whole clips: one row per video frame); the face: SCRFD on every frame at the source
resolution, the face box of each (the project's box, expand ratio 1.0), their union filled as the face mask, the
ArcFace embedding of the first frame with a face; the caption's T5 embedding.

Bad input never stops the run: a video without a sound track, without a face in some frame (unless
``allow_missing_faces``) or with two, too short for one clip (50 frames), truncated or undecodable, or whose
caption is missing, unreadable or empty is skipped, said on stderr and recorded with its reason in
``skipped/<id>.json`` and ``report.json``; the others go on. A rerun redoes nothing: a finished stage file whose
source, caption, options and weights are unchanged is kept, a skipped video is skipped again without decoding it
(unless its file, caption or the options changed), and only what is missing is computed.

Several processes share one dataset folder: under ``torchrun`` each rank starts with its share of the videos
(``RANK``/``WORLD_SIZE``), and any number of plain invocations (e.g. ``xargs -P``) can run on the same folder;
each video is taken under a lock file (``items/.<id>.lock``), so it is prepared once, by one process; a process
that runs out of work helps with what others have not started, then waits for the videos they hold. Every
process then rewrites ``manifest.json`` and ``report.json`` (under a lock) from what the folder holds, so the
last to finish leaves them complete. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hallo3_cli import fsutil, stages
from hallo3_cli.face import EMBEDDING_DIM
from hallo3_cli.errors import Hallo3Error, InputError, OutputError, StageFileError, UsageError, reason
from hallo3_cli.presets import Preset, get_preset
from hallo3_cli.runtime import Runtime
from hallo3_cli.training.dataset import (DATASET_FORMAT, DATASET_VERSION, ITEM_FILES, ITEMS, MANIFEST, REPORT,
                                         SKIPPED, item_file, min_frames, read_manifest, start_range)

log = logging.getLogger("hallo3")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".m4v")
FACE_RATIO = 1.0
"""The per-frame face boxes of training data are not expanded (inference: 1.2; docs/model.md §10.1)."""
MAX_AV_MISMATCH = 0.5
"""Seconds by which a video's sound track and picture may differ in length (more: a broken file, skipped)."""
TRUNCATION_TOLERANCE = 0.5
"""Seconds of the picture a file declares that may fail to decode at its end before it counts as truncated."""
ID_MAX = 100
REPORT_FORMAT = "hallo3.prepare-report"


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    """One video to prepare: its file, the caption file found for it (None: none), its id in the dataset, and
    ``problem`` when a list file names something that is not there."""

    video: Path
    caption: Path | None
    id: str
    problem: str | None = None


def caption_file(video: Path) -> Path | None:
    """The caption of a video: ``<stem>.txt`` beside it, else ``../caption/<stem>.txt`` when it lies in a
    ``videos/`` folder (the release's layout). None if neither exists."""
    candidates = [video.with_suffix(".txt")]
    if video.parent.name == "videos":
        candidates.append(video.parent.parent / "caption" / f"{video.stem}.txt")
    return next((path for path in candidates if path.exists()), None)


def find_sources(paths) -> list[Source]:
    """Every video the ``paths`` (folders, list files, video files) name, in order, each with a unique id
    (its file stem, made safe for a folder name; stems met twice get a digest of the path appended)."""
    found: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if path.is_dir():
            folder = path / "videos" if (path / "videos").is_dir() else path
            videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not videos:
                raise InputError(f"holds no videos ({', '.join(s[1:] for s in VIDEO_SUFFIXES)})", folder)
            found += [(video, None) for video in videos]
        elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            found.append((path, None))
        elif path.is_file():
            found += _read_list(path)
        else:
            raise InputError("no such file or folder", path)
    if not found:
        raise InputError("names no videos", paths[0] if paths else ".")
    stems = [_safe_id(video.stem) for video, _ in found]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    sources, seen = [], set()
    for (video, problem), stem in zip(found, stems):
        key = os.path.abspath(video)
        if key in seen:
            continue  # the same file named twice
        seen.add(key)
        if counts[stem.lower()] > 1:
            stem = f"{stem[:ID_MAX - 9]}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        sources.append(Source(video, None if problem else caption_file(video), stem, problem))
    return sources


def _safe_id(stem: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"
    return safe[:ID_MAX]


def _read_list(path: Path) -> list[tuple[Path, str | None]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"line {line}: not UTF-8 text; a list file holds one video path per line", path) from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        video = path.parent / line
        problem = None if video.is_file() else f"no such file (line {number} of {path})"
        entries.append((video, problem))
    return entries


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Outcome:
    """What became of one video: kept (with its usable frame count) or skipped (with the reason). ``fresh``:
    this process did work on it (False: found done, or skipped again from its record)."""

    id: str
    source: Path
    kept: bool
    reason: str | None = None
    num_frames: int = 0
    fresh: bool = False


@dataclass
class PrepareResult:
    """``hallo3 prepare``'s outcome: the index files and what became of each of this run's videos."""

    root: Path
    manifest: Path
    report: Path
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def kept(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kept]

    @property
    def skipped(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.kept]


@dataclass(frozen=True)
class PrepareOptions:
    """What a prepared video depends on besides its file, its caption and the weights."""

    prompt: str | None = None
    allow_missing_faces: bool = False
    separate_vocals: bool = False
    codec: str = "jpeg"
    quality: int = 95

    def frames_params(self) -> dict:
        params = {"codec": self.codec, "framing": "squash", "resize": "bicubic-antialias"}
        if self.codec == "jpeg":
            params["quality"] = self.quality
        return params

    def face_params(self) -> dict:
        return {"allow_missing_faces": self.allow_missing_faces, "expand_ratio": FACE_RATIO}

    def key(self) -> dict:
        """The options a skip depends on (a skipped video is retried when one of them changes)."""
        return {"allow_missing_faces": self.allow_missing_faces, "separate_vocals": self.separate_vocals,
                "prompt": self.prompt}


class _Skip(Exception):
    """A video that cannot be prepared before any file is touched (its caption)."""


# ---------------------------------------------------------------------------------------------
# one video


class _Preparer:
    """Prepares videos into ``root`` with one set of networks, loaded when first needed."""

    def __init__(self, preset: Preset, runtime: Runtime, options: PrepareOptions, root: Path):
        from hallo3_cli import vocals
        from hallo3_cli.jobs.common import fingerprint

        self.preset, self.options, self.root, self.runtime = preset, options, root, runtime
        self._loader = None
        self.separator = vocals.find_separator_model(preset) if options.separate_vocals else None
        audio_params = {"separate_vocals": options.separate_vocals}
        self.weights = {kind.format: fingerprint(preset, kind, audio_params if kind is stages.AUDIO else None)
                        for kind in ITEM_FILES.values()}
        self._prompts: dict[str, torch.Tensor] = {}
        self._face_warned = False

    @property
    def loader(self):
        """The networks, loaded when a video first needs them (a run that skips everything loads none)."""
        if self._loader is None:
            from hallo3_cli.loading import PipelineLoader

            self._loader = PipelineLoader(self.preset, self.runtime)
        return self._loader

    # -- the units of work ----------------------------------------------------------------------------
    def prepare(self, source: Source) -> Outcome:
        if source.problem is not None:
            return self._skipped(source, None, source.problem, retry=True)
        try:
            sha = fsutil.sha256_file(source.video)
        except OSError as err:
            return self._skipped(source, None, f"cannot read the video ({err.strerror or err})", retry=True)
        problem = None
        try:
            caption, caption_key = self._caption(source)
        except _Skip as skip:
            problem, caption_key = skip.args
        key = self._skip_key(sha, caption_key)
        record = self._record(source.id)
        if record is not None and record.get("key") == key and not record.get("retry"):
            return Outcome(source.id, source.video, False, record.get("reason"))
        if problem is not None:
            return self._skipped(source, key, problem)
        folder = self.root / ITEMS / source.id
        try:
            num_frames, fresh = self._make(source, sha, caption)
        except InputError as err:
            shutil.rmtree(folder, ignore_errors=True)  # a skipped video leaves no stage files behind
            return self._skipped(source, key, _message(err, source.video))
        except Hallo3Error:
            raise  # weights, outputs, options: nothing that another video would do better
        except Exception as err:  # a bug or a library's failure on one odd file must not stop the run
            log.debug("while preparing %s", source.video, exc_info=True)
            shutil.rmtree(folder, ignore_errors=True)
            return self._skipped(source, key, f"internal error ({type(err).__name__}: {reason(err)}); rerun with "
                                              "--debug for the traceback", retry=True)
        (self.root / SKIPPED / f"{source.id}.json").unlink(missing_ok=True)
        return Outcome(source.id, source.video, True, None, num_frames, fresh)

    def _make(self, source: Source, sha: str, caption: str) -> tuple[int, bool]:
        """All stage files of a video, computing only those missing or stale. Returns (usable frames, fresh)."""
        from hallo3_cli.evaluate.frames import probe_video

        preset, fps = self.preset, self.preset.fps
        paths = {role: item_file(self.root, source.id, role) for role in ITEM_FILES}
        frames_header = self._current(paths["frames"], stages.FRAMES, sha, self.options.frames_params())
        face_header = self._current(paths["face"], stages.FACE, sha, self.options.face_params())
        audio_header = self._current(paths["audio"], stages.AUDIO, sha, {"pad_to_clips": False})
        prompt_header = self._current(paths["prompt"], stages.PROMPT, _text_sha(caption), meta={"prompt": caption})
        fresh = None in (frames_header, face_header, audio_header, prompt_header)
        need = min_frames(1, preset.clip_length)
        if fresh:
            paths["frames"].parent.mkdir(parents=True, exist_ok=True)
        if frames_header is None or face_header is None or audio_header is None:
            info = probe_video(source.video)
            if not info.has_audio:
                raise InputError("has no sound track (training needs the speech)", source.video)
            if info.duration is not None and round(info.duration * fps) < need:
                raise InputError(_too_short(round(info.duration * fps), fps, need), source.video)
        if audio_header is None:
            audio_frames = self._audio(source.video, paths["audio"], sha)
        else:
            audio_frames = int(audio_header["num_frames"])
        if frames_header is None or face_header is None:
            if info.duration is not None and abs(audio_frames / fps - info.duration) > MAX_AV_MISMATCH:
                raise InputError(_mismatch(audio_frames / fps, info.duration), source.video)
            video_frames = self._frames_and_face(source.video, paths, sha, info)
        else:
            video_frames = int(frames_header["num_frames"])
        if abs(video_frames - audio_frames) > MAX_AV_MISMATCH * fps:
            raise InputError(_mismatch(audio_frames / fps, video_frames / fps), source.video)
        usable = min(video_frames, audio_frames)
        if usable < need:
            raise InputError(_too_short(usable, fps, need), source.video)
        if prompt_header is None:
            self._prompt(caption, paths["prompt"])
        return usable, fresh

    def _audio(self, video: Path, path: Path, sha: str) -> int:
        from hallo3_cli.jobs.commands import speech_features, write_audio

        pipe = self.loader.need("feature_extractor", "audio_encoder")
        features = speech_features(pipe, video, separator_path=self.separator, progress=False, pad_to_clips=False)
        write_audio(features, path, self.preset, pipe, source_sha256=sha, separate_vocals=self.options.separate_vocals,
                    pad_to_clips=False)
        return features.num_frames

    def _frames_and_face(self, video: Path, paths: dict[str, Path], sha: str, info) -> int:
        """One pass over the picture: every frame squashed and compressed, and its face found."""
        from hallo3_cli.evaluate.frames import iter_frames
        from hallo3_cli.face import face_mask
        from hallo3_cli.image_io import encode_frame, frame_image, squash_size, to_uint8

        preset, options, fps = self.preset, self.options, self.preset.fps
        analyzer = self._face_analyzer()
        height, width = preset.height, preset.width
        side = squash_size(height, width)
        left, top = (width - side) // 2, (height - side) // 2
        chunks, offsets, boxes, found = [], [0], [], []
        embedding, embedding_frame, size = None, -1, None
        for index, rgb in enumerate(iter_frames(video, fps)):  # by timestamps: variable rates too
            if size is None:
                size = rgb.shape[:2]
            elif rgb.shape[:2] != size:
                raise InputError(f"its frame size changes at frame {index} ({size[1]}×{size[0]} → "
                                 f"{rgb.shape[1]}×{rgb.shape[0]})", video)
            box = None
            if analyzer is not None:
                face = analyzer.analyze(rgb, ratio=FACE_RATIO, embed=embedding is None)
                if face.count > 1:
                    raise InputError(f"{face.count} faces in frame {index} ({index / fps:.2f} s); training needs "
                                     "exactly one speaker in view", video)
                if face.found:
                    box = face.box
                    if embedding is None:
                        embedding, embedding_frame = face.embedding, index
                elif not options.allow_missing_faces:
                    raise InputError(f"no face in frame {index} ({index / fps:.2f} s) (--allow-missing-faces keeps "
                                     "videos with some frames without a face)", video)
            boxes.append(box)
            pixels = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
            framed, _ = frame_image(pixels, height, width, framing="squash")
            chunks.append(encode_frame(to_uint8(framed[:, top:top + side, left:left + side]), options.codec,
                                       options.quality))
            offsets.append(offsets[-1] + len(chunks[-1]))
        num_frames = len(chunks)
        if num_frames == 0:
            raise InputError("holds no decodable frames", video)
        if info.duration is not None and num_frames / fps < info.duration - TRUNCATION_TOLERANCE:
            raise InputError(f"is truncated or damaged: only {num_frames / fps:.2f} s of the {info.duration:.2f} s "
                             "of picture it declares could be decoded", video)
        source_h, source_w = size
        found = [box is not None for box in boxes]
        if analyzer is not None and not any(found):
            raise InputError(f"no face in any of its {num_frames} frames", video)
        if analyzer is None:  # no face models: the whole frame is the face region, as at inference
            union = np.array([0, 0, source_w, source_h], np.int64)
            embedding = np.zeros(EMBEDDING_DIM, np.float32)
        else:
            stacked = np.stack([box for box in boxes if box is not None])
            union = np.array([stacked[:, 0].min(), stacked[:, 1].min(), stacked[:, 2].max(), stacked[:, 3].max()])
        mask = torch.from_numpy(face_mask(union, source_h, source_w))
        framed_mask, _ = frame_image(mask.expand(3, -1, -1), height, width, framing="squash")
        mask_square = to_uint8(framed_mask[:, top:top + side, left:left + side])[..., 0]
        box_table = np.zeros((num_frames, 4), np.float32)
        for k, box in enumerate(boxes):
            if box is not None:
                box_table[k] = box
        source_meta = {"source_width": int(source_w), "source_height": int(source_h)}
        common = {"model": self.preset.name, "source_sha256": sha, "num_frames": num_frames, **source_meta}
        stages.save_stage(paths["face"], stages.FACE, {
            "face_embedding": torch.from_numpy(np.asarray(embedding, np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask_square)),
            "union_box": torch.from_numpy(union.astype(np.int32)),
            "boxes": torch.from_numpy(box_table),
            "found": torch.tensor(found, dtype=torch.bool),
        }, {**common, "weights": self.weights[stages.FACE.format], "params": options.face_params(),
            "frames_without_face": num_frames - sum(found), "embedding_frame": embedding_frame})
        data = np.frombuffer(b"".join(chunks), np.uint8)
        stages.save_stage(paths["frames"], stages.FRAMES, {
            "data": torch.from_numpy(data.copy()),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }, {**common, "weights": self.weights[stages.FRAMES.format],
            "params": {**options.frames_params(), "source": str(video.resolve()), "source_fps": info.fps},
            "fps": fps, "height": side, "width": side, "codec": options.codec})
        return num_frames

    def _prompt(self, caption: str, path: Path) -> None:
        embeds = self._prompts.get(caption)
        if embeds is None:
            embeds = self.loader.need("tokenizer", "text_encoder").encode_prompt(caption)
            self._prompts[caption] = embeds
        stages.save_stage(path, stages.PROMPT, {"prompt_embeds": embeds}, {
            "model": self.preset.name, "weights": self.weights[stages.PROMPT.format], "params": {"text_length":
            self.preset.text_length, "dtype": str(embeds.dtype).removeprefix("torch.")},
            "source_sha256": _text_sha(caption), "prompt": caption})

    # -- helpers --------------------------------------------------------------------------------------
    def _face_analyzer(self):
        analyzer = self.loader.need("face_analyzer").face_analyzer
        if analyzer is None and not self._face_warned:
            self._face_warned = True
            log.warning("model preset %r has no face models: every video is kept with a zero face embedding and "
                        "the whole frame as its face mask", self.preset.name)
        return analyzer

    def _caption(self, source: Source) -> tuple[str, str]:
        """(caption text, what a skip record keys on); raises _Skip(reason, key) for unusable captions."""
        path = source.caption
        if path is None:
            if self.options.prompt is None:
                raise _Skip("no caption (<stem>.txt beside the video, or caption/<stem>.txt) and no --prompt", "none")
            return self.options.prompt, "prompt"
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise _Skip(f"unreadable caption {path} ({err.strerror or err})", f"unreadable:{path}") from None
        digest = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise _Skip(f"caption {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at {err.start})",
                        digest) from None
        if not text:
            raise _Skip(f"caption {path} is empty", digest)
        return text, digest

    def _skip_key(self, sha: str, caption_key: str) -> str:
        what = {"video": sha, "caption": caption_key, "model": self.preset.name, "options": self.options.key(),
                "weights": self.weights}
        return hashlib.sha256(json.dumps({k: str(v) for k, v in what.items()}, sort_keys=True).encode()).hexdigest()

    def _record(self, video_id: str) -> dict | None:
        path = self.root / SKIPPED / f"{video_id}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _skipped(self, source: Source, key: str | None, why: str, retry: bool = False) -> Outcome:
        log.warning("%s: skipped: %s", source.video, why)
        record = {"id": source.id, "source": str(source.video), "reason": why, "key": key, "retry": retry or key is None}
        folder = self.root / SKIPPED
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{source.id}.json", record)
        return Outcome(source.id, source.video, False, why, fresh=True)

    def _current(self, path: Path, kind: stages.StageKind, sha: str, params: dict | None = None,
                 meta: dict | None = None) -> dict | None:
        """The header of a finished stage file that is still what this run would write, else None."""
        if not path.is_file():
            return None
        try:
            header = stages.read_header(path)
            stored = json.loads(header.get("params", "{}"))
        except (InputError, json.JSONDecodeError):
            return None
        expected = {"format": kind.format, "format_version": str(kind.version), "model": self.preset.name,
                    "weights": self.weights[kind.format], "source_sha256": sha, **(meta or {})}
        if any(header.get(k) != v for k, v in expected.items()):
            return None
        if any(stored.get(k) != v for k, v in (params or {}).items()):
            return None
        return header


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _message(err: Hallo3Error, path: Path) -> str:
    """An error's message without the file name it starts with (the report names the file)."""
    text = str(err)
    for prefix in (f"{err.path}: " if err.path is not None else None, f"{path}: "):
        if prefix and text.startswith(prefix):
            return text[len(prefix):]
    return text


def _too_short(frames: int, fps: int, need: int) -> str:
    return (f"too short: {frames} frames ({frames / fps:.2f} s) at {fps} fps; a training clip needs at least {need} "
            f"({need / fps:.2f} s)")


def _mismatch(audio_seconds: float, video_seconds: float) -> str:
    return (f"its sound track ({audio_seconds:.2f} s) and picture ({video_seconds:.2f} s) differ by more than "
            f"{MAX_AV_MISMATCH} s (a truncated, damaged or badly cut file?)")


def _write_json(path: Path, value) -> None:
    with fsutil.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the index: manifest.json and report.json, from what the folder holds


def _entry(root: Path, video_id: str, model: str) -> dict | None:
    """The manifest entry of a finished video (its four files agree), else None."""
    try:
        return _entry_of(root, video_id, model)
    except (KeyError, ValueError, TypeError, OSError):  # damaged metadata: not finished (--check names it)
        return None


def _entry_of(root: Path, video_id: str, model: str) -> dict | None:
    headers = {}
    for role, kind in ITEM_FILES.items():
        path = item_file(root, video_id, role)
        try:
            headers[role] = stages.read_header(path) if path.is_file() else None
        except InputError:
            return None
        header = headers[role]
        if header is None or header.get("format") != kind.format or header.get("model") != model:
            return None
    frames, audio, face, prompt = (headers[role] for role in ("frames", "audio", "face", "prompt"))
    if len({frames.get("source_sha256"), audio.get("source_sha256"), face.get("source_sha256")}) != 1:
        return None  # being redone
    video_frames, audio_frames, fps = int(frames["num_frames"]), int(audio["num_frames"]), int(frames["fps"])
    usable = min(video_frames, audio_frames)
    clip_length = int(audio["clip_length"])
    params = json.loads(frames.get("params", "{}"))
    return {
        "id": video_id, "source": params.get("source"), "source_sha256": frames["source_sha256"],
        "caption": prompt.get("prompt"), "num_frames": usable, "seconds": round(usable / fps, 3),
        "video_frames": video_frames, "audio_frames": audio_frames,
        "clips": {f"stage{s}": len(start_range(s, usable, clip_length)) for s in (1, 2)},
        "frames_without_face": int(face["frames_without_face"]),
        "files": {role: str(item_file(Path("."), video_id, role)) for role in ITEM_FILES},
        "bytes": sum(item_file(root, video_id, role).stat().st_size for role in ITEM_FILES),
    }


def write_index(root: Path, preset: Preset) -> tuple[Path, Path]:
    """Rewrite ``manifest.json`` (every finished video) and ``report.json`` (every skipped one) from the folder."""
    with fsutil.exclusive_lock(root / ".index.lock"):
        items = root / ITEMS
        ids = sorted(p.name for p in items.iterdir() if p.is_dir()) if items.is_dir() else []
        videos = [entry for entry in (_entry(root, video_id, preset.name) for video_id in ids) if entry is not None]
        skipped = []
        for path in sorted((root / SKIPPED).glob("*.json")) if (root / SKIPPED).is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                skipped.append({"id": record["id"], "source": record["source"], "reason": record["reason"]})
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                continue
        totals = {
            "videos": len(videos), "frames": sum(v["num_frames"] for v in videos),
            "seconds": round(sum(v["seconds"] for v in videos), 3), "bytes": sum(v["bytes"] for v in videos),
            "clips": {f"stage{s}": sum(v["clips"][f"stage{s}"] for v in videos) for s in (1, 2)},
        }
        manifest = {
            "format": DATASET_FORMAT, "format_version": DATASET_VERSION, "model": preset.name, "fps": preset.fps,
            "height": preset.height, "width": preset.width, "clip_length": preset.clip_length,
            "videos": videos, "totals": totals,
        }
        report = {"format": REPORT_FORMAT, "kept": len(videos), "skipped": skipped}
        _write_json(root / MANIFEST, manifest)
        _write_json(root / REPORT, report)
    return root / MANIFEST, root / REPORT


# ---------------------------------------------------------------------------------------------
# the command


class _Progress:
    """Videos i/N with an ETA on stderr: a tqdm bar on a terminal, a line per video in logs (under torchrun:
    rank 0's bar, and lines from every rank, named)."""

    def __init__(self, enabled: bool, total: int, rank: int = 0, world: int = 1):
        self.enabled, self.total, self.done, self.fresh = enabled, total, 0, 0
        self.who = f"rank {rank}: " if world > 1 else ""
        self.started = time.perf_counter()
        self.bar = None
        if enabled and rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="prepare", unit="video", file=sys.stderr)

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.fresh += outcome.fresh
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            spent = time.perf_counter() - self.started
            eta = spent / max(self.fresh, 1) * (self.total - self.done)
            what = f"kept ({outcome.num_frames} frames)" if outcome.kept else "skipped"
            done = "" if outcome.fresh else ", already done"
            print(f"hallo3: {self.who}video {self.done}/{self.total} {outcome.id}: {what}{done} ({spent:.0f} s so far, "
                  f"ETA {eta:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare_dataset(sources, output: str | Path, *, model: str = "hallo3", prompt: str | None = None,
                    allow_missing_faces: bool = False, separate_vocals: bool | None = None, codec: str = "jpeg",
                    quality: int = 95, device: str = "auto", dtype: str = "auto", progress: bool = True,
                    allow_download: bool = True) -> PrepareResult:
    """Prepare the videos of ``sources`` (folders, list files, video files) into the dataset folder ``output``
    (see the module docstring). ``separate_vocals``: None = as the release (always) when the preset has the
    separator model, off for random presets. Returns what became of each video; the CLI exits 3 when none was
    kept."""
    from hallo3_cli.image_io import FRAME_CODECS
    from hallo3_cli.jobs.batch import shard
    from hallo3_cli.jobs.common import require_weights, warn_random
    from hallo3_cli.loading import resolve_runtime

    if codec not in FRAME_CODECS:
        raise UsageError(f"--frame-format must be one of {', '.join(FRAME_CODECS)}, got {codec!r}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--jpeg-quality must be in [1, 100], got {quality}")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty")
    preset = get_preset(model)
    root = fsutil.check_output_folder(output)
    items = find_sources(list(sources))
    for source in map(Path, sources):
        if source.is_dir() and os.path.realpath(source) == os.path.realpath(root):
            raise OutputError("is also a source folder; prepare into another folder", root)
    if (root / MANIFEST).is_file():
        try:
            existing = read_manifest(root).get("model")
        except InputError:
            existing = None
        if existing is not None and existing != preset.name:
            raise UsageError(f"{root} holds a dataset of model preset {existing!r}; prepare {preset.name!r} data into "
                             "another folder")
    separate = (not preset.is_random) if separate_vocals is None else bool(separate_vocals)
    options = PrepareOptions(prompt=prompt.strip() if prompt else None, allow_missing_faces=allow_missing_faces,
                             separate_vocals=separate, codec=codec, quality=int(quality))
    runtime = Runtime(device=_rank_device(device), dtype=dtype, offload="none")
    runtime = resolve_runtime(runtime, preset)  # an unusable device fails before any weights are checked
    require_weights(preset, tuple(ITEM_FILES.values()), allow_download, progress,
                    extra=("audio_separator",) if separate else ())
    warn_random(preset)
    root = fsutil.ensure_output_folder(root)
    (root / ITEMS).mkdir(exist_ok=True)
    preparer = _Preparer(preset, runtime, options, root)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = shard(items, rank, world)
    order = mine + [item for item in items if item not in mine]  # then help with the others' videos
    outcomes: dict[str, Outcome] = {}
    bar = _Progress(progress, len(items), rank, world)
    waiting = []
    try:
        for item in order:
            try:
                with fsutil.exclusive_lock(root / ITEMS / f".{item.id}.lock", wait=False):
                    outcomes[item.id] = preparer.prepare(item)
            except BlockingIOError:
                waiting.append(item)  # another process has it
                continue
            bar.update(outcomes[item.id])
        for item in waiting:  # wait for the others, then take their result from the folder
            with fsutil.exclusive_lock(root / ITEMS / f".{item.id}.lock"):
                outcomes[item.id] = preparer.prepare(item)
            bar.update(outcomes[item.id])
    finally:
        bar.close()
    manifest, report = write_index(root, preset)
    return PrepareResult(root, manifest, report, [outcomes[item.id] for item in items])


def _rank_device(device: str) -> str:
    """Under torchrun, ``auto`` means this process's GPU (``cuda:LOCAL_RANK``) when there is CUDA."""
    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def format_summary(result: PrepareResult) -> str:
    """The summary of a run for stderr: counts, then a table of the skipped videos and why."""
    kept, skipped = result.kept, result.skipped
    fresh = sum(o.fresh for o in kept)
    lines = [f"hallo3: {result.root}: {len(kept)} of {len(result.outcomes)} videos kept ({fresh} prepared by this "
             f"process, {len(kept) - fresh} found done), {len(skipped)} skipped"]
    if skipped:
        width = min(max(len(o.id) for o in skipped), 40)
        lines.append(f"  {'skipped video'.ljust(width)}  reason")
        lines += [f"  {o.id[:width].ljust(width)}  {o.reason}" for o in skipped]
        lines.append(f"  (also in {result.report})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --check


@dataclass
class CheckResult:
    """``hallo3 prepare --check``: the videos checked and every problem found (``(where, what)``)."""

    root: Path
    videos: int
    files: int
    problems: list[tuple[str, str]] = field(default_factory=list)


def check_dataset(root: str | Path, *, progress: bool = True) -> CheckResult:
    """Re-verify every file of a prepared folder: each stage file loaded and validated in full (format, version,
    shapes against the preset, finite values, weights fingerprint where the weights are installed), every frame
    decoded, and the files of each video consistent with each other and with the manifest; folders of videos
    that are not in the manifest are reported too."""
    from hallo3_cli.image_io import decode_frame
    from hallo3_cli.progress import bar

    root = Path(root)
    manifest = read_manifest(root)
    model = str(manifest.get("model"))
    result = CheckResult(root, len(manifest["videos"]), 0)
    problem = result.problems.append
    listed = set()
    ticker = bar(progress, len(manifest["videos"]), "check", unit="video")
    for entry in manifest["videos"]:
        video_id = str(entry.get("id"))
        listed.add(video_id)
        loaded = {}
        for role, kind in ITEM_FILES.items():
            path = root / str(entry.get("files", {}).get(role, item_file(Path("."), video_id, role)))
            try:
                loaded[role] = stages.load_stage(path, kind, model=model)
                result.files += 1
            except (StageFileError, InputError) as err:
                problem((video_id, str(err)))
        ticker.update()
        if len(loaded) != len(ITEM_FILES):
            continue
        frames, face, audio, prompt = (loaded[role] for role in ("frames", "face", "audio", "prompt"))
        side = frames.meta["height"]
        offsets, data = frames["offsets"], frames["data"].numpy()
        for k in range(frames.meta["num_frames"]):
            try:
                shape = decode_frame(data[int(offsets[k]):int(offsets[k + 1])]).shape
            except ValueError as err:
                problem((video_id, f"{frames.path}: frame {k}: {err}"))
                break
            if shape != (side, side, 3):
                problem((video_id, f"{frames.path}: frame {k} is {shape[1]}×{shape[0]}, expected {side}×{side}"))
                break
        shas = {role: loaded[role].meta["source_sha256"] for role in ("frames", "face", "audio")}
        if len(set(shas.values())) != 1:
            problem((video_id, f"its files were made from different sources ({shas})"))
        if face.meta["num_frames"] != frames.meta["num_frames"]:
            problem((video_id, f"face track has {face.meta['num_frames']} frames, the video {frames.meta['num_frames']}"))
        usable = min(frames.meta["num_frames"], audio.meta["num_frames"])
        if entry.get("num_frames") != usable:
            problem((video_id, f"manifest says {entry.get('num_frames')} frames, the files give {usable}"))
        if entry.get("caption") != prompt.meta["prompt"]:
            problem((video_id, "manifest caption differs from the prompt file's"))
        if audio.params.get("pad_to_clips", True):
            problem((video_id, f"{audio.path}: features padded to whole clips (inference's), not the training data's"))
    ticker.close()
    items = root / ITEMS
    for folder in sorted(p for p in items.iterdir() if p.is_dir()) if items.is_dir() else []:
        if folder.name not in listed:
            problem((folder.name, f"{folder}: not in the manifest (unfinished: rerun hallo3 prepare)"))
    return result
