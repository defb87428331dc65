"""Face analysis (docs/model.md §4) on small ONNX graphs built here: fake SCRFD detectors whose outputs are
simple functions of the image, and fake ArcFace recognizers with known arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from hallo3_cli.store import write_marker
from hallo3_cli import face  # noqa: E402
from hallo3_cli.errors import ModelError  # noqa: E402

STRIDES = (8, 16, 32)


# ---------------------------------------------------------------------------------------------
# fake models


def _node(op: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
    """One node, named after its output."""
    return helper.make_node(op, inputs, [output], name=f"{op}_{output}", **attributes)


def _const(name: str, array) -> onnx.NodeProto:
    return _node("Constant", [], name, value=numpy_helper.from_array(np.asarray(array, np.float32), name))


def _int_const(name: str, values) -> onnx.NodeProto:
    return _node("Constant", [], name, value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def make_scrfd(
    path: Path,
    *,
    with_kps: bool = True,
    batched: bool = False,
    static: tuple[int, int] | None = None,
    base: float = 2.0,
    gain: float = 0.0,
    kps_offsets=(-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.4, 0.5, 0.4, 0.5),
) -> Path:
    """A fake SCRFD graph (9 outputs, or 6 without keypoints).

    At stride 32 the score of a cell is the mean of the network's first input channel (R after
    insightface's BGR→RGB swap, normalised (x - 127.5) / 128) over that 32×32 cell; box distances
    are ``base + gain * mean(G)`` in stride units; keypoint offsets are constant. Strides 8 and 16
    score -1 everywhere. Both anchors of a cell get the same values.
    """
    nodes = [_int_const("flat1", [-1, 1]), _int_const("flat4", [-1, 4]), _int_const("flat10", [-1, 10])]
    nodes += [_int_const("ax", [1]), _int_const("ax0", [0]), _const("zero", 0.0), _const("minus_one", -1.0)]
    for c in range(3):
        nodes += [_int_const(f"c{c}", [c]), _int_const(f"c{c + 1}_end", [c + 1])]
    nodes += [_const("kps_const", np.asarray(kps_offsets)[None]), _const("gain4", np.full((1, 4), gain))]
    nodes += [_const("base4", np.full((1, 4), base))]
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        nodes.append(_node("AveragePool", ["input.1"], f"pool{s}", kernel_shape=[s, s], strides=[s, s]))
        for c, channel in enumerate("RG"):
            nodes.append(_node("Slice", [f"pool{s}", f"c{c}", f"c{c + 1}_end", "ax"], f"{channel}{s}"))
            nodes.append(_node("Reshape", [f"{channel}{s}", "flat1"], f"{channel}col{s}"))
        if s == 32:
            score = "Rcol32"
        else:
            nodes.append(_node("Mul", [f"Rcol{s}", "zero"], f"zeroed{s}"))
            nodes.append(_node("Add", [f"zeroed{s}", "minus_one"], f"low{s}"))
            score = f"low{s}"
        nodes.append(_node("Mul", [f"Gcol{s}", "gain4"], f"g4_{s}"))
        nodes.append(_node("Add", [f"g4_{s}", "base4"], f"dist{s}"))
        nodes.append(_node("Mul", [f"Gcol{s}", "zero"], f"gz{s}"))
        nodes.append(_node("Add", [f"gz{s}", "kps_const"], f"kp{s}"))
        for kind, source, width in (("score", score, 1), ("bbox", f"dist{s}", 4), ("kps", f"kp{s}", 10)):
            name = f"{kind}_{s}"
            nodes.append(_node("Concat", [source, source], f"{name}_pair", axis=1))
            target = name if not batched else f"{name}_flat"
            nodes.append(_node("Reshape", [f"{name}_pair", f"flat{width}"], target))
            if batched:
                nodes.append(_node("Unsqueeze", [target, "ax0"], name))
            rows = None if static is None else (static[0] // s) * (static[1] // s) * 2
            shape = ([1] if batched else []) + [rows, width]
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    height, width = static if static is not None else ("h", "w")
    graph = helper.make_graph(
        nodes,
        "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, height, width])],
        outputs["score"] + outputs["bbox"] + (outputs["kps"] if with_kps else []),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_flatten_recognizer(path: Path, size: int = 112, normalise_inside: bool = False) -> Path:
    """Embedding = the network input itself, flattened (so tests can read the aligned crop back).

    ``normalise_inside``: mxnet-style graph starting with ``_minus``/``_mul`` nodes that compute
    ``(x - 127.5) / 127.5`` themselves (insightface then feeds raw pixels)."""
    nodes, source = [], "data"
    if normalise_inside:
        nodes += [_const("mean", 127.5), _const("scale", 1.0 / 127.5)]
        nodes.append(helper.make_node("Sub", ["data", "mean"], ["centred"], name="_minus0"))
        nodes.append(helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"))
        source = "scaled"
    nodes.append(helper.make_node("Flatten", [source], ["fc1"], name="Flatten_0", axis=1))
    graph = helper.make_graph(
        nodes,
        "fake_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [None, 3 * size * size])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def make_matmul_recognizer(path: Path, weight: np.ndarray) -> Path:
    """Embedding = flatten(AveragePool 8×8 of the input) @ weight (588 → 512)."""
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["embedding"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "fake_arcface_fc",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("face_models")
    return {
        "scrfd": make_scrfd(root / "scrfd.onnx"),
        "scrfd_sized": make_scrfd(root / "scrfd_sized.onnx", base=2.0, gain=1.0),
        "scrfd_batched": make_scrfd(root / "scrfd_batched.onnx", batched=True, static=(640, 640)),
        "scrfd_nokps": make_scrfd(root / "scrfd_nokps.onnx", with_kps=False),
        "flat": make_flatten_recognizer(root / "flat.onnx"),
        "flat_mxnet": make_flatten_recognizer(root / "flat_mxnet.onnx", normalise_inside=True),
    }


# ---------------------------------------------------------------------------------------------
# helpers


def det_scale(height: int, width: int, size: int = 640) -> float:
    """insightface's letterbox scale, written out independently."""
    if height / width > 1:
        return size / height
    return int(size * height / width) / height


