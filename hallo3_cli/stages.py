"""Every on-disk artifact of the pipeline, in one place.

Each stage file is a safetensors file. Its ``__metadata__`` (string → string) always holds

- ``format``          e.g. ``hallo3.audio``
- ``format_version``  an integer; bumped whenever the layout changes
- ``model``           the model preset that produced it (``hallo3``, ``tiny-random``)
- ``weights``         a fingerprint of the weights involved (see ``hallo3_cli.presets``)
- ``params``          JSON of the producing parameters
- ``source_sha256``   sha256 of the input media (for clips: of the input stage files)

plus the per-format keys listed in each :class:`StageKind`. Loading validates all of it — format,
version, metadata types, tensor names, ranks, dtypes and cross-shape consistency, finite values,
shapes and timing against the file's preset (:func:`expected_shapes`), and the weights fingerprint
where those weights are installed (:func:`weights_components`) — and raises
:class:`StageFileError` with a one-line message naming the file (and the tensor). Writes are atomic.

Formats
-------
``hallo3.audio``      ``features`` (frames_padded, layers, channels): wav2vec hidden states per video
                      frame, NOT windowed (windowing is a view, done on load; this keeps 10 minutes
                      at ~0.55 GB in fp32). Metadata ``fps``, ``num_frames`` (unpadded video frames),
                      ``clip_length``, ``sample_rate``.
``hallo3.reference``  the identity of one portrait: ``image`` (3, H, W) framed image in [-1, 1],
                      ``ref_latent`` (16, h, w) VAE latent of the face-masked image ×scale,
                      ``face_embedding`` (512,), ``face_box`` (4,) int32 x0 y0 x1 y1 in the framed image,
                      ``prompt_embeds`` (text_len, text_dim), ``ref_bank`` (layers, tokens, width).
                      Metadata ``framing`` (``pad`` or ``crop``), ``source_width``, ``source_height``,
                      ``face_found``, ``prompt``.
``hallo3.clip``       one finished clip, written by ``render`` as soon as it exists (resume unit):
                      ``latents`` (latent_frames, 16, h, w). Metadata ``index``, ``render_key``. The
                      next clip's motion frames are recomputed by decoding it (decoding is deterministic).
``hallo3.clips``      a whole render: ``latents`` (clips, latent_frames, 16, h, w). Metadata
                      ``num_frames``, ``fps``, ``clip_length``, ``motion_frames``, ``framing``,
                      ``height``, ``width``.

Training data (``hallo3 prepare``, docs/model.md §10.1; one of each per video, plus a ``hallo3.audio`` file of
its sound track, unpadded):

``hallo3.frames``     the video at the preset's frame rate, each frame squashed to the training square
                      (``framing="squash"``: ``height × height``, padded to the width only when loaded) and
                      compressed: ``data`` (bytes,) uint8, the frames' JPEG/PNG files one after the other;
                      ``offsets`` (frames + 1,) int64, where each starts (the last: the end). Metadata
                      ``num_frames``, ``fps``, ``height``, ``width`` (the stored square), ``codec``,
                      ``source_width``, ``source_height``.
``hallo3.face``       the video's face track: ``face_embedding`` (512,) of the first frame with a face;
                      ``mask`` (height, width) uint8 0..255, the union of the per-frame face boxes filled and
                      squashed like the frames; ``union_box`` (4,) int32 and ``boxes`` (frames, 4) float32 (zeros
                      where ``found`` is false) x0 y0 x1 y1 in source pixels; ``found`` (frames,) bool. Metadata
                      ``num_frames``, ``frames_without_face``, ``embedding_frame``, ``source_width``,
                      ``source_height``.
``hallo3.prompt``     a caption and its T5 embedding: ``prompt_embeds`` (text_len, text_dim). Metadata
                      ``prompt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hallo3_cli import geometry, store
from hallo3_cli.errors import StageFileError, reason
from hallo3_cli.fsutil import atomic_path, require_file

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: A stage file's header (tensor entries and metadata) is a few kB; anything past this is not one of ours.
MAX_HEADER_BYTES = 16 << 20
#: The longest JSON metadata value (``params``) parsed.
MAX_JSON_META_BYTES = 1 << 20
COMMON_META = ("format", "format_version", "model", "weights", "params", "source_sha256")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ndim: int
    dtypes: tuple[str, ...] = FLOAT_DTYPES


@dataclass(frozen=True)
class StageKind:
    """The schema of one stage-file format."""

    format: str
    version: int
    tensors: tuple[TensorSpec, ...]
    meta: dict[str, type] = field(default_factory=dict)
    check: Callable[["Stage"], str | None] | None = None
    description: str = ""


@dataclass
class Stage:
    """A loaded (validated) stage file: tensors by name and typed metadata."""

    kind: StageKind
    tensors: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None = None

    def __getitem__(self, name: str):
        return self.tensors[name]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def weights(self) -> str:
        return self.meta["weights"]

    @property
    def params(self) -> dict:
        return self.meta["params"]


# ---------------------------------------------------------------------------------------------
# per-format consistency checks (return an error message or None)


def _check_audio(stage: Stage) -> str | None:
    frames = stage["features"].shape[0]
    n, clip = stage.meta["num_frames"], stage.meta["clip_length"]
    if n < 1:
        return "num_frames must be at least 1"
    if frames < n:
        return f"features hold {frames} frames but num_frames is {n}"
    if stage.meta["fps"] <= 0 or clip <= 0 or stage.meta["sample_rate"] <= 0:
        return "fps, clip_length and sample_rate must be positive"
    return None


def _check_reference(stage: Stage) -> str | None:
    image, latent = stage["image"], stage["ref_latent"]
    if image.shape[0] != 3:
        return f"image must have 3 channels, has {image.shape[0]}"
    if stage["face_box"].shape != (4,):
        return "face_box must hold 4 numbers"
    x0, y0, x1, y1 = (int(v) for v in stage["face_box"].tolist())
    if not (0 <= x0 <= x1 <= image.shape[2] and 0 <= y0 <= y1 <= image.shape[1]):
        return f"face_box {[x0, y0, x1, y1]} is not a box inside the {image.shape[2]}×{image.shape[1]} image"
    if stage["face_embedding"].shape[0] < 1:
        return "empty face_embedding"
    if (latent.shape[1], latent.shape[2]) != geometry.latent_size(image.shape[1], image.shape[2]):
        return f"ref_latent {tuple(latent.shape)} does not match image {tuple(image.shape)}"
    if stage.meta["framing"] not in ("pad", "crop"):
        return f"unknown framing {stage.meta['framing']!r}"
    if stage.meta["source_width"] < 1 or stage.meta["source_height"] < 1:
        return "source_width and source_height must be positive"
    return None


def _check_clip(stage: Stage) -> str | None:
    if stage.meta["index"] < 0:
        return f"index {stage.meta['index']} is negative"
    return None


def _check_clips(stage: Stage) -> str | None:
    """The metadata must describe exactly the clips the file holds: ``num_frames`` decides how many frames
    are stitched, so a value the clips do not hold (negative, zero, past them, or far short of them) would
    make a video of another length than the speech."""
    latents = stage["latents"]
    meta = stage.meta
    if latents.shape[0] < 1:
        return "holds no clips"
    if meta["framing"] not in ("pad", "crop"):
        return f"unknown framing {meta['framing']!r}"
    if meta["fps"] <= 0 or meta["height"] <= 0 or meta["width"] <= 0:
        return "fps, height and width must be positive"
    if not 0 <= meta["motion_frames"] < meta["clip_length"]:
        return f"motion_frames {meta['motion_frames']} must be at least 0 and less than clip_length {meta['clip_length']}"
    if meta["num_frames"] < 1:
        return f"num_frames must be at least 1, is {meta['num_frames']}"
    new_per_clip = meta["clip_length"] - meta["motion_frames"]
    if meta["num_frames"] > latents.shape[0] * new_per_clip:
        return f"num_frames {meta['num_frames']} exceeds what {latents.shape[0]} clips hold"
    needed = geometry.num_clips(meta["num_frames"], meta["clip_length"], meta["motion_frames"])
    if needed != latents.shape[0]:
        return f"holds {latents.shape[0]} clips but num_frames {meta['num_frames']} makes {needed}"
    return None


AUDIO = StageKind(
    "hallo3.audio",
    1,
    (TensorSpec("features", 3),),
    {"fps": int, "num_frames": int, "clip_length": int, "sample_rate": int},
    _check_audio,
    "speech features",
)
REFERENCE = StageKind(
    "hallo3.reference",
    1,
    (
        TensorSpec("image", 3),
        TensorSpec("ref_latent", 3),
        TensorSpec("face_embedding", 1),
        TensorSpec("face_box", 1, ("int32", "int64")),
        TensorSpec("prompt_embeds", 2),
        TensorSpec("ref_bank", 3),
    ),
    {"framing": str, "source_width": int, "source_height": int, "face_found": bool, "prompt": str},
    _check_reference,
    "portrait reference",
)
CLIP = StageKind(
    "hallo3.clip",
    3,  # 3: CFG on v instead of x0 (same maths, other rounding): clips of version 2 are never mixed in
    (TensorSpec("latents", 4),),
    {"index": int, "render_key": str},
    _check_clip,
    "rendered clip",
)
CLIPS = StageKind(
    "hallo3.clips",
    1,
    (TensorSpec("latents", 5),),
    {
        "num_frames": int,
        "fps": int,
        "clip_length": int,
        "motion_frames": int,
        "framing": str,
        "height": int,
        "width": int,
    },
    _check_clips,
    "rendered clips",
)


def _check_frames(stage: Stage) -> str | None:
    data, offsets, n = stage["data"], stage["offsets"], stage.meta["num_frames"]
    if n < 1:
        return "num_frames must be at least 1"
    if offsets.shape[0] != n + 1:
        return f"offsets hold {offsets.shape[0]} entries for {n} frames (expected {n + 1})"
    if int(offsets[0]) != 0 or int(offsets[-1]) != data.shape[0]:
        return f"offsets must run from 0 to the data's {data.shape[0]} bytes"
    if bool((offsets[1:] <= offsets[:-1]).any()):
        return "offsets must increase (every frame holds bytes)"
    if stage.meta["codec"] not in ("jpeg", "png"):
        return f"unknown codec {stage.meta['codec']!r}"
    if stage.meta["fps"] <= 0 or min(stage.meta["height"], stage.meta["width"]) < 1:
        return "fps, height and width must be positive"
    return None


def _check_face(stage: Stage) -> str | None:
    n = stage.meta["num_frames"]
    boxes, found = stage["boxes"], stage["found"]
    if boxes.shape != (n, 4) or found.shape != (n,):
        return f"boxes {tuple(boxes.shape)} and found {tuple(found.shape)} must hold num_frames = {n} rows"
    if stage["union_box"].shape != (4,):
        return "union_box must hold 4 numbers"
    if stage.meta["frames_without_face"] != n - int(found.sum()):
        return f"frames_without_face is {stage.meta['frames_without_face']}, found says {n - int(found.sum())}"
    if not -1 <= stage.meta["embedding_frame"] < n:
        return f"embedding_frame {stage.meta['embedding_frame']} is not a frame of the video"
    return None


FRAMES = StageKind(
    "hallo3.frames",
    1,
    (TensorSpec("data", 1, ("uint8",)), TensorSpec("offsets", 1, ("int64",))),
    {"num_frames": int, "fps": int, "height": int, "width": int, "codec": str, "source_width": int,
     "source_height": int},
    _check_frames,
    "training video frames",
)
FACE = StageKind(
    "hallo3.face",
    1,
    (
        TensorSpec("face_embedding", 1),
        TensorSpec("mask", 2, ("uint8",)),
        TensorSpec("union_box", 1, ("int32",)),
        TensorSpec("boxes", 2, ("float32",)),
        TensorSpec("found", 1, ("bool",)),
    ),
    {"num_frames": int, "frames_without_face": int, "embedding_frame": int, "source_width": int,
     "source_height": int},
    _check_face,
    "training face track",
)
PROMPT = StageKind(
    "hallo3.prompt",
    1,
    (TensorSpec("prompt_embeds", 2),),
    {"prompt": str},
    None,
    "caption embedding",
)
KINDS = {kind.format: kind for kind in (AUDIO, REFERENCE, CLIP, CLIPS, FRAMES, FACE, PROMPT)}


# ---------------------------------------------------------------------------------------------
# encoding of metadata values (safetensors metadata is str -> str)


def _encode(value: Any, typ: type) -> str:
    if typ is bool:
        return "true" if value else "false"
    if typ is dict:
        return json.dumps(value, sort_keys=True)
    return str(value)


def _decode(text: str, typ: type, key: str) -> Any:
    try:
        if typ is bool:
            if text not in ("true", "false"):
                raise ValueError
            return text == "true"
        if typ is dict:
            value = store.parse_json(text, f"metadata {key!r}", max_bytes=MAX_JSON_META_BYTES)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return typ(text)
    except (ValueError, TypeError) as err:
        if typ is dict and str(err).startswith("metadata") and "valid JSON" not in str(err):
            raise  # too long or too deeply nested: say so
        raise ValueError(f"metadata {key!r} is not a valid {typ.__name__}: {text[:40]!r}") from None


def _check_type(key: str, value: Any, typ: type) -> None:
    """Refuse metadata that would be written but not read back (e.g. ``fps=25.0``)."""
    import operator

    if typ is int:
        if isinstance(value, bool):
            raise TypeError(f"metadata {key!r} must be an int, got a bool")
        operator.index(value)
    elif not isinstance(value, typ):
        raise TypeError(f"metadata {key!r} must be a {typ.__name__}, got {type(value).__name__}")


def _meta_types(kind: StageKind) -> dict[str, type]:
    return {"model": str, "weights": str, "params": dict, "source_sha256": str, **kind.meta}


def _dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _validate(stage: Stage) -> None:
    kind = stage.kind
    for spec in kind.tensors:
        if spec.name not in stage.tensors:
            raise ValueError(f"missing tensor {spec.name!r}")
        tensor = stage.tensors[spec.name]
        if tensor.ndim != spec.ndim:
            raise ValueError(f"tensor {spec.name!r} has {tensor.ndim} dimensions, expected {spec.ndim}")
        if _dtype_name(tensor) not in spec.dtypes:
            raise ValueError(f"tensor {spec.name!r} has dtype {_dtype_name(tensor)}, expected one of {', '.join(spec.dtypes)}")
    extra = set(stage.tensors) - {spec.name for spec in kind.tensors}
    if extra:
        raise ValueError(f"unexpected tensors {sorted(extra)}")
    if kind.check is not None:
        problem = kind.check(stage)
        if problem:
            raise ValueError(problem)


# ---------------------------------------------------------------------------------------------
# public API


def save_stage(path: str | Path, kind: StageKind, tensors: dict, meta: dict) -> Path:
    """Validate and atomically write a stage file. ``meta`` must hold the common and per-kind keys."""
    from safetensors.torch import save_file

    types = _meta_types(kind)
    missing = [key for key in types if key not in meta]
    if missing:
        raise ValueError(f"{kind.format}: metadata is missing {missing}")
    for key, typ in types.items():
        _check_type(key, meta[key], typ)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    stage = Stage(kind, tensors, {key: meta[key] for key in types})
    _validate(stage)
    header = {"format": kind.format, "format_version": str(kind.version)}
    header.update({key: _encode(meta[key], typ) for key, typ in types.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def read_header(path: str | Path) -> dict[str, str]:
    """The raw ``__metadata__`` of a safetensors file, without reading tensor data (the header is checked:
    size, JSON, nesting, and that the tensors end where the file does)."""
    path = require_file(path)
    try:
        header = store.read_safetensors_header(path, max_bytes=MAX_HEADER_BYTES)
    except (ValueError, OSError) as err:
        raise StageFileError(f"not a safetensors stage file ({err})", path) from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StageFileError("corrupt safetensors metadata (keys and values must be strings)", path)
    return meta


def load_stage(
    path: str | Path,
    kind: StageKind,
    *,
    model: str | None = None,
    weights: str | None = None,
    device: str = "cpu",
    geometry: bool = True,
) -> Stage:
    """Read and validate a stage file of ``kind``.

    ``model``/``weights``, when given, must match what produced the file (a features file made by
    another preset or by other weights is refused rather than silently misused). Every float tensor
    must be finite. With ``geometry`` (default), every tensor's shape must also be the one the
    file's preset produces (:func:`expected_shapes`), so that a mismatch is refused here, naming the
    tensor, rather than failing inside a network; and the ``weights`` fingerprint of an audio,
    reference or clips file must be the one of the preset's weights that make such a file
    (:func:`weights_components`), when those are installed (random presets: always).
    """
    path = require_file(path)
    raw = read_header(path)
    fmt = raw.get("format")
    if fmt != kind.format:
        what = f"a {KINDS[fmt].description} file ({fmt})" if fmt in KINDS else f"format {fmt!r}" if fmt else "not a hallo3 stage file"
        raise StageFileError(f"expected a {kind.description} file ({kind.format}), found {what}", path)
    version = raw.get("format_version")
    if version != str(kind.version):
        raise StageFileError(
            f"{kind.format} format version {version!r} is not supported (this hallo3-cli reads version {kind.version}); "
            "rerun the stage that wrote it",
            path,
        )
    try:
        meta = {key: _decode(raw[key], typ, key) for key, typ in _meta_types(kind).items() if key in raw}
        missing = [key for key in _meta_types(kind) if key not in raw]
        if missing:
            raise ValueError(f"metadata is missing {missing}")
    except ValueError as err:
        raise StageFileError(str(err), path) from None
    if model is not None and meta["model"] != model:
        raise StageFileError(f"was made with model preset {meta['model']!r}, not {model!r}; rerun that stage with --model {model}", path)
    if weights is not None and meta["weights"] != weights:
        raise StageFileError("was made with different weights of the same preset (fingerprint mismatch); rerun that stage", path)
    tensors = _read_tensors(path, device)
    stage = Stage(kind, tensors, meta, path)
    try:
        _validate(stage)
        _check_finite(stage)
        if geometry:
            _check_geometry(stage)
            _check_weights(stage)
    except ValueError as err:
        raise StageFileError(str(err), path) from None
    return stage


def expected_shapes(kind: StageKind, preset, meta: dict) -> dict[str, tuple[int | None, ...]]:
    """Shape of each tensor of a ``kind`` file made by ``preset`` (``None``: any length), given its metadata."""
    from hallo3_cli.face import EMBEDDING_DIM
    from hallo3_cli.image_io import squash_size
    from hallo3_cli.networks import network_widths

    w = network_widths(preset)
    h, wd = geometry.latent_size(preset.height, preset.width)
    if kind is AUDIO:
        return {"features": (None, w["audio_layers"], w["audio_width"])}
    if kind is FRAMES:
        return {"data": (None,), "offsets": (meta["num_frames"] + 1,)}
    if kind is FACE:
        side = squash_size(preset.height, preset.width)
        return {"face_embedding": (EMBEDDING_DIM,), "mask": (side, side), "union_box": (4,),
                "boxes": (meta["num_frames"], 4), "found": (meta["num_frames"],)}
    if kind is PROMPT:
        return {"prompt_embeds": (preset.text_length, w["text_width"])}
    if kind is REFERENCE:
        tokens = (h // w["patch"]) * (wd // w["patch"])
        return {"image": (3, preset.height, preset.width), "ref_latent": (geometry.LATENT_CHANNELS, h, wd),
                "face_embedding": (EMBEDDING_DIM,), "face_box": (4,),
                "prompt_embeds": (preset.text_length, w["text_width"]), "ref_bank": (w["dit_layers"], tokens, w["dit_width"])}
    latent_frames = geometry.latent_frames(preset.clip_length)
    if kind is CLIP:
        return {"latents": (latent_frames, geometry.LATENT_CHANNELS, h, wd)}
    if kind is CLIPS:
        return {"latents": (None, latent_frames, geometry.LATENT_CHANNELS, *geometry.latent_size(meta["height"], meta["width"]))}
    return {}


def weights_components(kind: StageKind, preset, params: dict | None = None) -> tuple[str, ...]:
    """The components whose weights make a ``kind`` file: its ``weights`` fingerprint is theirs
    (``preset.fingerprint(*components)``). ``params``: the file's producing parameters."""
    if kind is AUDIO:
        return ("wav2vec",) + (("audio_separator",) if (params or {}).get("separate_vocals") else ())
    if kind is REFERENCE:
        if preset.is_random:  # random presets have no tokenizer or face-model files
            return ("vae", "reference", "text_encoder")
        if preset.is_folder and not preset.is_installed("face_analysis"):  # a model folder without face models
            return ("vae", "reference", "text_encoder", "tokenizer")
        return ("vae", "reference", "text_encoder", "tokenizer", "face_analysis")
    if kind is FRAMES:
        return ()  # no network: decoding and resizing only
    if kind is FACE:
        return ("face_analysis",)
    if kind is PROMPT:
        return ("text_encoder",) if preset.is_random else ("text_encoder", "tokenizer")
    return ("transformer", "vae")


