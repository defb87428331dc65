"""Filesystem helpers: atomic writes, output checks and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hallo3_cli.errors import InputError, OutputError


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a Path if it is an existing readable file, else raise InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a directory, expected a file", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable", path)
    return path


def check_output_path(path: str | Path) -> Path:
    """Fail early (before any expensive work) if ``path`` cannot be written atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {str(parent)!r} does not exist", path)
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable", path)
    if path.is_dir():
        raise OutputError("is a directory, expected a file path", path)
    return path


def ensure_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) if missing; fail early if files cannot be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(f"cannot write files here ({err.strerror or err})", folder) from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file keeps the suffix of ``path`` so that tools choosing a format by extension
    (PyAV, safetensors) behave the same. On any exception the temporary file is removed.
    """
    path = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write here ({err.strerror or err})", path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