def paint_cell(image: np.ndarray, col: int, row: int, scale: float, rgb) -> None:
    """Colour the image pixels that land entirely inside stride-32 cell (col, row) after letterboxing."""
    x0, x1 = math.ceil(col * 32 / scale), math.floor((col + 1) * 32 / scale)
    y0, y1 = math.ceil(row * 32 / scale), math.floor((row + 1) * 32 / scale)
    image[y0:y1, x0:x1] = rgb


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float64)
    channels = []
    for _ in range(3):
        fx, fy, px, py = rng.uniform(0.02, 0.08, 2).tolist() + rng.uniform(0, 6, 2).tolist()
        channels.append(127.5 + 100 * np.sin(fx * x + px) * np.cos(fy * y + py))
    return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


# ---------------------------------------------------------------------------------------------
# OpenCV-equivalent image operations


def test_resize_linear_half_pixel_values():
    row = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)  # 1 × 2
    out = face.resize_linear(row, 4, 1)[0, :, 0]
    # half-pixel centres: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    assert out.tolist() == [0, round(0.25 * 255), round(0.75 * 255), 255]
    flat = np.full((7, 9, 3), 77, np.uint8)
    assert (face.resize_linear(flat, 20, 3) == 77).all()
    assert face.resize_linear(flat, 9, 7) is not flat and np.array_equal(face.resize_linear(flat, 9, 7), flat)


def test_warp_affine_translations():
    image = smooth_image(20, 30)
    assert np.array_equal(face.warp_affine(image, [[1, 0, 0], [0, 1, 0]], 30, 20), image)
    shifted = face.warp_affine(image, [[1, 0, 3], [0, 1, -2]], 30, 20)
    assert np.array_equal(shifted[:18, 3:], image[2:, :27])
    assert (shifted[:, :3] == 0).all() and (shifted[18:] == 0).all()
    half = face.warp_affine(image, [[1, 0, -0.5], [0, 1, 0]], 30, 20).astype(int)
    expected = (image[:, :-1].astype(int) + image[:, 1:] + 1) // 2
    assert np.array_equal(half[:, :-1], expected)


