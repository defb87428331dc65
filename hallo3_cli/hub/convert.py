"""Official Hallo3 checkpoint (SAT/DeepSpeed) → diffusers folders ``transformer/`` and ``reference/``.

The source is read with ``torch.load(weights_only=True, mmap=True)`` and converted tensor by tensor:
each output shard is written as soon as it is full and then dropped, so converting the 14.5 B
parameter release needs about one shard of RAM on top of the page cache (see README).
Dimensions are inferred from the tensors; nothing is tied to the production size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hallo3_cli import fsutil
from hallo3_cli.errors import InputError, ModelError, OutputError
from hallo3_cli.errors import reason as first_line

MAIN_PREFIX = "model.diffusion_model."
REF_PREFIX = "ref_model.diffusion_model."
#: Keys present in releases that we deliberately drop (docs/model.md §1).
IGNORED_PATTERNS = (
    r"^first_stage_model\.",
    r"^conditioner\.",
    r"^(model|ref_model)\.diffusion_model\.mixins\.pos_embed\.freqs_(sin|cos)$",
    r"^(model|ref_model)\.diffusion_model\.transformer\.position_embeddings\.weight$",
)
WEIGHTS_NAME = "diffusion_pytorch_model"
DEFAULT_SHARD_BYTES = 2 * 1024**3


# ---------------------------------------------------------------------------------------------
# reading


def _harmless_numpy_globals() -> list:
    """numpy types found in DeepSpeed/SAT RNG bookkeeping (docs/model.md §1); they construct plain arrays."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np.ndarray, np.dtype, _reconstruct, *dtype_classes]


def resolve_checkpoint(src: Path) -> Path:
    """The checkpoint file of ``src`` (a folder with ``latest``, or a file): a regular file (a fifo or device
    is refused before anything opens it, see ``fsutil.require_file``)."""
    if src.is_dir():
        latest = src / "latest"
        if not latest.is_file():
            raise InputError("not an official checkpoint folder (no 'latest' file)", src)
        tag = latest.read_text(errors="replace").strip()
        path = src / tag / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise InputError(f"'latest' names tag {tag[:80]!r} but {tag[:80]}/mp_rank_00_model_states.pt is missing", src)
        return fsutil.require_file(path)
    if not src.exists() and not src.is_symlink():
        raise InputError("no such file or folder", src)
    return fsutil.require_file(src)


