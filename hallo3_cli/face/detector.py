"""SCRFD, the release's face detector (insightface ``scrfd_10g_bnkps``), on onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hallo3_cli.errors import ModelError
from hallo3_cli.face.geometry import NMS_THRESHOLD, check_rgb, letterbox, nms
from hallo3_cli.face.onnx import open_session

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
DET_SIZE = (640, 640)
SCORE_THRESHOLD = 0.5


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
        self.session = open_session(path, providers)
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
        image = check_rgb(image)
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
