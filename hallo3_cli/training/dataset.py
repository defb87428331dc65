"""A prepared dataset folder (``hallo3 prepare``) and :class:`Hallo3Dataset`, the training samples drawn from it
exactly as the release draws them (docs/model.md §10.2).

Folder layout (``DATASET/``)::

    manifest.json                 the kept videos: id, source, caption, frame count, clips, files
    report.json                   the skipped videos, each with its reason
    items/<id>/frames.safetensors   hallo3.frames: the video at 25 fps, squashed to the training square
    items/<id>/audio.safetensors    hallo3.audio: wav2vec features of its sound track, one row per frame, unpadded
    items/<id>/face.safetensors     hallo3.face: face embedding, union face mask, per-frame face boxes
    items/<id>/prompt.safetensors   hallo3.prompt: the caption and its T5 embedding
    skipped/<id>.json             why a video was skipped (a rerun skips it again without redoing the work)

A sample (``Hallo3Dataset(root, stage)[index]``; ``L`` = clip length 49, ``H×W`` the preset's frame, 480×720):

=================  ============================  ===================================================================
key                shape, dtype                  what
=================  ============================  ===================================================================
``frames``         (L, 3, H, W) float32           L consecutive frames, squashed to H×H and zero-padded to W, in
                                                 [-1, 1] (padding -1)
``ref_image``      (3, H, W) float32              the reference frame, drawn from the whole video, framed the same way
``masked_ref``     (3, H, W) float32              the reference frame × the union face mask (outside: -1)
``face_embedding`` (512,) float32                 the video's face embedding (first frame with a face)
``prompt_embeds``  (text_len, text_dim)           the caption's T5 embedding, in the dtype T5 ran in
``audio``          (L, 5, layers, channels) f32   stage 2 only: rows ``i-2 .. i+2`` of every clip frame ``i``, never
                                                 clamped; all zeros when ``audio_dropped``
``audio_dropped``  () bool                        stage 2 only: the release's 5 % audio dropout drew this sample
``caption``        str                            the caption
``video_id``       str                            the video's id in the manifest
``video_index``,   int                            which video, the clip's first frame, the reference frame, the index
``start``,                                       asked for (for debugging and for resuming a data position)
``ref_index``,
``sample_index``
``fps``            int                            25
=================  ============================  ===================================================================

The trainer encodes ``frames`` with the VAE (posterior sample ×scale: the clip's latents), ``[ref_image, noised
and masked frames 0 and 1]`` into the image condition and ``masked_ref`` into the reference latent (docs/model.md
§10.3), and passes ``prompt_embeds``, ``face_embedding`` and (stage 2) ``audio`` to ``training_loss``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hallo3_cli import stages
from hallo3_cli.errors import InputError, StageFileError, reason

MANIFEST = "manifest.json"
REPORT = "report.json"
ITEMS = "items"
SKIPPED = "skipped"
DATASET_FORMAT = "hallo3.dataset"
DATASET_VERSION = 1
#: The stage files of one video, by role, and their formats.
ITEM_FILES = {"frames": stages.FRAMES, "audio": stages.AUDIO, "face": stages.FACE, "prompt": stages.PROMPT}

STAGES = (1, 2)
SKIP_FRAMES = 3  # stage 2 never starts a clip in the first 3 frames (F2: skip_frms_num)
AUDIO_MARGIN = 2  # audio rows i-2 .. i+2 (docs/model.md §5.5)
AUDIO_DROP_RATE = 0.05  # stage 2: the whole audio window zeroed (DV:802-803)


def item_file(root: str | Path, video_id: str, role: str) -> Path:
    """Where the ``role`` stage file (``frames``, ``audio``, ``face``, ``prompt``) of a video lives."""
    return Path(root) / ITEMS / video_id / f"{role}.safetensors"


def start_range(stage: int, num_frames: int, clip_length: int = 49) -> range:
    """The first frames a clip may start at (docs/model.md §10.2): stage 1 ``[0, n - L - 1]`` (the last frame is
    never used), stage 2 ``[3, n - L - 3]`` (room for the audio rows ``i - 2 .. i + 2``; needs ``n >= L + 6``)."""
    if stage == 1:
        return range(0, num_frames - clip_length)
    if stage == 2:
        return range(SKIP_FRAMES, num_frames - clip_length - AUDIO_MARGIN)
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


def min_frames(stage: int, clip_length: int = 49) -> int:
    """Fewest frames a video needs to give one clip in ``stage`` (50 and 55)."""
    n = clip_length
    while not start_range(stage, n, clip_length):
        n += 1
    return n


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s draws: the same sample for the same (seed, index), on any machine."""
    digest = hashlib.sha256(f"hallo3-data:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def read_manifest(root: str | Path) -> dict:
    """The manifest of a prepared folder, checked for its format; InputError naming the file otherwise."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST}: not a folder written by 'hallo3 prepare' (or no video was kept)", root)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable manifest ({reason(err)})", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise InputError(f"not a {DATASET_FORMAT} manifest", path)
    if manifest.get("format_version") != DATASET_VERSION:
        raise InputError(f"{DATASET_FORMAT} version {manifest.get('format_version')!r} is not supported (this "
                         f"hallo3-cli reads version {DATASET_VERSION}); rerun hallo3 prepare", path)
    if not isinstance(manifest.get("videos"), list):
        raise InputError("manifest has no list of videos", path)
    return manifest


# ---------------------------------------------------------------------------------------------
# reading one video's files without loading them whole


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise StageFileError(f"unreadable stage file ({reason(err)})",
                             path) from None


@dataclass(frozen=True)
class Video:
    """One kept video of a manifest, its files checked by header (format, version, model, frame counts)."""

    index: int
    id: str
    num_frames: int
    caption: str
    files: dict[str, Path]

    @classmethod
    def from_entry(cls, root: Path, index: int, entry: dict, model: str) -> Video:
        try:
            video_id, num_frames, caption = str(entry["id"]), int(entry["num_frames"]), str(entry["caption"])
            files = {role: root / entry["files"][role] for role in ITEM_FILES}
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"manifest entry {index} is malformed ({err!r})", root / MANIFEST) from None
        counts = {}
        for role, kind in ITEM_FILES.items():
            header = stages.read_header(files[role])
            if header.get("format") != kind.format or header.get("format_version") != str(kind.version):
                raise StageFileError(f"expected {kind.format} version {kind.version}, found {header.get('format')!r} "
                                     f"version {header.get('format_version')!r}; rerun hallo3 prepare", files[role])
            if header.get("model") != model:
                raise StageFileError(f"was made with model preset {header.get('model')!r}, the dataset's is {model!r}",
                                     files[role])
            if "num_frames" in header:
                counts[role] = int(header["num_frames"])
        if counts.get("frames") != counts.get("face") or num_frames > min(counts["frames"], counts["audio"]):
            raise StageFileError(f"frame counts disagree (manifest {num_frames}, files {counts}); rerun hallo3 prepare",
                                 files["frames"].parent)
        return cls(index, video_id, num_frames, caption, files)


def read_frames(path: Path, start: int, count: int) -> np.ndarray:
    """Frames ``start .. start+count-1`` of a frames file as uint8 ``(count, side, side, 3)`` (one read)."""
    from hallo3_cli.image_io import decode_frame

    with _open(path) as f:
        offsets = f.get_tensor("offsets")
        if start < 0 or start + count > offsets.shape[0] - 1:
            raise StageFileError(f"frames {start}..{start + count - 1} are outside the file's {offsets.shape[0] - 1}", path)
        base = int(offsets[start])
        data = f.get_slice("data")[base:int(offsets[start + count])].numpy()
        side = int(f.metadata()["height"])
    frames = []
    for k in range(count):
        try:
            frame = decode_frame(data[int(offsets[start + k]) - base:int(offsets[start + k + 1]) - base])
        except ValueError as err:
            raise StageFileError(f"frame {start + k}: {err}", path) from None
        if frame.shape != (side, side, 3):
            raise StageFileError(f"frame {start + k} is {frame.shape[1]}×{frame.shape[0]}, expected {side}×{side}", path)
        frames.append(frame)
    return np.stack(frames)


def read_audio_window(path: Path, start: int, count: int, margin: int = AUDIO_MARGIN) -> torch.Tensor:
    """Audio rows ``i - margin .. i + margin`` of every frame ``i`` in ``start .. start+count-1``, never clamped:
    ``(count, 2 margin + 1, layers, channels)`` float32 (docs/model.md §10.2)."""
    with _open(path) as f:
        rows = f.get_slice("features")
        total = rows.get_shape()[0]
        if start - margin < 0 or start + count + margin > total:
            raise StageFileError(f"audio rows {start - margin}..{start + count + margin - 1} are outside its {total}", path)
        block = rows[start - margin:start + count + margin].float()
    index = torch.arange(count)[:, None] + torch.arange(2 * margin + 1)[None, :]
    return block[index]


# ---------------------------------------------------------------------------------------------


class Hallo3Dataset(torch.utils.data.Dataset):
    """Training samples of a prepared folder for ``stage`` 1 or 2, exactly as the release draws them
    (docs/model.md §10.2; the keys, shapes and dtypes are in this module's docstring).

    Sample ``index`` comes from video ``index % len(videos)`` (the videos that are long enough for the stage),
    with its clip start, reference frame and audio dropout drawn from a generator seeded by ``(seed, index)``:
    the same sample for the same seed and index, whatever the worker, process or order. ``length`` (default:
    one sample per video) makes the dataset longer so that indices past the last video draw fresh clips (as
    sat's ``RandomMappingDataset`` does; shuffle with the sampler). ``audio_drop_rate``: stage 2's all-zero
    audio (the release draws it here, p = 0.05; 0 leaves dropout to the trainer).

    Frames are decoded per sample (49 + 1 JPEG/PNG frames, one contiguous read), the audio rows sliced from the
    features file: nothing is held in memory between samples.
    """

    def __init__(self, root: str | Path, stage: int = 1, *, seed: int = 0, length: int | None = None,
                 audio_drop_rate: float = AUDIO_DROP_RATE):
        from hallo3_cli.presets import get_preset

        if stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if not 0 <= audio_drop_rate <= 1:
            raise ValueError(f"audio_drop_rate must be in [0, 1], got {audio_drop_rate}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.model = str(manifest.get("model"))
        preset = get_preset(self.model)
        self.clip_length, self.fps = preset.clip_length, preset.fps
        self.height, self.width = preset.height, preset.width
        self.stage, self.seed, self.audio_drop_rate = stage, int(seed), float(audio_drop_rate)
        videos = [Video.from_entry(self.root, k, entry, self.model) for k, entry in enumerate(manifest["videos"])]
        self.videos = [v for v in videos if start_range(stage, v.num_frames, self.clip_length)]
        if not self.videos:
            need = min_frames(stage, self.clip_length)
            raise InputError(f"no video is long enough for stage {stage} (it needs {need} frames, "
                             f"{need / self.fps:.2f} s)", self.root / MANIFEST)
        if length is not None and length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.length = len(self.videos) if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[Video, int, int, bool]:
        """The draws of sample ``index``: (video, clip start, reference frame, audio dropped)."""
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} is outside 0..{self.length - 1}")
        video = self.videos[index % len(self.videos)]
        rng = random.Random(sample_seed(self.seed, index))
        starts = start_range(self.stage, video.num_frames, self.clip_length)
        start = rng.randint(starts[0], starts[-1])
        ref = rng.randint(0, video.num_frames - 1)  # from the whole video, independent of the clip
        dropped = self.stage == 2 and rng.random() < self.audio_drop_rate
        return video, start, ref, dropped

    def __getitem__(self, index: int) -> dict:
        video, start, ref, dropped = self.draw(index)
        frames = read_frames(video.files["frames"], start, self.clip_length)
        reference = read_frames(video.files["frames"], ref, 1)[0]
        with _open(video.files["face"]) as f:
            mask = f.get_tensor("mask").float() / 255.0
            face_embedding = f.get_tensor("face_embedding").float()
        with _open(video.files["prompt"]) as f:
            prompt_embeds = f.get_tensor("prompt_embeds")
        ref_pixels = torch.from_numpy(reference).permute(2, 0, 1).float()
        sample = {
            "frames": self._frame(torch.from_numpy(frames).permute(0, 3, 1, 2).float()),
            "ref_image": self._frame(ref_pixels),
            "masked_ref": self._frame(ref_pixels * mask),
            "face_embedding": face_embedding,
            "prompt_embeds": prompt_embeds,
            "caption": video.caption,
            "video_id": video.id,
            "video_index": video.index,
            "start": start,
            "ref_index": ref,
            "sample_index": index,
            "fps": self.fps,
        }
        if self.stage == 2:
            audio = read_audio_window(video.files["audio"], start, self.clip_length)
            sample["audio"] = torch.zeros_like(audio) if dropped else audio
            sample["audio_dropped"] = torch.tensor(dropped)
        return sample

    def _frame(self, pixels: torch.Tensor) -> torch.Tensor:
        """Squashed 0..255 pixels ``(..., 3, side, side)`` → the model frame ``(..., 3, H, W)`` in [-1, 1]: zero
        padding split evenly (the extra column on the right), then ``(x - 127.5) / 127.5`` (DV:152-173, 581-585)."""
        side = pixels.shape[-1]
        left, top = (self.width - side) // 2, (self.height - side) // 2
        padded = torch.nn.functional.pad(pixels, (left, self.width - side - left, top, self.height - side - top))
        return (padded - 127.5) / 127.5