def test_image_operations_match_opencv_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    for h, w, nw, nh in [(300, 200, 426, 640), (200, 300, 640, 426), (999, 1333, 640, 480), (64, 64, 640, 640)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(face.resize_linear(image, nw, nh), cv2.resize(image, (nw, nh)))
    if not cv2.__version__.startswith("4."):
        pytest.skip("warpAffine is only reproduced for OpenCV 4.x")
    for seed in range(5):
        image = rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)
        kps = face.ARCFACE_TEMPLATE * rng.uniform(0.5, 3) + rng.uniform(0, 150, 2) + rng.normal(0, 2, (5, 2))
        matrix = face.alignment_matrix(kps.astype(np.float32))
        expected = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0)
        assert np.array_equal(face.warp_affine(image, matrix, 112, 112), expected)


def test_estimate_similarity_recovers_known_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 200, (5, 2))
    for scale, angle, tx, ty in [(0.37, 12.0, 5.0, -40.0), (2.5, -150.0, 300.0, 10.0), (1.0, 0.0, 0.0, 0.0)]:
        truth = similarity(scale, angle, tx, ty)
        assert np.allclose(face.estimate_similarity(src, apply(truth, src)), truth, atol=1e-9)
    noisy = apply(similarity(1.3, 40, 2, 3), src) + rng.normal(0, 0.5, src.shape)
    fitted = face.estimate_similarity(src, noisy)
    linear = fitted[:, :2]
    assert np.linalg.det(linear) > 0 and np.allclose(linear @ linear.T / np.linalg.det(linear), np.eye(2), atol=1e-9)
    mirrored = src * [-1, 1]  # no reflection allowed: still a proper rotation
    assert np.linalg.det(face.estimate_similarity(src, mirrored)[:, :2]) > 0


# ---------------------------------------------------------------------------------------------
# detector


@pytest.mark.parametrize("height,width", [(300, 200), (200, 300), (640, 640)])
def test_detector_decodes_and_rescales_letterboxed_faces(models, height, width):
    detector = face.ScrfdDetector(models["scrfd"])
    assert detector.has_keypoints and detector.input_size == (640, 640)
    scale = det_scale(height, width)
    image = np.zeros((height, width, 3), np.uint8)
    paint_cell(image, 4, 6, scale, (255, 0, 0))
    faces = detector.detect(image)
    assert len(faces) == 1  # both anchors of the cell fire, NMS keeps one
    anchor = np.array([4 * 32, 6 * 32], np.float64)
    expected_box = np.r_[anchor - 2 * 32, anchor + 2 * 32] / scale
    assert np.allclose(faces.boxes[0], expected_box, atol=1e-3)
    offsets = np.array([-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.4, 0.5, 0.4, 0.5]).reshape(5, 2)
    assert np.allclose(faces.kps[0], (anchor + offsets * 32) / scale, atol=1e-3)
    assert 0.5 <= faces.scores[0] <= 255 / 256  # a mostly-white cell, normalised by (x - 127.5) / 128


def test_detector_threshold_and_nms(models):
    detector = face.ScrfdDetector(models["scrfd"])
    image = np.zeros((640, 640, 3), np.uint8)
    paint_cell(image, 2, 2, 1.0, (150, 0, 0))  # mean (150 - 127.5) / 128 < 0.5: below threshold
    assert len(detector.detect(image)) == 0
    paint_cell(image, 10, 10, 1.0, (255, 0, 0))
    paint_cell(image, 11, 10, 1.0, (230, 0, 0))  # neighbour: boxes overlap with IoU ~0.6 > 0.4
    paint_cell(image, 15, 3, 1.0, (240, 0, 0))  # far away: kept
    faces = detector.detect(image)
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    assert np.allclose(centres, [[320, 320], [480, 96]], atol=1e-3)
    assert faces.scores[0] > faces.scores[1]


