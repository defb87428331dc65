"""ArcFace, the release's face recognizer (insightface ``glintr100``), on onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hallo3_cli.errors import ModelError
from hallo3_cli.face.geometry import check_rgb, alignment_matrix, template_points, warp_affine
from hallo3_cli.face.onnx import onnx_node_names, open_session

RECOGNIZER_FILE = "glintr100.onnx"
EMBEDDING_DIM = 512


class ArcFaceRecognizer:
    """ArcFace recognizer (insightface ``glintr100`` and kin) on onnxruntime."""

    def __init__(self, path: str | Path, providers: Sequence | None = None):
        self.path = Path(path)
        self.session = open_session(path, providers)
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
        return warp_affine(check_rgb(image), matrix, self.input_size, self.input_size)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) float32 embedding of the face at ``kps`` in an RGB uint8 image."""
        crop = self.align(image, kps)
        blob = ((crop.astype(np.float64) - self.input_mean) * (1.0 / self.input_std)).astype(np.float32)
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
        return np.asarray(self.session.run([self.output_name], {self.input_name: blob})[0], np.float32).reshape(-1)
