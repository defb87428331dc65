"""Cheap checks of installed weights, reading headers only: JSON files parse, safetensors files are whole, a
converted DiT folder holds every parameter of its model class with its shape."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from hallo3_cli import store
from hallo3_cli.errors import ModelError


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file; ModelError if it is truncated or not safetensors."""
    try:
        header = store.read_safetensors_header(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"not a readable, whole safetensors file ({err})", path) from None
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def verify_files(paths: Iterable[Path]) -> None:
    """Cheap integrity checks: JSON files parse, safetensors files are whole (headers only)."""
    for path in sorted(Path(p) for p in paths):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ModelError(f"unreadable JSON ({err})", path) from None
        elif path.suffix == ".safetensors":
            read_safetensors_shapes(path)


def verify_folder(folder: Path) -> None:
    """:func:`verify_files` on every file of a folder."""
    verify_files(p for p in Path(folder).rglob("*") if p.is_file())


def verify_converted(folder: Path, class_name: str | None) -> None:
    """Check a converted diffusers folder against its model class: config loads, every parameter of
    the model built on the meta device is present with its shape (nothing is read or allocated)."""
    verify_folder(folder)
    if class_name is None:
        return
    import torch

    from hallo3_cli import models

    config = json.loads((folder / "config.json").read_text())
    model_cls = getattr(models, class_name)
    with torch.device("meta"):
        model = model_cls.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(read_safetensors_shapes(shard))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise ModelError(f"shard {absent[0]} listed in the index is missing", folder)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise ModelError(f"converted weights do not match {class_name}: {detail}", folder)
