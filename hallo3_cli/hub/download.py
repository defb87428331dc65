"""``hallo3 download``: fetch (or import), convert, verify and install a preset's weights, and the check that
every command makes before loading any of them (:func:`ensure_weights`).

A component folder only appears by renaming a finished build that already holds its marker (the model home's
layout: :mod:`hallo3_cli.store`), so an interrupted run never leaves anything that looks installed; a rerun
resumes the downloads where they stopped.

    from hallo3_cli.hub import download
    print(download("hallo3", dry_run=True))
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from hallo3_cli import fsutil, store
from hallo3_cli.components import COMPONENTS
from hallo3_cli.errors import ModelError, OutputError
from hallo3_cli.formatting import human_size
from hallo3_cli.hub.fetch import fetch, offline
from hallo3_cli.hub.official import import_official
from hallo3_cli.hub.report import ComponentReport, DownloadReport
from hallo3_cli.hub.sources import component_names, select
from hallo3_cli.presets import Preset, get_preset, model_home

log = logging.getLogger("hallo3")


def download(
    model: str = "hallo3",
    dest: str | Path | None = None,
    dry_run: bool = False,
    from_dir: str | Path | None = None,
    progress: bool = True,
    components: Iterable[str] | None = None,
) -> DownloadReport:
    """Fetch (or import from an official ``pretrained_models/`` folder), convert, verify and install
    the weights of ``model`` that are not installed yet.

    ``dest``: model home to install into (the preset goes to ``dest/<model>/``); default
    :func:`~hallo3_cli.presets.model_home`. ``components``: names of sources (``dit``, ``vae``...) or
    folders (``transformer``...) to limit the work to. ``dry_run``: report what would be done, touch
    nothing. Installed components are skipped, so a second run does nothing (and says so).
    """
    preset = get_preset(model)
    root = Path(dest).expanduser() if dest is not None else model_home()
    preset_dir = root / preset.name
    for folder in (root, preset_dir):
        if folder.exists() and not folder.is_dir():
            raise OutputError("exists and is not a folder; --dest takes the folder to install into", folder)
    command = f"hallo3 download --model {preset.name}" + (f" --dest {dest}" if dest is not None else "")
    report = DownloadReport(preset.name, preset_dir, dry_run=dry_run, command=command,
                            from_dir=Path(from_dir) if from_dir is not None else None)
    if dest is not None and root.absolute() != model_home().absolute():
        report.hint = f"other commands look in {model_home()}: set HALLO3_HOME={root} to use these weights"
    if preset.is_random:
        return report
    chosen = select(preset, components)
    pending = []
    for source in chosen:
        if all(store.is_installed(preset_dir, f) for f in source.produces):
            report.components.append(ComponentReport(source.name, source.produces, source.origin, "installed"))
        else:
            pending.append(source)
    if not pending:
        log.info("%s", report.summary())
    elif from_dir is not None:
        report = import_official(preset, preset_dir, pending, Path(from_dir), report, progress)
    else:
        report = fetch(preset, preset_dir, pending, report, progress)
    if not dry_run:
        write_model_index(preset, preset_dir)
    return report


def write_model_index(preset: Preset, preset_dir: Path) -> Path | None:
    """Make the model home a folder ``Hallo3Pipeline.from_pretrained`` loads offline: ``model_index.json``,
    a ``scheduler/`` config, and links named after the pipeline's components to the folders that hold
    them. Written only once every component the pipeline needs is installed; returns its path."""
    from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

    stored = [c for c in COMPONENTS if c.name != "scheduler"]
    if not all(store.is_installed(preset_dir, c.folder) for c in stored):
        return None
    for entry in stored:
        link = preset_dir / entry.name
        if entry.name != entry.folder and not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(entry.folder, target_is_directory=True)
    if not (preset_dir / "scheduler" / Hallo3DPMSolverSDEScheduler.config_name).exists():
        Hallo3DPMSolverSDEScheduler().save_config(str(preset_dir / "scheduler"))
    index = {"_class_name": "Hallo3Pipeline", "_diffusers_version": _diffusers_version(),
             **{c.name: [c.library, c.class_name] for c in COMPONENTS}, **preset.pipeline_config()}
    path = preset_dir / "model_index.json"
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:  # a second download changes nothing
        with fsutil.atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def ensure_weights(
    preset: Preset | str, components: Iterable[str], allow_download: bool = True, progress: bool = True
) -> None:
    """Make sure the component folders a command needs are installed, before loading any of them.

    Missing or incomplete components are downloaded (announced on stderr with size and destination)
    when ``allow_download`` and not offline (``HF_HUB_OFFLINE=1``); otherwise a ModelError gives the
    exact ``hallo3 download`` command to run. Random presets need nothing.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.is_random:
        return
    components = list(dict.fromkeys(components))
    if preset.is_folder:  # a model folder is complete or not: nothing to fetch for it
        for component in components:
            preset.require(component)
        return
    known = component_names(preset)
    unknown = [c for c in components if c not in known]
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no component {unknown[0]!r}; known: {', '.join(known)}")
    missing = [c for c in components if not store.is_installed(preset.home, c)]
    if not missing:
        return
    plan = download(preset.name, dry_run=True, components=missing)  # sizes from models.toml: no network
    if not allow_download or offline():
        why = "offline mode (HF_HUB_OFFLINE=1)" if allow_download else "--no-download"
        # exactly what is missing, not the whole preset
        command = f"hallo3 download --model {preset.name}" + "".join(f" --component {c}" for c in missing)
        raise ModelError(
            f"the {', '.join(missing)} weights of preset {preset.name!r} ({human_size(plan.total)}) are not installed "
            f"in {preset.home} and {why} prevents fetching them; run: {command}"
        )
    command = f"hallo3 download --model {preset.name}"
    extra = f" (+{human_size(plan.peak_extra)} temporarily)" if plan.peak_extra else ""
    log.warning(
        "the %s weights of preset %r are not installed: downloading %s%s into %s (once; or run: %s)",
        ", ".join(missing), preset.name, human_size(plan.total), extra, preset.home, command,
    )
    download(preset.name, progress=progress, components=missing)