def test_nms_inclusive_areas():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [0, 0, 9, 9.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    # IoU(0, 1) = 50 / 150 with +1 areas; IoU(0, 2) ~ 0.95
    assert face.nms(boxes, scores, 0.4) == [0, 1]
    assert face.nms(boxes, scores, 0.3) == [0]
    assert face.nms(boxes[::-1], scores[::-1], 0.4) == [2, 1]


def test_batched_static_detector_matches_dynamic(models):
    image = np.zeros((480, 360, 3), np.uint8)
    scale = det_scale(480, 360)
    paint_cell(image, 3, 9, scale, (255, 0, 0))
    plain = face.ScrfdDetector(models["scrfd"]).detect(image)
    batched_detector = face.ScrfdDetector(models["scrfd_batched"], det_size=(320, 320))
    assert batched_detector.input_size == (640, 640)  # the graph's fixed size wins
    batched = batched_detector.detect(image)
    assert len(plain) == 1 and np.array_equal(plain.boxes, batched.boxes) and np.array_equal(plain.kps, batched.kps)


def test_detector_without_keypoints(models):
    detector = face.ScrfdDetector(models["scrfd_nokps"])
    image = np.zeros((640, 640, 3), np.uint8)
    paint_cell(image, 5, 5, 1.0, (255, 0, 0))
    faces = detector.detect(image)
    assert not detector.has_keypoints and faces.kps is None and len(faces) == 1
    with pytest.raises(ModelError, match="keypoints"):
        face.FaceAnalyzer(models["scrfd_nokps"], models["flat"])


def test_largest_face_wins_over_higher_score(models):
    analyzer = face.FaceAnalyzer(models["scrfd_sized"], models["flat"])
    image = np.zeros((640, 640, 3), np.uint8)
    paint_cell(image, 3, 3, 1.0, (255, 0, 0))  # high score, G black: distances ~1 stride
    paint_cell(image, 14, 14, 1.0, (215, 255, 0))  # lower score, G white: distances ~3 strides
    faces = analyzer.detector.detect(image)
    assert len(faces) == 2 and faces.scores[0] > faces.scores[1]
    result = analyzer.analyze(image)
    assert result.found and result.score == pytest.approx(float(faces.scores[1]))
    assert np.allclose((result.detection_box[:2] + result.detection_box[2:]) / 2, [14 * 32, 14 * 32], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# recognizer


def test_alignment_recovers_template_content(models):
    recognizer = face.ArcFaceRecognizer(models["flat"])
    content = smooth_image(112, 112, seed=5)
    placement = similarity(2.7, 23.0, 160.0, 35.0)  # template frame -> photo
    photo = face.warp_affine(content, placement, 520, 480)
    kps = apply(placement, face.ARCFACE_TEMPLATE).astype(np.float32)
    aligned = recognizer.align(photo, kps).astype(int)
    interior = np.abs(aligned - content)[4:-4, 4:-4]
    assert interior.mean() < 1.5 and np.percentile(interior, 99) <= 6


@pytest.mark.parametrize("name,mean,std", [("flat", 127.5, 127.5), ("flat_mxnet", 0.0, 1.0)])
def test_recognizer_normalisation_follows_graph(models, name, mean, std):
    recognizer = face.ArcFaceRecognizer(models[name])
    assert (recognizer.input_mean, recognizer.input_std) == (mean, std)
    photo = smooth_image(300, 260, seed=2)
    kps = (face.ARCFACE_TEMPLATE * 1.8 + [40, 60]).astype(np.float32)
    crop = recognizer.align(photo, kps)
    embedding = recognizer.embed(photo, kps)
    assert embedding.dtype == np.float32 and embedding.shape == (3 * 112 * 112,) == (recognizer.embedding_dim,)
    expected = ((crop.astype(np.float64) - 127.5) / 127.5).transpose(2, 0, 1).reshape(-1)  # RGB, CHW
    assert np.allclose(embedding, expected, atol=1e-6)


def test_raw_512_embedding(tmp_path):
    weight = np.random.default_rng(4).normal(0, 1, (3 * 14 * 14, 512))
    recognizer = face.ArcFaceRecognizer(make_matmul_recognizer(tmp_path / "fc.onnx", weight))
    photo = smooth_image(200, 200, seed=9)
    kps = (face.ARCFACE_TEMPLATE + [30, 20]).astype(np.float32)
    blob = (recognizer.align(photo, kps).astype(np.float64) - 127.5) / 127.5
    pooled = blob.transpose(2, 0, 1).reshape(3, 14, 8, 14, 8).mean((2, 4)).reshape(-1)
    embedding = recognizer.embed(photo, kps)
    assert embedding.shape == (512,) and recognizer.embedding_dim == 512
    assert np.allclose(embedding, pooled @ weight, rtol=1e-4, atol=1e-4)
    assert abs(np.linalg.norm(embedding) - 1) > 0.1  # raw, not L2-normalised


def test_node_name_reader_matches_onnx(models, tmp_path):
    weight = np.ones((588, 512))
    for path in (models["flat_mxnet"], models["scrfd"], make_matmul_recognizer(tmp_path / "fc.onnx", weight)):
        names = [node.name for node in onnx.load(str(path)).graph.node]
        assert face.onnx_node_names(path) == names[:8]
        assert face.onnx_node_names(path, limit=3) == names[:3]


# ---------------------------------------------------------------------------------------------
# face box, mask and the whole analyzer


@pytest.mark.parametrize("yaw,pitch,roll", [(0.0, 0.0, 0.0), (25.0, -12.0, 15.0), (-40.0, 20.0, -160.0)])
def test_head_pose_and_silhouette_follow_keypoints(yaw, pitch, roll):
    truth = np.array([math.radians(yaw), math.radians(pitch), math.radians(roll), math.log(23.0), 310.0, 190.0])
    kps = face.project_canonical(truth, face.CANONICAL_KEYPOINTS)
    pose = face.fit_head_pose(kps)
    assert np.allclose(pose, truth, atol=1e-6)
    assert np.allclose(face.silhouette_points(kps), face.project_canonical(truth, face.CANONICAL_SILHOUETTE), atol=1e-4)


def test_silhouette_is_plausible_around_template_keypoints():
    template = face.ARCFACE_TEMPLATE.astype(np.float64)
    oval = face.silhouette_points(template)
    eyes_to_mouth = template[3:, 1].mean() - template[:2, 1].mean()
    # forehead above the eyes, chin below the mouth, cheeks outside the eyes
    assert oval[:, 1].min() < template[:2, 1].min() - 0.5 * eyes_to_mouth
    assert oval[:, 1].max() > template[3:, 1].max() + 0.5 * eyes_to_mouth
    assert oval[:, 0].min() < template[0, 0] - 15 and oval[:, 0].max() > template[1, 0] + 15
    # a similarity of the keypoints moves the oval with them
    placement = similarity(3.2, -30.0, 400.0, 120.0)
    assert np.allclose(face.silhouette_points(apply(placement, template)), apply(placement, oval), atol=1e-3)


def test_expand_box_official_rule():
    assert face.expand_box([100, 100, 200, 200], 1000, 1000).tolist() == [90, 90, 210, 210]
    # rounded first (half to even: 148.5 -> 148), then floored halves about the floored centre
    assert face.expand_box([100.4, 50.6, 148.5, 80.2], 1000, 1000).tolist() == [96, 48, 152, 82]
    # at the border the box is shifted inside, keeping its size (not clipped)
    assert face.expand_box([0, 100, 100, 200], 1000, 1000).tolist() == [0, 90, 120, 210]
    assert face.expand_box([900, 880, 1000, 1000], 1000, 1000).tolist() == [880, 856, 1000, 1000]
    # larger than the image after expansion: whole axis (the official code would start at -10)
    assert face.expand_box([0, 0, 100, 100], 100, 100).tolist() == [0, 0, 100, 100]


def test_face_box_and_mask():
    kps = (face.ARCFACE_TEMPLATE * 2 + [100, 80]).astype(np.float32)
    box = face.face_box(600, 500, kps=kps)
    oval = face.silhouette_points(kps)
    assert np.array_equal(box, face.expand_box(np.r_[oval.min(0), oval.max(0)], 600, 500))
    from_detection = face.face_box(600, 500, detection_box=np.array([10, 20, 110, 220]))
    assert np.array_equal(from_detection, face.expand_box([10, 20, 110, 220], 600, 500))
    assert face.face_box(600, 500).tolist() == [0, 0, 500, 600]
    mask = face.face_mask(box, 600, 500)
    x0, y0, x1, y1 = box
    assert mask.dtype == np.float32 and mask.sum() == (x1 - x0) * (y1 - y0)
    assert (mask[y0:y1, x0:x1] == 1).all() and mask[:y0].sum() == 0 and mask[:, x1:].sum() == 0


def test_analyze_end_to_end(models):
    analyzer = face.FaceAnalyzer(models["scrfd"], models["flat"])
    image = smooth_image(300, 200, seed=1)
    image[..., 0] = 0
    paint_cell(image, 4, 6, det_scale(300, 200), (255, 128, 128))
    result = analyzer.analyze(image)
    assert result.found and result.kps.shape == (5, 2) and result.detection_box.shape == (4,)
    assert np.array_equal(result.embedding, analyzer.recognizer.embed(image, result.kps))
    assert np.array_equal(result.box, face.face_box(300, 200, kps=result.kps))
    x0, y0, x1, y1 = result.box
    assert result.box.dtype == np.int64 and 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 300


def test_no_face(models):
    analyzer = face.FaceAnalyzer(models["scrfd"], models["flat"])
    result = analyzer.analyze(np.zeros((90, 160, 3), np.uint8))
    assert not result.found and result.kps is None and result.score == 0.0
    assert result.embedding.shape == (analyzer.recognizer.embedding_dim,) and not result.embedding.any()
    assert result.box.tolist() == [0, 0, 160, 90] and face.face_mask(result.box, 90, 160).all()
    assert face.FaceResult.no_face(10, 20).embedding.shape == (512,)
    with pytest.raises(ValueError, match="RGB uint8"):
        analyzer.analyze(np.zeros((90, 160, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# loading and errors


def test_missing_and_corrupt_models(tmp_path, models):
    with pytest.raises(ModelError, match="not found") as err:
        face.ScrfdDetector(tmp_path / "absent.onnx")
    assert "absent.onnx" in str(err.value)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelError, match="cannot load ONNX model") as err:
        face.ArcFaceRecognizer(corrupt)
    assert "corrupt.onnx" in str(err.value)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(models["flat"].read_bytes()[:60])
    with pytest.raises(ModelError):
        face.ArcFaceRecognizer(truncated)
    with pytest.raises(ModelError, match="not an SCRFD"):
        face.ScrfdDetector(models["flat"])
    with pytest.raises(ModelError, match="not an ArcFace"):
        face.ArcFaceRecognizer(models["scrfd"])


def test_from_dir_and_presets(tmp_path, models, monkeypatch):
    with pytest.raises(ModelError, match=face.DETECTOR_FILE):
        face.FaceAnalyzer.from_dir(tmp_path)
    release = tmp_path / "face_analysis" / "models"
    release.mkdir(parents=True)
    (release / face.DETECTOR_FILE).write_bytes(models["scrfd"].read_bytes())
    with pytest.raises(ModelError, match=face.RECOGNIZER_FILE):
        face.FaceAnalyzer.from_dir(tmp_path)
    (release / face.RECOGNIZER_FILE).write_bytes(models["flat"].read_bytes())
    analyzer = face.FaceAnalyzer.from_dir(tmp_path)
    assert analyzer.detector.path.parent == release

    from hallo3_cli.loading import load_face_analyzer
    from hallo3_cli.presets import get_preset

    assert load_face_analyzer(get_preset("tiny-random")) is None
    monkeypatch.setenv("HALLO3_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError, match="face_analysis"):
        load_face_analyzer(get_preset("hallo3"))
    component = tmp_path / "home" / "hallo3" / "face_analysis"
    component.mkdir(parents=True)
    for name in (face.DETECTOR_FILE, face.RECOGNIZER_FILE):
        (component / name).write_bytes(release.joinpath(name).read_bytes())
    write_marker(component)  # installed: its files listed with their sizes
    assert isinstance(load_face_analyzer(get_preset("hallo3")), face.FaceAnalyzer)
