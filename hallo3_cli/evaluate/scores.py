"""Lip-sync (SyncNet) and identity (ArcFace) scores of a talking video.

Lip sync follows ``SyncNetInstance.evaluate`` of joonson/syncnet_python:

- ``min_length = min(frames, floor(samples / 640))`` (16 kHz audio, 25 fps video); windows
  ``i = 0 .. min_length - 6`` (``lastframe = min_length - 5``; the last possible window is not used);
- window ``i``: frames ``i..i+4`` through the lip tower, MFCC columns ``4i .. 4i+19`` through the
  audio tower (both in batches of 20 consecutive windows);
- for every window, the distances ``‖lip_i - audio_(i+k-15) + 1e-6‖`` for the 31 offsets
  ``k = 0..30`` (audio features beyond either end count as zero vectors);
- mean over windows per offset -> ``mdist``; Sync-D = ``min(mdist)``, Sync-C = ``median(mdist) -
  min(mdist)``, AV offset = ``15 - argmin(mdist)`` frames (positive: the audio leads).

The computation streams: crops are consumed one at a time, a window's distances are taken as soon
as the audio windows it is compared with are known to exist, and only the 31 distances of each
window are kept (124 bytes per frame) for the per-second curves.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from hallo3_cli.errors import InputError
from hallo3_cli.evaluate.mfcc import SAMPLE_RATE, mfcc
from hallo3_cli.evaluate.syncnet import FRAMES_PER_WINDOW, MFCC_WINDOW

FPS = 25
VSHIFT = 15
BATCH_SIZE = 20
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCC columns per 25 fps frame


@dataclass
class SyncResult:
    """Sync-C (``confidence``), Sync-D (``distance``) and the AV ``offset`` in frames, plus the
    (windows, 2·vshift + 1) ``distances`` they were aggregated from."""

    offset: int
    confidence: float
    distance: float
    distances: np.ndarray = field(repr=False)
    vshift: int = VSHIFT

    @property
    def windows(self) -> int:
        return int(self.distances.shape[0])

    def per_second(self, fps: int = FPS) -> dict[str, list]:
        """The same three numbers for the windows starting in each second of the video."""
        out = {"sync_confidence": [], "sync_distance": [], "av_offset_frames": []}
        for start in range(0, self.windows, fps):
            curve = torch.from_numpy(np.ascontiguousarray(self.distances[start : start + fps].T)).mean(1)
            low, index = torch.min(curve, 0)
            out["sync_confidence"].append(float(torch.median(curve) - low))
            out["sync_distance"].append(float(low))
            out["av_offset_frames"].append(int(self.vshift - index))
        return out


def _window_stack(frames: list[np.ndarray]) -> torch.Tensor:
    """5 crops (224, 224, 3) uint8 BGR -> (3, 5, 224, 224) uint8 (raw pixel values go in as floats)."""
    return torch.from_numpy(np.stack(frames, 0)).permute(3, 0, 1, 2)


class SyncScorer:
    """Streaming SyncNet evaluation: :meth:`add` crops in order, then :meth:`finish`.

    ``pcm``: the speech as int16 samples at 16 kHz (:func:`hallo3_cli.evaluate.mfcc.to_pcm16`).
    ``crops``: 224×224×3 uint8 images in BGR order (SyncNet was trained on OpenCV's frames).
    """

    def __init__(self, net, pcm: np.ndarray, device="cpu", vshift: int = VSHIFT, batch_size: int = BATCH_SIZE):
        self.net, self.device = net, torch.device(device)
        self.vshift, self.batch_size = int(vshift), int(batch_size)
        pcm = np.asarray(pcm)
        self.audio_limit = len(pcm) // SAMPLES_PER_FRAME - FRAMES_PER_WINDOW  # windows the audio allows
        self.mfcc = torch.from_numpy(mfcc(pcm).T.astype(np.float32))[None, None] if len(pcm) else None
        self.dtype = next(net.parameters()).dtype
        self._recent: deque[np.ndarray] = deque(maxlen=FRAMES_PER_WINDOW + 1)
        self.frames = 0
        self._batch: list[torch.Tensor] = []  # lip windows waiting for the lip tower
        self._lip: dict[int, torch.Tensor] = {}  # window -> lip feature, until its distances are taken
        self._audio: dict[int, torch.Tensor] = {}  # batch start -> audio features of that batch
        self._rows: list[np.ndarray] = []
        self._next_window = 0  # next window to stack
        self._next_row = 0  # next window whose distances are due

    # -- feeding ---------------------------------------------------------------------------------

    def add(self, crop: np.ndarray) -> None:
        self._recent.append(crop)
        self.frames += 1
        # window i exists once frame i + 5 exists (lastframe = min_length - 5) and the audio allows it
        while self._next_window + FRAMES_PER_WINDOW < self.frames and self._next_window < self.audio_limit:
            first = self.frames - len(self._recent)
            offset = self._next_window - first
            self._batch.append(_window_stack(list(self._recent)[offset : offset + FRAMES_PER_WINDOW]))
            self._next_window += 1
            if len(self._batch) == self.batch_size:
                self._run_lips()
        self._take_distances(confirmed=self._next_window)

    def extend(self, crops: Iterable[np.ndarray]) -> SyncScorer:
        for crop in crops:
            self.add(crop)
        return self

    def finish(self) -> SyncResult:
        windows = min(self.frames, self.audio_limit + FRAMES_PER_WINDOW) - FRAMES_PER_WINDOW
        if windows <= 0:
            raise ValueError(
                f"too short for SyncNet: {self.frames} frames and {self.audio_limit + FRAMES_PER_WINDOW} frames' "
                f"worth of audio; at least {FRAMES_PER_WINDOW + 1} of each (0.24 s) are needed"
            )
        if self._batch:
            self._run_lips()
        self._take_distances(confirmed=windows, final=windows)
        distances = np.stack(self._rows, 0)
        mdist = torch.from_numpy(np.ascontiguousarray(distances.T)).mean(1)
        low, index = torch.min(mdist, 0)
        return SyncResult(
            offset=int(self.vshift - index),
            confidence=float(torch.median(mdist) - low),
            distance=float(low),
            distances=distances,
            vshift=self.vshift,
        )

    # -- internals -------------------------------------------------------------------------------

    @torch.no_grad()
    def _run_lips(self) -> None:
        first = self._next_window - len(self._batch)
        batch = torch.stack(self._batch, 0).to(self.device, self.dtype)
        features = self.net.forward_lip(batch).float().cpu()
        self._lip.update({first + k: features[k] for k in range(features.shape[0])})
        self._batch = []

    @torch.no_grad()
    def _audio_batch(self, start: int) -> torch.Tensor:
        if start not in self._audio:
            stop = min(start + self.batch_size, self.audio_limit)
            windows = [self.mfcc[..., j * MFCC_PER_FRAME : j * MFCC_PER_FRAME + MFCC_WINDOW] for j in range(start, stop)]
            batch = torch.cat(windows, 0).to(self.device, self.dtype)
            self._audio[start] = self.net.forward_audio(batch).float().cpu()
        return self._audio[start]

    def _audio_rows(self, first: int, stop: int, limit: int) -> torch.Tensor:
        """Audio features of windows ``first .. stop-1``; zeros outside ``0 .. limit-1``."""
        rows = []
        for j in range(first, stop):
            if 0 <= j < limit:
                start = j - j % self.batch_size
                rows.append(self._audio_batch(start)[j - start])
            else:
                rows.append(None)
        width = next((r.shape[0] for r in rows if r is not None), None)
        if width is None:
            width = next(iter(self._lip.values())).shape[0]
        zero = torch.zeros(width)
        return torch.stack([zero if r is None else r for r in rows], 0)

    def _take_distances(self, confirmed: int, final: int | None = None) -> None:
        """Distances of every window whose 31 audio partners are settled: those below
        ``confirmed - vshift`` while streaming (all windows up to there exist), all at the end."""
        due = final if final is not None else confirmed - self.vshift
        due = min(due, max(self._lip, default=-1) + 1)
        if due <= self._next_row:
            return
        limit = final if final is not None else confirmed
        first, span = self._next_row, 2 * self.vshift + 1
        audio = self._audio_rows(first - self.vshift, due + self.vshift, limit)
        lips = torch.stack([self._lip.pop(i) for i in range(first, due)], 0)
        partners = audio.unfold(0, span, 1).permute(0, 2, 1)  # (windows, 31, dim)
        count = lips.shape[0]
        distances = torch.nn.functional.pairwise_distance(
            lips[:, None, :].expand(count, span, lips.shape[1]).reshape(-1, lips.shape[1]),
            partners[:count].reshape(-1, lips.shape[1]),
        ).view(count, span)
        self._rows.extend(distances.numpy())
        self._next_row = due
        floor = due - self.vshift  # audio batches nobody needs any more
        for start in [s for s in self._audio if s + self.batch_size <= floor]:
            del self._audio[start]


# ---------------------------------------------------------------------------------------------
# identity


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else float("nan")


@dataclass
class IdentityResult:
    """Cosine similarities of the sampled frames' faces to the reference embedding."""

    frames: int  # frames seen
    faces: int  # frames with a detected face
    sampled: list[int]  # frame indices whose face was embedded
    similarities: list[float]
    reference: str  # "portrait" or "first_face_frame"
    reference_frame: int | None = None

    @property
    def face_ratio(self) -> float:
        return self.faces / self.frames if self.frames else float("nan")

    @property
    def mean(self) -> float:
        return float(np.mean(self.similarities)) if self.similarities else float("nan")

    @property
    def p5(self) -> float:
        return float(np.percentile(self.similarities, 5)) if self.similarities else float("nan")


def summarise_seconds(values_at: dict[int, float], frames_with_face: np.ndarray, fps: int = FPS) -> dict[str, list]:
    """Per-second mean similarity (NaN when no sampled face) and share of frames with a face."""
    seconds = math.ceil(len(frames_with_face) / fps)
    similarity, ratio = [], []
    for s in range(seconds):
        inside = [v for f, v in values_at.items() if s * fps <= f < (s + 1) * fps]
        similarity.append(float(np.mean(inside)) if inside else float("nan"))
        ratio.append(float(np.mean(frames_with_face[s * fps : (s + 1) * fps])))
    return {"identity_similarity": similarity, "face_ratio": ratio}


def check_audio_length(pcm: np.ndarray, path) -> None:
    if len(pcm) < (FRAMES_PER_WINDOW + 1) * SAMPLES_PER_FRAME:
        raise InputError("the speech is shorter than 0.24 s, too short to score lip sync", path)
