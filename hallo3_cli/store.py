"""What is installed in a model home, read without loading any weights: the ``.complete`` markers of component
folders, a cheap fingerprint of a folder's files, and the header of a safetensors file.

Layout of a preset's folder ``<model home>/<preset>/`` (model home: ``$HALLO3_HOME``, else
``<Hugging Face cache>/hallo3-cli``, see :func:`hallo3_cli.presets.model_home`)::

    transformer/ reference/ vae/ ...   one folder per component, as the loaders expect it
    <component>/.complete              JSON marker (revision, files and sizes, fingerprint)
    .downloads/<source>/               files being fetched (resumable)
    .build/<source>/                   a component being assembled and verified

A component folder only appears by renaming a finished build that already holds its marker
(:mod:`hallo3_cli.hub`), so "installed" has one meaning: the marker lists files that are all there with
their sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MARKER = ".complete"
DOWNLOADS = ".downloads"
BUILD = ".build"
LOCK = ".lock"
MARKER_FORMAT = 1
#: The largest safetensors header read (the limit of the safetensors library itself).
MAX_HEADER_BYTES = 100_000_000
#: The deepest JSON nesting parsed from a file (ours never exceed 4; Python's parser would recurse ~1000 deep
#: and fail with RecursionError, safetensors' at 128).
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class ComponentState:
    """State of one component folder: ``complete``, ``partial`` (being fetched/built, or a folder
    without marker), ``damaged`` (marker present but files missing or resized) or ``missing``."""

    name: str
    path: Path
    state: str
    size_on_disk: int = 0
    revision: str | None = None
    detail: str = ""


def read_marker(folder: str | Path) -> dict | None:
    """The ``.complete`` marker of a component folder, or None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(folder: Path, **info) -> None:
    """Write the ``.complete`` marker of a finished component folder (its files, sizes and fingerprint)."""
    from hallo3_cli import fsutil
    from hallo3_cli.version import __version__

    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    marker = {
        "format": MARKER_FORMAT,
        **info,
        "files": files,
        "fingerprint": folder_fingerprint(folder),
        "installed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hallo3_cli": __version__,
    }
    with fsutil.atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2) + "\n")


def component_state(preset_dir: str | Path, component: str, source: str | None = None) -> ComponentState:
    """Inspect ``<preset_dir>/<component>`` without reading weights (sizes only). ``source``: the name of the
    download source that makes it, whose unfinished download or build counts as ``partial``."""
    preset_dir = Path(preset_dir)
    folder = preset_dir / component
    marker = read_marker(folder)
    if marker is not None:
        listed = marker.get("files", {})
        if not isinstance(listed, dict):
            listed = {}
        bad = [name for name, size in listed.items() if not _has_size(folder / name, size)]
        size = sum(int(s) for s in listed.values() if isinstance(s, int))
        if bad or not listed:
            what = f"{len(bad)} of {len(listed)} files missing or changed (e.g. {bad[0]})" if bad else "empty marker"
            return ComponentState(component, folder, "damaged", tree_size(folder), marker.get("revision"), what)
        return ComponentState(component, folder, "complete", size, marker.get("revision") or marker.get("source"))
    staged = []
    if source is not None:
        staged = [p for p in (preset_dir / DOWNLOADS / source, preset_dir / BUILD / source) if p.exists()]
    if folder.exists() or staged:
        detail = "download in progress or interrupted (resumable)" if staged else "no .complete marker"
        size = sum(tree_size(p) for p in [folder, *staged] if p.exists())
        return ComponentState(component, folder, "partial", size, None, detail)
    return ComponentState(component, folder, "missing")


def is_installed(preset_dir: str | Path, component: str) -> bool:
    return component_state(preset_dir, component).state == "complete"


def _has_size(path: Path, size) -> bool:
    try:
        return path.stat().st_size == int(size)
    except (OSError, TypeError, ValueError):
        return False


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def folder_fingerprint(folder: Path) -> str:
    """A cheap fingerprint of a folder's files: names, sizes and the first and last MiB of each (no full read)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def parse_json(raw: str | bytes, what: str = "JSON", *, max_bytes: int = MAX_HEADER_BYTES,
               max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` of text read from a file, with its size and nesting depth checked BEFORE it is parsed:
    ``ValueError`` naming ``what`` and the limit (too long, nested deeper than ``max_depth``, not JSON)."""
    import numpy as np

    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data)} bytes long, more than the {max_bytes} accepted")
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", data), np.uint8)  # brackets outside strings
    steps = np.isin(skeleton, (0x5B, 0x7B)).astype(np.int64) - np.isin(skeleton, (0x5D, 0x7D))
    if steps.size and int(np.cumsum(steps).max()) > max_depth:
        raise ValueError(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{what} is not valid JSON") from None


def read_safetensors_header(path: str | Path, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The JSON header of a safetensors file (tensor entries and ``__metadata__``), without reading tensor data.

    Raises ``ValueError`` naming the problem when the file is too short, the header is longer than
    ``max_bytes`` or the file, not a JSON object (or nested deeper than :data:`MAX_JSON_DEPTH`), or the tensors
    it describes do not end exactly where the file does (a truncated or padded copy).
    """
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError("truncated, or not safetensors: the header length runs past the end of the file")
        if length > max_bytes:
            raise ValueError(f"the header is {length} bytes long, more than the {max_bytes} accepted")
        raw = f.read(length)
    header = parse_json(raw, "the header")
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError("the header's tensor entries are malformed") from None
    if 8 + length + end != size:
        raise ValueError(f"truncated or padded: {size} bytes, the header describes {8 + length + end}")
    return header
