"""Assembling a component in ``.build/``, verifying it, marking it complete and renaming it into place, so that
an interrupted install never leaves anything that looks installed; disk space and the model home's lock."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hallo3_cli import fsutil, store
from hallo3_cli.components import converted_class
from hallo3_cli.errors import ModelError, OutputError
from hallo3_cli.formatting import human_size
from hallo3_cli.hub.sources import Source
from hallo3_cli.hub.verify import verify_converted, verify_folder

log = logging.getLogger("hallo3")


def install_files(source: Source, preset_dir: Path, files: dict[str, Path], info: dict, move: bool) -> None:
    """Put ``files`` (local name → path) into ``<preset_dir>/<source.name>/`` atomically."""
    (folder,) = source.produces
    with _build(preset_dir, source) as build:
        target = build / folder
        target.mkdir(parents=True)
        for name, path in files.items():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, destination, move=move)
        verify_folder(target)
        store.write_marker(target, component=folder, **info)
        _publish(target, preset_dir / folder)


def install_converted(source: Source, preset_dir: Path, checkpoint: Path, info: dict, progress: bool) -> None:
    """Convert the official DiT checkpoint into the diffusers folders it produces, verify, publish."""
    from hallo3_cli.hub.convert import convert_checkpoint

    with _build(preset_dir, source) as build:
        written = convert_checkpoint(checkpoint, build, progress=progress)
        for folder in source.produces:
            if folder not in written:
                raise ModelError(f"converting the checkpoint did not produce {folder}/", checkpoint)
            verify_converted(written[folder], converted_class(folder))
            store.write_marker(written[folder], component=folder, **info)
        for folder in source.produces:
            if not store.is_installed(preset_dir, folder):
                _publish(written[folder], preset_dir / folder)


@contextlib.contextmanager
def _build(preset_dir: Path, source: Source) -> Iterator[Path]:
    build = preset_dir / store.BUILD / source.name
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        yield build
    finally:
        shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(OSError):
            build.parent.rmdir()


def _publish(built: Path, final: Path) -> None:
    """Rename a finished, marked folder into place (replacing an incomplete or damaged one)."""
    if final.exists() or final.is_symlink():
        log.info("replacing the incomplete folder %s", final)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(built, final)


def _link_or_copy(src: Path, dst: Path, move: bool) -> None:
    """Hard link (no extra space, source kept for resuming), else move (own staging) or copy."""
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    if move:
        os.replace(src, dst)
    else:
        shutil.copy2(src, dst)


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(preset_dir: Path, need: int, what: str) -> None:
    probe = existing_parent(preset_dir)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OutputError(
            f"not enough free disk space for the weights: {what} needs {human_size(need)}, only "
            f"{human_size(free)} free (choose another place with --dest or $HALLO3_HOME)",
            probe,
        )


@contextlib.contextmanager
def locked(preset_dir: Path) -> Iterator[None]:
    try:
        preset_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the model folder ({err.strerror or err})", preset_dir) from None
    try:
        lock = fsutil.exclusive_lock(preset_dir / store.LOCK, wait=False)
        lock.__enter__()
    except BlockingIOError:
        raise ModelError("another 'hallo3 download' is installing into this folder; wait for it to finish",
                         preset_dir) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
