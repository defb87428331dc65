"""onnxruntime plumbing: execution providers for a device, sessions with one-line errors, and the names of a
model's first nodes read from the protobuf wire format (without the ``onnx`` package)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

from hallo3_cli.errors import ModelError


def providers_for_device(device: str = "cpu") -> list:
    """onnxruntime execution providers for a torch-style device string (falls back to CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: str | Path, providers: Sequence | None):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError("ONNX model file not found", path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no busy-waiting between runs: the face models run once per frame between torch and PyAV work, which
    # spinning threads would otherwise slow down several times on a small CPU (measured: bench/RESULTS.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