def _check_weights(stage: Stage) -> None:
    from hallo3_cli.presets import get_preset

    if stage.kind is CLIP:
        return  # a render's own parts: bound to it by their render_key
    preset = get_preset(stage.model)
    components = weights_components(stage.kind, preset, stage.params)
    if not preset.is_random and not all(preset.is_installed(c) for c in components):
        return  # not installed here: nothing to compare with (the fingerprint still keys the render cache)
    if stage.weights != preset.fingerprint(*components):
        raise ValueError(
            f"its weights fingerprint {stage.weights[:16]!r} is not that of the installed {preset.name} weights "
            f"({', '.join(components)}): made with other weights, or edited; rerun the stage that wrote it"
        )


def _check_finite(stage: Stage) -> None:
    import torch

    for name, tensor in stage.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values (a failed computation); rerun the stage that wrote it")


def _check_geometry(stage: Stage) -> None:
    from hallo3_cli.errors import Hallo3Error
    from hallo3_cli.presets import get_preset

    try:
        preset = get_preset(stage.model)
    except Hallo3Error:
        raise ValueError(f"was made with model preset {stage.model!r}, which is not known here") from None
    timing = {"fps": preset.fps, "clip_length": preset.clip_length}
    if stage.kind is CLIPS:
        timing.update(motion_frames=preset.motion_frames, height=preset.height, width=preset.width)
    if stage.kind is FRAMES:
        from hallo3_cli.image_io import squash_size

        side = squash_size(preset.height, preset.width)
        timing = {"fps": preset.fps, "height": side, "width": side}
    if stage.kind in (AUDIO, CLIPS, FRAMES):
        for key, value in timing.items():
            if stage.meta[key] != value:
                raise ValueError(f"metadata {key} is {stage.meta[key]}, the {preset.name} model uses {value}")
    for name, shape in expected_shapes(stage.kind, preset, stage.meta).items():
        actual = tuple(stage.tensors[name].shape)
        if len(actual) != len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
            want = "×".join("N" if e is None else str(e) for e in shape)
            raise ValueError(f"tensor {name!r} has shape {'×'.join(map(str, actual))}, the {preset.name} model needs {want}")


