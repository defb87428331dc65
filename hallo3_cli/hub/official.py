"""Importing an official ``pretrained_models/`` folder (``hallo3 download --from``): no network, hard links where
the filesystem allows, the DiT checkpoint converted."""

from __future__ import annotations

import logging
from pathlib import Path

from hallo3_cli import store
from hallo3_cli.errors import InputError
from hallo3_cli.formatting import human_size
from hallo3_cli.hub.install import check_disk, existing_parent, install_converted, install_files, locked
from hallo3_cli.hub.report import ComponentReport, DownloadReport
from hallo3_cli.hub.sources import Source, sources
from hallo3_cli.presets import Preset

log = logging.getLogger("hallo3")


def import_official(
    preset: Preset, preset_dir: Path, pending: list[Source], from_dir: Path, report: DownloadReport, progress: bool
) -> DownloadReport:
    if not from_dir.is_dir():
        raise InputError("not a folder (expected the official pretrained_models/ folder)", from_dir)
    layout = sorted({s.official for s in sources(preset) if s.official})
    if not any((from_dir / folder).is_dir() for folder in layout):
        raise InputError(f"not an official pretrained_models/ folder (none of {', '.join(layout)} found)", from_dir)
    found: dict[str, dict[str, Path] | Path] = {}
    for source in pending:
        located = _locate_official(source, from_dir)
        if isinstance(located, str):  # a reason why it is not there
            action = "skipped" if source.optional else "missing"
            origin = _official_origin(source, from_dir)
            report.components.append(ComponentReport(source.name, source.produces, origin, action, source.size, located))
        else:
            found[source.name] = located
    planned = [s for s in pending if s.name in found]
    sizes = {s.name: _official_size(found[s.name]) for s in planned}
    if report.dry_run:
        for source in planned:
            origin = _official_origin(source, from_dir)
            report.components.append(ComponentReport(source.name, source.produces, origin, "import", sizes[source.name]))
        return _finish_import(report)

    need = 0
    for source in planned:
        if source.convert:
            need += sizes[source.name]  # converted folders are about as large as the checkpoint
        elif not _same_device(from_dir, preset_dir):
            need += sizes[source.name]  # copies (same filesystem: hard links, no space)
    check_disk(preset_dir, need, f"importing {human_size(sum(sizes.values()))}")

    with locked(preset_dir):
        for source in planned:
            if all(store.is_installed(preset_dir, f) for f in source.produces):  # another run finished it meanwhile
                report.components.append(ComponentReport(source.name, source.produces, source.origin, "installed"))
                continue
            # The files are the user's: their revision is unknown (the release's is kept for reference).
            info = {"source": "import", "revision": None, "release": f"{source.repo}@{source.revision}",
                    "imported_from": str((from_dir / (source.official or "")).resolve())}
            log.info("importing %s from %s", source.name, _official_origin(source, from_dir))
            if source.convert:
                info["converted_from"] = source.official
                install_converted(source, preset_dir, found[source.name], info, progress)
            else:
                install_files(source, preset_dir, found[source.name], info, move=False)
            origin = _official_origin(source, from_dir)
            report.components.append(ComponentReport(source.name, source.produces, origin, "import", sizes[source.name]))
    return _finish_import(report)


def _finish_import(report: DownloadReport) -> DownloadReport:
    if not report.dry_run:
        log.log(logging.WARNING if report.missing else logging.INFO, "%s", report.summary())
    return report


def _official_origin(source: Source, from_dir: Path) -> str:
    return str(from_dir / source.official) + "/" if source.official else "(not in the official layout)"


def _locate_official(source: Source, from_dir: Path) -> dict[str, Path] | Path | str:
    """Files of ``source`` in an official folder, the checkpoint folder for the DiT, or why not found."""
    if not source.official:
        return "no usable copy in the official layout (the official VAE is a SAT checkpoint, 3d-vae.pt)"
    folder = from_dir / source.official
    if not folder.is_dir():
        return f"{folder} not found"
    if source.convert:
        missing = [f for f in source.official_files if not (folder / f).is_file()]
        return folder if not missing else f"{folder / missing[0]} not found"
    files: dict[str, Path] = {}
    for pattern in source.official_files:
        matches = [p for p in sorted(folder.glob(pattern)) if p.is_file()]
        if not matches:
            return f"no {pattern} in {folder}"
        files.update({p.name: p for p in matches})
    for pattern in source.official_extra:
        files.update({p.name: p for p in sorted(folder.glob(pattern)) if p.is_file()})
    return files


def _official_size(found: dict[str, Path] | Path) -> int:
    if isinstance(found, Path):
        from hallo3_cli.hub.convert import resolve_checkpoint

        return resolve_checkpoint(found).stat().st_size
    return sum(p.stat().st_size for p in found.values())


def _same_device(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == existing_parent(b).stat().st_dev
    except OSError:
        return False
