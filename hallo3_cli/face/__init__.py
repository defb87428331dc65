"""Face identity for ``encode-ref`` (docs/model.md §4): detection, ArcFace embedding, face box and mask.

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
image alike (docs/model.md §7.1). Pass :meth:`FaceAnalyzer.analyze` the original RGB uint8 image; the box is
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
back inside the image keeping its size (docs/model.md §4 says "clipped"; the code shifts). Deviation: if the
expanded box is larger than the image the official slice starts at a negative index and masks a
sliver at the far edge; we clamp the start at 0.

No face: zero embedding, the whole image as the face box, ``found=False`` (the caller warns).

- :mod:`.detector`: SCRFD; :mod:`.recognizer`: ArcFace; :mod:`.analyzer`: both, the largest face;
- :mod:`.geometry`: OpenCV-exact resize/warp, alignment, head pose, face box and mask, NMS;
- :mod:`.onnx`: onnxruntime sessions and providers.
"""

from hallo3_cli.face.analyzer import FaceAnalyzer, FaceResult
from hallo3_cli.face.detector import DET_SIZE, DETECTOR_FILE, SCORE_THRESHOLD, Detections, ScrfdDetector
from hallo3_cli.face.geometry import (ARCFACE_TEMPLATE, CANONICAL_KEYPOINTS, CANONICAL_SILHOUETTE, FACE_EXPAND_RATIO,
                                      MAX_POSE_ANGLE, NMS_THRESHOLD, alignment_matrix, estimate_similarity,
                                      expand_box, face_box, face_mask, fit_head_pose, letterbox, nms,
                                      project_canonical, resize_linear, silhouette_points, template_points,
                                      warp_affine)
from hallo3_cli.face.onnx import onnx_node_names, providers_for_device
from hallo3_cli.face.recognizer import EMBEDDING_DIM, RECOGNIZER_FILE, ArcFaceRecognizer

__all__ = ["ARCFACE_TEMPLATE", "CANONICAL_KEYPOINTS", "CANONICAL_SILHOUETTE", "DETECTOR_FILE", "DET_SIZE",
           "EMBEDDING_DIM", "FACE_EXPAND_RATIO", "MAX_POSE_ANGLE", "NMS_THRESHOLD", "RECOGNIZER_FILE",
           "SCORE_THRESHOLD", "ArcFaceRecognizer", "Detections", "FaceAnalyzer", "FaceResult", "ScrfdDetector",
           "alignment_matrix", "estimate_similarity", "expand_box", "face_box", "face_mask", "fit_head_pose",
           "letterbox", "nms", "onnx_node_names", "project_canonical", "providers_for_device", "resize_linear",
           "silhouette_points", "template_points", "warp_affine"]
