"""Detector + recognizer: the official face identity of a portrait (largest face, raw embedding, face box)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hallo3_cli.errors import ModelError
from hallo3_cli.face.detector import DET_SIZE, DETECTOR_FILE, ScrfdDetector
from hallo3_cli.face.geometry import FACE_EXPAND_RATIO, check_rgb, face_box
from hallo3_cli.face.recognizer import EMBEDDING_DIM, RECOGNIZER_FILE, ArcFaceRecognizer


@dataclass(frozen=True)
class FaceResult:
    """The identity of one portrait.

    ``embedding`` (dim,) float32 raw ArcFace output (zeros if no face); ``box`` (4,) int64
    ``x0, y0, x1, y1`` face region (mask box, exclusive ends) in pixels of the analysed image;
    ``detection_box`` (4,) float32 SCRFD box or None; ``score`` detector confidence (0 if none);
    ``kps`` (5, 2) float32 keypoints or None; ``found`` whether a face was detected; ``count`` how many faces
    were detected (training data keeps only videos with exactly one per frame, docs/model.md §10.1).
    """

    embedding: np.ndarray
    box: np.ndarray
    score: float = 0.0
    kps: np.ndarray | None = None
    detection_box: np.ndarray | None = None
    found: bool = True
    count: int = 1

    @classmethod
    def no_face(cls, height: int, width: int, dim: int = EMBEDDING_DIM) -> "FaceResult":
        """The official fallback: zero embedding, whole image as face region."""
        return cls(np.zeros(dim, np.float32), np.array([0, 0, width, height], np.int64), found=False, count=0)


class FaceAnalyzer:
    """Detector + recognizer: :meth:`analyze` gives the official face identity of a portrait."""

    def __init__(
        self,
        detector_path: str | Path,
        recognizer_path: str | Path,
        providers: Sequence | None = None,
        det_size: tuple[int, int] = DET_SIZE,
    ):
        self.detector = ScrfdDetector(detector_path, providers, det_size)
        if not self.detector.has_keypoints:
            raise ModelError("the face detector gives no keypoints; ArcFace alignment needs them", self.detector.path)
        self.recognizer = ArcFaceRecognizer(recognizer_path, providers)

    @classmethod
    def from_dir(cls, folder: str | Path, providers: Sequence | None = None) -> "FaceAnalyzer":
        """Load ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` from ``folder`` (or its
        ``models/`` or ``face_analysis/models/`` subfolder, as laid out in the release)."""
        folder = Path(folder)
        paths = [_find_model(folder, name) for name in (DETECTOR_FILE, RECOGNIZER_FILE)]
        return cls(paths[0], paths[1], providers)

    def analyze(self, image: np.ndarray, *, ratio: float = FACE_EXPAND_RATIO, embed: bool = True) -> FaceResult:
        """Identity of the largest face of an RGB uint8 ORIGINAL image (before framing).

        ``ratio``: the face box's expansion (inference 1.2; the training data's per-frame boxes 1.0,
        docs/model.md §10.1). ``embed=False`` skips the recognizer (the embedding is then zeros): training data
        embeds one frame per video but looks for faces in all of them."""
        image = check_rgb(image)
        height, width = image.shape[:2]
        faces = self.detector.detect(image)
        if len(faces) == 0:
            return FaceResult.no_face(height, width, self.recognizer.embedding_dim)
        index = faces.largest()
        kps = faces.kps[index]
        return FaceResult(
            embedding=self.recognizer.embed(image, kps) if embed else np.zeros(self.recognizer.embedding_dim, np.float32),
            box=face_box(height, width, kps=kps, ratio=ratio),
            score=float(faces.scores[index]),
            kps=kps,
            detection_box=faces.boxes[index],
            found=True,
            count=len(faces),
        )


def _find_model(folder: Path, name: str) -> Path:
    for sub in (".", "models", "face_analysis/models"):
        candidate = folder / sub / name
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"face model {name} not found (looked in ., models/ and face_analysis/models/); run: hallo3 download", folder
    )
