"""The face's geometry: OpenCV-exact resize and warp (uint8), the 5-point similarity alignment, the head-pose fit
that places mediapipe's canonical face on the keypoints, the face box and mask, and NMS."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FACE_EXPAND_RATIO = 1.2
NMS_THRESHOLD = 0.4
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


def check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError("empty image")
    return image