def _read_tensors(path: Path, device: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:  # safetensors takes UTF-8 paths only: read the bytes ourselves
            return {name: t.to(device) for name, t in load(path.read_bytes()).items()}
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StageFileError(f"corrupt or truncated safetensors data ({reason(err)})", path) from None


def source_digest(*digests: str) -> str:
    """Combine several sha256 hex digests into one (for stages derived from several inputs)."""
    import hashlib

    return hashlib.sha256("".join(digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# stage files -> the pipeline's objects


def audio_from_stage(stage: Stage):
    """An audio stage file as the pipeline's :class:`~hallo3_cli.pipeline_hallo3.Hallo3Audio`."""
    from hallo3_cli.pipeline_hallo3 import Hallo3Audio

    return Hallo3Audio(stage["features"], stage.meta["num_frames"])


def reference_from_stage(stage: Stage):
    """A reference stage file as the pipeline's :class:`~hallo3_cli.pipeline_hallo3.Hallo3Reference`."""
    from hallo3_cli.pipeline_hallo3 import Hallo3Reference

    meta = stage.meta
    return Hallo3Reference(
        **{name: stage[name] for name in Hallo3Reference.TENSORS}, framing=meta["framing"],
        source_width=meta["source_width"], source_height=meta["source_height"], face_found=meta["face_found"],
        prompt=meta["prompt"],
    )
