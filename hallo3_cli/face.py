"""Face identity for ``encode-ref`` (SPEC §4): detection, ArcFace embedding, face box and mask.

The official code runs insightface ``FaceAnalysis`` (release folder ``face_analysis/models``:
``scrfd_10g_bnkps.onnx`` detector, ``glintr100.onnx`` recognizer) plus a mediapipe landmarker for
the mask. This module redoes the insightface part with onnxruntime and numpy, following insightface
0.7.3 (current at Hallo3's release; 1.0 changed the detector to several input sizes):

- SCRFD: letterbox into ``det_size`` 640×640 keeping the aspect ratio (top-left), ``(x - 127.5) / 128``
  on RGB, anchor decoding per stride, score ≥ 0.5, NMS at IoU 0.4 with ``+1`` pixel areas, boxes
  and keypoints scaled back to the image. The largest box area wins (ties: higher score).
- ArcFace: 5-point similarity (Umeyama, computed like scikit-image) onto the 112×112 template,
  bilinear warp with zero border, ``(x - 127.5) / 127.5`` unless the graph's first 8 nodes include
  both a ``Sub``/``_minus`` and a ``Mul``/``_mul`` node (mxnet conversions; then raw pixels).
  The raw, unnormalised output is the embedding.
- ``cv2.resize`` and ``cv2.warpAffine`` (INTER_LINEAR, uint8) are redone in OpenCV 4.x's fixed-point
  arithmetic. Against insightface 0.7.3 itself (OpenCV 4.10, scikit-image 0.26) on synthetic ONNX
  models, boxes, keypoints, scores and embeddings came out identical. OpenCV 5 changed
  ``warpAffine``: its crops differ from 4.x by a few grey levels.

Which image: the official code analyses the ORIGINAL image (full resolution, before framing),
builds the mask at that resolution, multiplies, and only then frames the image and the masked
image alike (SPEC §7.1). Pass :meth:`FaceAnalyzer.analyze` the original RGB uint8 image; the box is
in its pixels; apply :func:`face_mask` there, then frame.

Face box, and how it differs from the official one. The official box bounds the 36 face-oval
("silhouette") points of the mediapipe landmarker, which we do not ship. Instead we pose
mediapipe's canonical 3D face (``canonical_face_model.obj``, Apache-2.0, same point numbering) on
the face: the weak-perspective pose (yaw, pitch, roll, scale, shift) that best projects its eye
centres, nose tip and mouth corners onto the 5 detected keypoints (:func:`fit_head_pose`); its 36
projected oval points give the box. It follows position, scale and head rotation but is a mean
face (no individual shape or expression). Against mediapipe FaceMesh 0.10.21 on the three test
portraits and their mirror images, with the 5 points taken from that mesh, the box sides were off
by 3.6 % of the face size on average and 10 % at worst (a 2D similarity fit: up to 22 % on turned
heads); with SCRFD's own keypoints this was not measured (no release models here).
Then the official rule (``expand_region``): round, expand ×1.2 about the centre and SHIFT the box
back inside the image keeping its size (SPEC §4 says "clipped"; the code shifts). Deviation: if the
expanded box is larger than the image the official slice starts at a negative index and masks a
sliver at the far edge; we clamp the start at 0.

No face: zero embedding, the whole image as the face box, ``found=False`` (the caller warns).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hallo3_cli.errors import ModelError

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
DET_SIZE = (640, 640)
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
FACE_EXPAND_RATIO = 1.2
EMBEDDING_DIM = 512

# insightface's ArcFace template: eye centres, nose tip, mouth corners in a 112×112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# Mediapipe's canonical face model (``canonical_face_model.obj``, Apache-2.0), in its own units
# (cm) with axes turned to the image's: x right, y down, z away from the camera. Keypoints in
# SCRFD's order: eye centres (mean of each eye contour), nose tip (point 1), mouth corners (61, 291).
CANONICAL_KEYPOINTS = np.array(
    [
        (-3.160, -2.643, -3.626), (3.160, -2.643, -3.626), (0.000, 1.127, -7.476), (-2.456, 4.343, -4.284),
        (2.456, 4.343, -4.284),
    ]
)
# The 36 face-oval points the official mask is built from (mediapipe ids 10, 338, 297, ..., 109).
CANONICAL_SILHOUETTE = np.array(
    [
        (0.000, -8.262, -4.482), (1.891, -8.236, -4.275), (3.524, -8.006, -3.729), (5.133, -7.486, -2.660),
        (6.279, -6.615, -1.426), (7.088, -5.435, -0.100), (7.556, -4.107, 0.992), (7.743, -2.365, 2.005),
        (7.664, -0.673, 2.436), (7.542, 1.049, 2.431), (7.271, 2.891, 2.252), (6.720, 4.789, 1.745),
        (5.941, 6.224, 0.631), (5.085, 7.179, -0.715), (4.069, 7.993, -1.925), (3.211, 8.533, -2.802),
        (2.309, 8.974, -3.609), (1.293, 9.296, -4.094), (0.000, 9.403, -4.264), (-1.293, 9.296, -4.094),
        (-2.309, 8.974, -3.609), (-3.211, 8.533, -2.802), (-4.069, 7.993, -1.925), (-5.085, 7.179, -0.715),
        (-5.941, 6.224, 0.631), (-6.720, 4.789, 1.745), (-7.271, 2.891, 2.252), (-7.542, 1.049, 2.431),
        (-7.664, -0.673, 2.436), (-7.743, -2.365, 2.005), (-7.556, -4.107, 0.992), (-7.088, -5.435, -0.100),
        (-6.279, -6.615, -1.426), (-5.133, -7.486, -2.660), (-3.524, -8.006, -3.729), (-1.891, -8.236, -4.275),
    ]
)
MAX_POSE_ANGLE = np.radians(75.0)


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class FaceResult:
    """The identity of one portrait.

    ``embedding`` (dim,) float32 raw ArcFace output (zeros if no face); ``box`` (4,) int64
    ``x0, y0, x1, y1`` face region (mask box, exclusive ends) in pixels of the analysed image;
    ``detection_box`` (4,) float32 SCRFD box or None; ``score`` detector confidence (0 if none);
    ``kps`` (5, 2) float32 keypoints or None; ``found`` whether a face was detected.
    """

    embedding: np.ndarray
    box: np.ndarray
    score: float = 0.0
    kps: np.ndarray | None = None
    detection_box: np.ndarray | None = None
    found: bool = True

    @classmethod
    def no_face(cls, height: int, width: int, dim: int = EMBEDDING_DIM) -> "FaceResult":
        """The official fallback: zero embedding, whole image as face region."""
        return cls(np.zeros(dim, np.float32), np.array([0, 0, width, height], np.int64), found=False)


@dataclass(frozen=True)
class Detections:
    """Faces found by :class:`ScrfdDetector`, best score first."""

    boxes: np.ndarray  # (n, 4) float32 x0 y0 x1 y1
    scores: np.ndarray  # (n,) float32
    kps: np.ndarray | None  # (n, 5, 2) float32, None for detectors without keypoints

    def __len__(self) -> int:
        return len(self.scores)

    def largest(self) -> int:
        """Index of the face with the largest box area (first one on ties, i.e. the higher score)."""
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(areas))


# ---------------------------------------------------------------------------------------------
# OpenCV-exact image operations (uint8, HWC)


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (INTER_LINEAR) on uint8, bit-exact with OpenCV 4.x.

    Half-pixel centres, edge clamping, 11-bit fixed-point weights; the vertical pass uses the
    arithmetic of OpenCV's SIMD path (``(((a >> 4) * b) >> 16`` summed, then ``+2 >> 2``).
    """
    if image.dtype != np.uint8:
        raise ValueError("resize_linear expects a uint8 image")
    src_h, src_w = image.shape[:2]
    if (src_w, src_h) == (width, height):
        return image.copy()

    def sample_positions(dst: int, src: int) -> tuple[np.ndarray, np.ndarray]:
        scale = 1.0 / (dst / src)  # OpenCV inverts the inverse scale, in double
        pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
        index = np.floor(pos).astype(np.int64)
        return index, pos - index.astype(np.float32)

    def fixed_point(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        one = np.float32(2048)
        return np.rint((np.float32(1) - frac) * one).astype(np.int32), np.rint(frac * one).astype(np.int32)

    sx, fx = sample_positions(width, src_w)
    fx[sx < 0] = 0
    sx[sx < 0] = 0
    fx[sx >= src_w - 1] = 0
    sx[sx >= src_w - 1] = src_w - 1
    ax0, ax1 = fixed_point(fx)
    ax0[sx >= src_w - 1] = 2048
    sx1 = np.minimum(sx + 1, src_w - 1)
    rows = image[:, sx].astype(np.int32) * ax0[None, :, None] + image[:, sx1].astype(np.int32) * ax1[None, :, None]

    sy, fy = sample_positions(height, src_h)  # rows are not clamped, only their indices
    by0, by1 = fixed_point(fy)
    top = rows[np.clip(sy, 0, src_h - 1)] >> 4
    bottom = rows[np.clip(sy + 1, 0, src_h - 1)] >> 4
    value = ((top * by0[:, None, None]) >> 16) + ((bottom * by1[:, None, None]) >> 16)
    return np.clip((value + 2) >> 2, 0, 255).astype(np.uint8)


def warp_affine(image: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, (width, height), borderValue=0)`` (INTER_LINEAR) on uint8.

    ``matrix`` (2, 3) maps source to destination pixels. Bit-exact with OpenCV 4.x: the inverse
    map is evaluated in 1/1024 fixed point, quantised to 1/32 pixel, and interpolated with 15-bit
    weights; samples outside the image count as 0.
    """
    if image.dtype != np.uint8:
        raise ValueError("warp_affine expects a uint8 image")
    m = np.asarray(matrix, np.float64).reshape(6)
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    inv = np.array([m[4] * det, -m[1] * det, 0.0, -m[3] * det, m[0] * det, 0.0])
    inv[2] = -inv[0] * m[2] - inv[1] * m[5]
    inv[5] = -inv[3] * m[2] - inv[4] * m[5]

    xs, ys = np.arange(width), np.arange(height)
    round_delta = 16  # half of one 1/32-pixel step at 1/1024 precision
    x_row = np.rint((inv[1] * ys + inv[2]) * 1024).astype(np.int64) + round_delta
    y_row = np.rint((inv[4] * ys + inv[5]) * 1024).astype(np.int64) + round_delta
    x_fix = (x_row[:, None] + np.rint(inv[0] * xs * 1024).astype(np.int64)[None, :]) >> 5
    y_fix = (y_row[:, None] + np.rint(inv[3] * xs * 1024).astype(np.int64)[None, :]) >> 5
    sx, tx = x_fix >> 5, x_fix & 31
    sy, ty = y_fix >> 5, y_fix & 31

    src_h, src_w = image.shape[:2]
    acc = np.zeros((height, width) + image.shape[2:], np.int64)
    for dy, dx, weight in (
        (0, 0, (32 - ty) * (32 - tx)),
        (0, 1, (32 - ty) * tx),
        (1, 0, ty * (32 - tx)),
        (1, 1, ty * tx),
    ):
        yy, xx = sy + dy, sx + dx
        inside = (yy >= 0) & (yy < src_h) & (xx >= 0) & (xx < src_w)
        pixel = image[np.clip(yy, 0, src_h - 1), np.clip(xx, 0, src_w - 1)].astype(np.int64)
        pixel[~inside] = 0
        weight = weight * 32  # the 1/1024 bilinear weight in 1/32768 units
        acc += pixel * (weight[..., None] if image.ndim == 3 else weight)
    return np.clip((acc + (1 << 14)) >> 15, 0, 255).astype(np.uint8)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio into a zero canvas of ``size`` (width, height), top-left.

    Returns the canvas and the scale (canvas pixels per image pixel), as insightface's detector.
    """
    height, width = image.shape[:2]
    image_ratio = float(height) / width
    if image_ratio > float(size[1]) / size[0]:
        new_h = size[1]
        new_w = max(1, int(new_h / image_ratio))
    else:
        new_w = size[0]
        new_h = max(1, int(new_w * image_ratio))
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    canvas[:new_h, :new_w] = resize_linear(image, new_w, new_h)
    return canvas, float(new_h) / height


# ---------------------------------------------------------------------------------------------
# geometry


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    ``src`` points onto ``dst`` (Umeyama 1991). Returns the (2, 3) float64 matrix.

    Like scikit-image's ``SimilarityTransform.estimate`` (which insightface calls), the means,
    covariance and SVD run in the points' own precision (float32 for detector keypoints), so the
    matrix matches insightface's to the last bits rather than to ~1e-6.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    if not np.issubdtype(src.dtype, np.floating):
        src = src.astype(np.float64)
    if not np.issubdtype(dst.dtype, np.floating):
        dst = dst.astype(np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    signs = np.ones(dim)
    if np.linalg.det(cov) < 0:
        signs[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.count_nonzero(s > s.max() * dim * np.finfo(np.float64).eps)
    if rank == 0:
        raise ValueError("degenerate points: cannot estimate a similarity")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        rotation = u @ vt
    elif rank == dim - 1:
        rotation = u @ np.diag(np.r_[signs[:-1], -1.0]) @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = 1.0 / src_c.var(0).sum() * (s @ signs)
    matrix = np.empty((2, 3))
    matrix[:, :2] = rotation
    matrix[:, 2] = dst_mean - scale * (matrix[:, :2] @ src_mean)
    matrix[:, :2] *= scale
    return matrix


def template_points(size: int = 112) -> np.ndarray:
    """The ArcFace template for a ``size``×``size`` crop (multiples of 112, or of 128 with the
    template centred), as insightface's ``estimate_norm``."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * np.float32(size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        points = ARCFACE_TEMPLATE * np.float32(ratio)
        points[:, 0] += np.float32(8.0 * ratio)
        return points
    raise ValueError(f"no ArcFace template for a {size}x{size} crop")


def alignment_matrix(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) similarity taking the 5 keypoints onto the ArcFace template of a ``size`` crop."""
    return estimate_similarity(np.asarray(kps, np.float32), template_points(size))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    about_z = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return about_z @ about_x @ about_y


def project_canonical(pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Weak-perspective image of canonical-model points for ``pose`` = (yaw, pitch, roll, log
    scale, tx, ty): ``scale * (R @ p)[:2] + t``."""
    yaw, pitch, roll, log_scale, tx, ty = pose
    return np.exp(log_scale) * (np.asarray(points, np.float64) @ _rotation(yaw, pitch, roll)[:2].T) + (tx, ty)


def fit_head_pose(kps: np.ndarray, iterations: int = 50) -> np.ndarray:
    """The weak-perspective pose (yaw, pitch, roll, log scale, tx, ty) that best projects the
    canonical keypoints onto ``kps`` (Gauss-Newton from the frontal similarity fit). Falls back
    to that frontal fit if the solution is not better or turns beyond 75°."""
    kps = np.asarray(kps, np.float64)
    start = estimate_similarity(CANONICAL_KEYPOINTS[:, :2], kps)
    frontal = np.array([0.0, 0.0, np.arctan2(start[1, 0], start[0, 0]), 0.5 * np.log(np.linalg.det(start[:, :2])), *start[:, 2]])

    def residual(pose: np.ndarray) -> np.ndarray:
        return (project_canonical(pose, CANONICAL_KEYPOINTS) - kps).ravel()

    pose = frontal.copy()
    for _ in range(iterations):
        r = residual(pose)
        steps = 1e-6 * np.maximum(1.0, np.abs(pose))
        jacobian = np.stack(
            [(residual(pose + delta) - residual(pose - delta)) / (2 * delta.sum()) for delta in np.diag(steps)], 1
        )
        update = np.linalg.lstsq(jacobian, -r, rcond=None)[0]
        pose = pose + update
        if not np.all(np.isfinite(pose)) or np.abs(update).max() < 1e-10:
            break
    plausible = np.all(np.isfinite(pose)) and np.abs(pose[:2]).max() <= MAX_POSE_ANGLE
    if not plausible or np.linalg.norm(residual(pose)) > np.linalg.norm(residual(frontal)):
        return frontal
    return pose


def silhouette_points(kps: np.ndarray) -> np.ndarray:
    """The canonical face oval (36 points) posed by the face's 5 keypoints, in image pixels."""
    return project_canonical(fit_head_pose(kps), CANONICAL_SILHOUETTE)


def expand_box(box: Sequence[float], height: int, width: int, ratio: float = FACE_EXPAND_RATIO) -> np.ndarray:
    """The official mask box rule: round, scale by ``ratio`` about the centre (integer halves),
    shift back inside the image keeping the size, then (our fix) clamp the start at 0 when the
    box is larger than the image. Returns int64 ``x0, y0, x1, y1`` (exclusive ends)."""
    x0, y0, x1, y1 = np.round(np.asarray(box, np.float64))

    def axis(lo: float, hi: float, limit: int) -> tuple[int, int]:
        mid = (hi + lo) // 2
        half = ((hi - lo) * ratio) // 2
        lo, hi = mid - half, mid + half
        if lo < 0:
            hi -= lo
            lo = 0.0
        if hi > limit:
            lo -= hi - limit
            hi = float(limit)
        return int(round(max(lo, 0.0))), int(round(hi))

    x0, x1 = axis(x0, x1, width)
    y0, y1 = axis(y0, y1, height)
    return np.array([x0, y0, x1, y1], np.int64)


def face_box(
    height: int,
    width: int,
    kps: np.ndarray | None = None,
    detection_box: np.ndarray | None = None,
    ratio: float = FACE_EXPAND_RATIO,
) -> np.ndarray:
    """Face region of an image: the box of the canonical silhouette placed by ``kps`` (else the
    detector box), expanded by :func:`expand_box`; the whole image when neither is given."""
    if kps is not None:
        points = silhouette_points(kps)
        extent = np.r_[points.min(0), points.max(0)]
    elif detection_box is not None:
        extent = np.asarray(detection_box, np.float64)
    else:
        return np.array([0, 0, width, height], np.int64)
    return expand_box(extent, height, width, ratio)


def face_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """(height, width) float32 mask: 1 inside ``box`` (x0, y0, x1, y1, exclusive ends), 0 outside."""
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = np.zeros((height, width), np.float32)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1.0
    return mask


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy non-maximum suppression with insightface's inclusive (+1 pixel) box areas."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = inter_w * inter_h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


# ---------------------------------------------------------------------------------------------
# onnxruntime plumbing


def providers_for_device(device: str = "cpu") -> list:
    """onnxruntime execution providers for a torch-style device string (falls back to CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _open_session(path: str | Path, providers: Sequence | None):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError("ONNX model file not found", path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"cannot load ONNX model ({_ort_reason(err)})", path) from None


def _ort_reason(err: Exception) -> str:
    """The useful part of an onnxruntime load error (no status prefix, path or C++ location)."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .* failed:", "", text)
    text = re.sub(r"^/\S+:\d+ .*?\) ", "", text)
    return text[:300]


def _read_varint(stream) -> int:
    value = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("truncated protobuf")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("bad protobuf varint")


def _proto_fields(stream, start: int, end: int):
    """Yield ``(field number, wire type, value offset, value length)`` of one protobuf message."""
    pos = start
    while pos < end:
        stream.seek(pos)
        key = _read_varint(stream)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _read_varint(stream)
            length = 0
        elif wire == 1:
            length = 8
        elif wire == 2:
            length = _read_varint(stream)
        elif wire == 5:
            length = 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        offset = stream.tell()
        yield number, wire, offset, length
        pos = offset + length
        if pos > end:
            raise ValueError("truncated protobuf")


def onnx_node_names(path: str | Path, limit: int = 8) -> list[str]:
    """Names of the first ``limit`` nodes of an ONNX model, read from the protobuf wire format
    (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.name = 3) without loading the weights
    and without the ``onnx`` package."""
    names: list[str] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        graph = next(((o, n) for num, wire, o, n in _proto_fields(f, 0, size) if num == 7 and wire == 2), None)
        if graph is None:
            raise ValueError("no graph in ONNX model")
        for number, wire, offset, length in _proto_fields(f, graph[0], graph[0] + graph[1]):
            if number != 1 or wire != 2:
                continue
            f.seek(offset)
            node = io.BytesIO(f.read(length))
            name = ""
            for field, kind, value_offset, value_length in _proto_fields(node, 0, length):
                if field == 3 and kind == 2:
                    node.seek(value_offset)
                    name = node.read(value_length).decode("utf-8", "replace")
            names.append(name)
            if len(names) >= limit:
                break
    return names


# ---------------------------------------------------------------------------------------------
# models


class ScrfdDetector:
    """SCRFD face detector (insightface ``scrfd_*`` ONNX) on onnxruntime.

    The output count gives the layout, as insightface reads it: 6 / 9 outputs = strides 8, 16, 32
    with 2 anchors per cell (9 = with keypoints); 10 / 15 = strides 8..128 with 1 anchor. Outputs
    come grouped as scores, then box distances, then keypoint distances, one per stride.
    """

    # output count -> (strides, anchors per cell, keypoints)
    _LAYOUTS = {
        6: ((8, 16, 32), 2, False),
        9: ((8, 16, 32), 2, True),
        10: ((8, 16, 32, 64, 128), 1, False),
        15: ((8, 16, 32, 64, 128), 1, True),
    }

    def __init__(
        self,
        path: str | Path,
        providers: Sequence | None = None,
        det_size: tuple[int, int] = DET_SIZE,
        score_threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
    ):
        self.path = Path(path)
        self.session = _open_session(path, providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) not in self._LAYOUTS:
            raise ModelError(
                f"not an SCRFD face detector ({len(inputs)} inputs, {len(outputs)} outputs; "
                "expected 1 image input and 6, 9, 10 or 15 outputs)",
                self.path,
            )
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in outputs]
        self.strides, self.num_anchors, self.has_keypoints = self._LAYOUTS[len(outputs)]
        height, width = inputs[0].shape[2:4]
        # a graph with a fixed input size wins over det_size, as in insightface
        self.input_size = (width, height) if isinstance(width, int) and isinstance(height, int) else tuple(det_size)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def _stride_outputs(self, outputs: list[np.ndarray], input_h: int, input_w: int):
        count = len(self.strides)
        for index, stride in enumerate(self.strides):
            rows = (input_h // stride) * (input_w // stride) * self.num_anchors
            groups = [outputs[index], outputs[index + count]] + ([outputs[index + 2 * count]] if self.has_keypoints else [])
            arrays = []
            for array, width in zip(groups, (1, 4, 10)):
                array = np.asarray(array, np.float32)
                if array.ndim == 3 and array.shape[0] == 1:  # batched export
                    array = array[0]
                if array.shape != (rows, width):
                    raise ModelError(
                        f"unexpected SCRFD output shape {array.shape} at stride {stride} (expected {(rows, width)})", self.path
                    )
                arrays.append(array)
            yield stride, arrays

    def detect(self, image: np.ndarray) -> Detections:
        """Faces in an RGB uint8 image (H, W, 3), in its pixel coordinates."""
        image = _check_rgb(image)
        canvas, scale = letterbox(image, self.input_size)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        input_h, input_w = blob.shape[2:]
        scores, boxes, points = [], [], []
        for stride, (score, box_dist, *kps_dist) in self._stride_outputs(outputs, input_h, input_w):
            grid_h, grid_w = input_h // stride, input_w // stride
            ys, xs = np.mgrid[:grid_h, :grid_w]
            centres = (np.stack([xs, ys], -1).astype(np.float32) * stride).reshape(-1, 2)
            centres = np.repeat(centres, self.num_anchors, axis=0)  # anchors of one cell are consecutive
            hits = np.where(score[:, 0] >= self.score_threshold)[0]
            distance = box_dist[hits] * stride
            c = centres[hits]
            boxes.append(np.concatenate([c - distance[:, :2], c + distance[:, 2:]], 1))
            scores.append(score[hits, 0])
            if self.has_keypoints:
                points.append(c[:, None, :] + (kps_dist[0][hits] * stride).reshape(-1, 5, 2))
        scores = np.concatenate(scores).astype(np.float32)
        order = scores.argsort()[::-1]
        boxes = (np.concatenate(boxes) / scale).astype(np.float32)[order]
        scores = scores[order]
        keep = nms(boxes, scores, self.nms_threshold)
        kps = (np.concatenate(points) / scale).astype(np.float32)[order][keep] if self.has_keypoints else None
        return Detections(boxes[keep], scores[keep], kps)


class ArcFaceRecognizer:
    """ArcFace recognizer (insightface ``glintr100`` and kin) on onnxruntime."""

    def __init__(self, path: str | Path, providers: Sequence | None = None):
        self.path = Path(path)
        self.session = _open_session(path, providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or len(outputs) != 1 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ModelError("not an ArcFace recognizer (expected one square image input and one output)", self.path)
        self.input_size = int(shape[2])
        try:
            template_points(self.input_size)
        except ValueError:
            message = f"unsupported recognizer input size {self.input_size} (multiples of 112 or 128)"
            raise ModelError(message, self.path) from None
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        dim = outputs[0].shape[-1]
        self.embedding_dim = int(dim) if isinstance(dim, int) else EMBEDDING_DIM
        try:
            names = onnx_node_names(self.path)
        except (ValueError, OSError) as err:
            raise ModelError(f"cannot read the ONNX graph ({err})", self.path) from None
        # converted mxnet models subtract and scale inside the graph (insightface's test)
        subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
        normalises_inside = subtracts and any(n.startswith(("Mul", "_mul")) for n in names)
        self.input_mean, self.input_std = (0.0, 1.0) if normalises_inside else (127.5, 127.5)

    def align(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The aligned ``input_size``² uint8 crop of an RGB image for 5 keypoints."""
        matrix = alignment_matrix(kps, self.input_size)
        return warp_affine(_check_rgb(image), matrix, self.input_size, self.input_size)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) float32 embedding of the face at ``kps`` in an RGB uint8 image."""
        crop = self.align(image, kps)
        blob = ((crop.astype(np.float64) - self.input_mean) * (1.0 / self.input_std)).astype(np.float32)
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
        return np.asarray(self.session.run([self.output_name], {self.input_name: blob})[0], np.float32).reshape(-1)


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

    def analyze(self, image: np.ndarray) -> FaceResult:
        """Identity of the largest face of an RGB uint8 ORIGINAL image (before framing)."""
        image = _check_rgb(image)
        height, width = image.shape[:2]
        faces = self.detector.detect(image)
        if len(faces) == 0:
            return FaceResult.no_face(height, width, self.recognizer.embedding_dim)
        index = faces.largest()
        kps = faces.kps[index]
        return FaceResult(
            embedding=self.recognizer.embed(image, kps),
            box=face_box(height, width, kps=kps),
            score=float(faces.scores[index]),
            kps=kps,
            detection_box=faces.boxes[index],
            found=True,
        )


def load_face_analyzer(preset, providers: Sequence | None = None) -> FaceAnalyzer | None:
    """The face analyzer of a preset; None for random presets (they have no face models: use
    :meth:`FaceResult.no_face`) unless their table names a ``face_models`` folder (tests build small ONNX
    models there). Missing release files raise ModelError."""
    if preset.is_random:
        folder = preset.table.get("face_models")
        return FaceAnalyzer.from_dir(folder, providers) if folder else None
    return FaceAnalyzer.from_dir(preset.require("face_analysis"), providers)


def _find_model(folder: Path, name: str) -> Path:
    for sub in (".", "models", "face_analysis/models"):
        candidate = folder / sub / name
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"face model {name} not found (looked in ., models/ and face_analysis/models/); run: hallo3 download", folder
    )


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError("empty image")
    return image