def load_official_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict (``checkpoint['module']``), memory-mapped, never unpickling code.

    ``src``: a checkpoint folder (``latest`` + ``<tag>/mp_rank_00_model_states.pt``), a ``.pt`` file,
    or a safetensors file holding the same keys.
    """
    path = resolve_checkpoint(Path(src))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InputError(f"unreadable safetensors file ({err})", path) from None
    try:
        with torch.serialization.safe_globals(_harmless_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - report any refusal as a one-line input error
        reason = first_line(err)
        if "Unsupported global" in str(err) or "weights_only" in str(err):
            reason = "it contains Python objects that are not safe to load: " + _unsafe_globals(path, reason)
        raise InputError(f"cannot read checkpoint safely: {reason}", path) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("module"), dict):
        checkpoint = checkpoint["module"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise InputError("not a Hallo3 checkpoint (expected a state dict, or one under 'module')", path)
    return checkpoint


def _unsafe_globals(path: Path, fallback: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001
        return fallback
    return ", ".join(names) if names else fallback


# ---------------------------------------------------------------------------------------------
# configuration inferred from tensors


def _layer_count(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.layers\.(\d+)\.")
    indices = {int(m.group(1)) for key in sd if (m := pattern.match(key))}
    if not indices:
        raise ModelError(f"checkpoint holds no layers under {prefix!r}")
    if indices != set(range(len(indices))):
        raise ModelError(f"layers under {prefix!r} are not numbered 0..{len(indices) - 1}")
    return len(indices)


def _grid_for(tokens: int) -> tuple[int, int]:
    """Latent (height, width) for a per-frame token count at the 2:3 aspect of 480×720."""
    for grid_h in range(1, int(tokens**0.5) + 2):
        if grid_h * (3 * grid_h // 2) == tokens and (3 * grid_h) % 2 == 0:
            return 2 * grid_h, 2 * (3 * grid_h // 2)
    raise ModelError(f"cannot infer the latent size from {tokens} tokens per frame; pass sample_height/sample_width")


def infer_config(sd: dict, prefix: str, *, main: bool, overrides: dict | None = None) -> dict:
    """The diffusers config of the network under ``prefix``, read off the tensor shapes.

    Geometry that the tensors cannot determine (text length 226, 13 latent frames, 2:3 aspect,
    audio window 5 × 12 wav2vec layers) defaults to the release and can be overridden.
    """
    overrides = dict(overrides or {})

    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in sd:
            raise ModelError(f"checkpoint is missing {key}")
        return tuple(sd[key].shape)

    hidden, in_channels, patch, _ = shape("mixins.patch_embed.proj.weight")
    head_dim = shape("mixins.adaln_layer.query_layernorm_list.0.weight")[0]
    text_length = overrides.pop("max_text_seq_length", 226)
    frames = overrides.pop("latent_frames", 13)
    table = shape("mixins.pos_embed.pos_embedding")[1]
    if (table - text_length) % frames:
        raise ModelError(f"positional table of {table} does not fit {text_length} text tokens + {frames} frames")
    height, width = _grid_for((table - text_length) // frames)
    config = {
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shape("mixins.final_layer.linear.weight")[0] // (patch * patch),
        "time_embed_dim": shape("time_embed.0.weight")[0],
        "text_embed_dim": shape("mixins.patch_embed.text_proj.weight")[1],
        "num_layers": _layer_count(sd, prefix),
        "sample_height": overrides.pop("sample_height", height),
        "sample_width": overrides.pop("sample_width", width),
        "sample_frames": (frames - 1) * 4 + 1,
        "patch_size": patch,
        "max_text_seq_length": text_length,
    }
    if main:
        audio_out = shape("transformer.audio_proj.norm.weight")[0]
        window = overrides.pop("audio_window", 5)
        layers = overrides.pop("audio_layers", 12)
        audio_in = shape("transformer.audio_proj.proj1.weight")[1]
        if audio_in % (window * layers):
            raise ModelError(f"audio input width {audio_in} is not window {window} × {layers} layers × channels")
        face_hidden = shape("transformer.face_proj.norm.weight")[0]
        config.update(
            audio_window=window,
            audio_layers=layers,
            audio_channels=audio_in // (window * layers),
            audio_intermediate_dim=shape("transformer.audio_proj.proj1.weight")[0],
            audio_context_tokens=shape("transformer.audio_proj.proj3.weight")[0] // audio_out,
            audio_cross_attention_dim=audio_out,
            face_embed_dim=shape("transformer.face_proj.proj.weight")[1],
            face_tokens=shape("transformer.face_proj.proj.weight")[0] // face_hidden,
            face_cross_attention_dim=face_hidden,
        )
    if overrides:
        raise ValueError(f"unknown config overrides: {sorted(overrides)}")
    return config


# ---------------------------------------------------------------------------------------------
# name mapping


@dataclass
class Mapped:
    """One diffusers tensor, produced lazily from official tensors."""

    name: str
    sources: tuple[str, ...]
    make: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    itemsize: int = 4

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.itemsize


_LAYER_RENAMES = {
    "input_layernorm": "norm1.norm",
    "post_attention_layernorm": "norm2.norm",
    "attention.dense": "attn1.to_out.0",
    "mlp.dense_h_to_4h": "ff.net.0.proj",
    "mlp.dense_4h_to_h": "ff.net.2",
    "face_input_layernorm": "norm_face",
    "face_attn.query": "attn_face.to_q",
    "face_attn.dense": "attn_face.to_out.0",
    "audio_input_layernorm": "norm_audio",
    "audio_attn.query": "attn_audio.to_q",
    "audio_attn.dense": "attn_audio.to_out.0",
}
_TOP_RENAMES = {
    "mixins.pos_embed.pos_embedding": "patch_embed.pos_embedding",
    "mixins.patch_embed.proj": "patch_embed.proj",
    "mixins.patch_embed.text_proj": "patch_embed.text_proj",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "mixins.final_layer.norm_final": "norm_out.norm",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation.1": "norm_out.linear",
    "transformer.final_layernorm": "norm_final",
    "transformer.audio_proj": "audio_proj",
    "transformer.face_proj": "face_proj",
}
# Official tensors that are several of ours: official layer module → (our attention module, its projections in
# row order).
_FUSED = {
    "attention.query_key_value": ("attn1", ("to_q", "to_k", "to_v")),
    "face_attn.key_value": ("attn_face", ("to_k", "to_v")),
    "audio_attn.key_value": ("attn_audio", ("to_k", "to_v")),
}
# adaLN_modulations.N.1 holds 12 chunks: video (shift, scale, gate) × (msa, mlp), then text (docs/model.md §1).
# diffusers' norm1 takes chunks (0, 1, 2, 6, 7, 8), norm2 takes (3, 4, 5, 9, 10, 11) (docs/model.md §8b.2).
_ADALN_CHUNKS = {"norm1.linear": (0, 1, 2, 6, 7, 8), "norm2.linear": (3, 4, 5, 9, 10, 11)}


def _split_rows(tensor: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    return tensor.chunk(parts, dim=0)[index]


def _split_shape(shape: tuple[int, ...], parts: int, count: int = 1) -> tuple[int, ...]:
    return (shape[0] // parts * count, *shape[1:])


def map_official(sd: dict, prefix: str) -> list[Mapped]:
    """Every diffusers tensor of the network under ``prefix``; raises ModelError on unknown keys."""
    out: list[Mapped] = []
    unknown = []
    for key in sd:
        if not key.startswith(prefix) or any(re.match(p, key) for p in IGNORED_PATTERNS):
            continue
        name = key[len(prefix):]
        stem, _, leaf = name.rpartition(".")
        tensor = sd[key]
        shape = tuple(tensor.shape)
        get = lambda key=key: sd[key]  # noqa: E731

        if stem in _TOP_RENAMES or name in _TOP_RENAMES:
            target = _TOP_RENAMES.get(name) or f"{_TOP_RENAMES[stem]}.{leaf}"
            out.append(Mapped(target, (key,), get, shape))
        elif m := re.fullmatch(r"transformer\.audio_proj\.(.+)|transformer\.face_proj\.(.+)", name):
            out.append(Mapped(name.removeprefix("transformer."), (key,), get, shape))
        elif m := re.fullmatch(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)", name):
            layer, leaf = m.groups()
            for target, chunks in _ADALN_CHUNKS.items():
                make = lambda key=key, chunks=chunks: torch.cat([_split_rows(sd[key], 12, c) for c in chunks])
                out.append(Mapped(f"transformer_blocks.{layer}.{target}.{leaf}", (key,), make, _split_shape(shape, 12, 6)))
        elif m := re.fullmatch(r"mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)", name):
            kind, layer, leaf = m.groups()
            out.append(Mapped(f"transformer_blocks.{layer}.attn1.norm_{kind[0]}.{leaf}", (key,), get, shape))
        elif m := re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, module, leaf = m.groups()
            base = f"transformer_blocks.{layer}"
            if module in _FUSED:
                attn, parts = _FUSED[module]
                count = len(parts)
                for index, part in enumerate(parts):
                    make = lambda key=key, index=index, count=count: _split_rows(sd[key], count, index)
                    out.append(Mapped(f"{base}.{attn}.{part}.{leaf}", (key,), make, _split_shape(shape, count)))
            elif module in _LAYER_RENAMES:
                out.append(Mapped(f"{base}.{_LAYER_RENAMES[module]}.{leaf}", (key,), get, shape))
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ModelError(f"unknown keys in checkpoint: {_names(unknown)}")
    for item in out:
        item.itemsize = sd[item.sources[0]].element_size()
    return out


def official_names(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, str]:
    """The inverse of :func:`map_official`: the official key (``prefix`` + official name) each diffusers tensor of
    a network is made from, given the tensors' names and shapes (e.g. a model's ``named_parameters()``). Several
    of ours may come from one official tensor (``query_key_value`` → ``to_q``/``to_k``/``to_v``, an adaLN
    modulation → ``norm1.linear`` and ``norm2.linear``).

    Checked against the converter itself: :func:`map_official` is run on the official layout this implies (meta
    tensors) and must give back exactly these names and shapes, so the two directions cannot drift apart.
    """
    keys: dict[str, str] = {}
    rows: dict[str, int] = {}  # official key → its rows (the sum over the tensors made from it)
    trailing: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        key = prefix + _official_name(name)
        keys[name] = key
        shape = tuple(shape)
        rows[key] = rows.get(key, 0) + shape[0]
        trailing[key] = shape[1:]
    layout = {key: torch.empty((rows[key], *trailing[key]), device="meta") for key in rows}
    back = {m.name: (m.shape, m.sources[0]) for m in map_official(layout, prefix)}
    expected = {name: (tuple(shape), keys[name]) for name, shape in shapes.items()}
    if back != expected:
        wrong = sorted(set(back.items()) ^ set(expected.items()))
        raise ModelError(f"official names do not round-trip through the converter: {_names([str(w) for w in wrong])}")
    return keys


def _official_name(name: str) -> str:
    """One diffusers name → its official name (without the network prefix); see :func:`official_names`."""
    for official, ours in sorted(_TOP_RENAMES.items(), key=lambda item: -len(item[1])):
        if name == ours or name.startswith(ours + "."):
            return official + name[len(ours):]
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", name):
        layer, module, leaf = m.groups()
        for official, ours in _LAYER_RENAMES.items():
            if module == ours:
                return f"transformer.layers.{layer}.{official}.{leaf}"
        for official, (attn, parts) in _FUSED.items():
            if module in (f"{attn}.{part}" for part in parts):
                return f"transformer.layers.{layer}.{official}.{leaf}"
        if module in _ADALN_CHUNKS:
            return f"mixins.adaln_layer.adaLN_modulations.{layer}.1.{leaf}"
        if module in ("attn1.norm_q", "attn1.norm_k"):
            kind = "query" if module.endswith("q") else "key"
            return f"mixins.adaln_layer.{kind}_layernorm_list.{layer}.{leaf}"
    raise ModelError(f"no official counterpart for {name!r}")


def _names(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _expected_shapes(model_cls, config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_cls(**config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_mapping(mapped: list[Mapped], model_cls, config: dict, prefix: str) -> None:
    """Every key of the diffusers model is produced exactly once with the right shape."""
    expected = _expected_shapes(model_cls, config)
    produced = {m.name: m for m in mapped}
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names([src for n in unexpected for src in produced[n].sources])}")
    bad = [f"{m.sources[0]} {m.shape}≠{expected[m.name]}" for m in mapped if m.name in expected and m.shape != expected[m.name]]
    if bad:
        problems.append(f"wrong shapes {_names(bad)}")
    if problems:
        raise ModelError(f"checkpoint does not match the {model_cls.__name__} layout ({prefix}): " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# writing


def write_diffusers_folder(
    dest: Path, model_cls, config: dict, mapped: list[Mapped], shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None
) -> Path:
    """Write ``config.json`` and safetensors shards (with an index when sharded) into ``dest``.

    Tensors are materialised one at a time and each shard is flushed when full. Written into a
    temporary sibling folder and renamed at the end, so ``dest`` is never left half-written.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards: list[dict[str, str]] = []
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append({key: name for key in current})
                current, size = {}, 0

        for item in mapped:
            tensor = item.make().contiguous()
            nbytes = item.nbytes
            if current and size + nbytes > shard_bytes:
                flush()
            current[item.name] = tensor
            size += nbytes
            if progress is not None:
                progress(nbytes)
        flush()

        total = len(shards)
        weight_map = {}
        for index, shard in enumerate(shards):
            final = f"{WEIGHTS_NAME}.safetensors" if total == 1 else f"{WEIGHTS_NAME}-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(tmp / f"shard-{index:05d}.safetensors", tmp / final)
            weight_map.update({key: final for key in shard})
        if total > 1:
            index_data = {"metadata": {"total_size": sum(m.nbytes for m in mapped)}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
        full_config = {"_class_name": model_cls.__name__, **config}
        (tmp / "config.json").write_text(json.dumps(full_config, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def convert_checkpoint(
    src: str | Path,
    dest: str | Path,
    *,
    overrides: dict | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> dict[str, Path]:
    """Convert an official checkpoint into ``dest/transformer`` and ``dest/reference``.

    ``overrides`` sets geometry the tensors cannot tell (see :func:`infer_config`), e.g.
    ``{"audio_layers": 2}``. Returns the two written folders.
    """
    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    dest = _check_destination(Path(dest))
    sd = load_official_state_dict(src)
    jobs = []
    for folder, prefix, model_cls, main in (
        ("transformer", MAIN_PREFIX, Hallo3Transformer3DModel, True),
        ("reference", REF_PREFIX, Hallo3ReferenceNet, False),
    ):
        if not any(key.startswith(prefix) for key in sd):
            raise ModelError(f"checkpoint has no {prefix}* keys ({model_cls.__name__})")
        geometry = {k: v for k, v in (overrides or {}).items() if main or not k.startswith(("audio_", "face_"))}
        config = infer_config(sd, prefix, main=main, overrides=geometry)
        mapped = map_official(sd, prefix)
        check_mapping(mapped, model_cls, config, prefix)
        jobs.append((folder, model_cls, config, mapped))

    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(m.nbytes for _, _, _, mapped in jobs for m in mapped)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr)
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        written = {}
        for folder, model_cls, config, mapped in jobs:
            written[folder] = write_diffusers_folder(
                dest / folder, model_cls, config, mapped, shard_bytes, bar.update if bar else None
            )
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)  # nothing of ours is left behind
        raise
    finally:
        if bar is not None:
            bar.close()
    return written


def _check_destination(dest: Path) -> Path:
    """``dest`` must be (or become) a folder whose ``transformer/`` and ``reference/`` are absent or earlier
    conversions (replaced); anything else there is the user's and is refused before any work."""
    if dest.exists() and not dest.is_dir():
        raise OutputError("exists and is not a folder; give a folder for transformer/ and reference/", dest)
    for folder, cls in (("transformer", "Hallo3Transformer3DModel"), ("reference", "Hallo3ReferenceNet")):
        target = dest / folder
        if target.is_symlink() or (target.exists() and not _converted_by_us(target, cls)):
            raise OutputError(f"exists and is not a {cls} conversion; remove it or choose another destination", target)
    return dest


def _converted_by_us(folder: Path, cls: str) -> bool:
    try:
        return folder.is_dir() and json.loads((folder / "config.json").read_text()).get("_class_name") == cls
    except (OSError, ValueError, AttributeError):
        return False
