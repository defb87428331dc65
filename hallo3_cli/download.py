"""``hallo3 download``: fetch, convert, verify and install a preset's weights, and the check that
every command makes before loading any of them.

Layout of a preset's folder ``<model home>/<preset>/`` (model home: ``$HALLO3_HOME``, else
``<Hugging Face cache>/hallo3-cli``, see :func:`hallo3_cli.presets.model_home`)::

    transformer/ reference/ vae/ ...   one folder per component, as the loaders expect it
    <component>/.complete              JSON marker (revision, files and sizes, fingerprint)
    .downloads/<source>/               files being fetched (huggingface_hub ``local_dir``, resumable)
    .build/<source>/                   a component being assembled and verified

A component folder only appears by renaming a finished build that already holds its marker, so an
interrupted run never leaves anything that looks installed; a rerun resumes the downloads where
they stopped. Network access goes through huggingface_hub only, which honours ``HF_TOKEN``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT``.

    from hallo3_cli.download import download
    print(download("hallo3", dry_run=True))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hallo3_cli import __version__, fsutil
from hallo3_cli.errors import InputError, ModelError, OutputError
from hallo3_cli.presets import Preset, _folder_fingerprint, get_preset, model_home

log = logging.getLogger("hallo3")

MARKER = ".complete"
DOWNLOADS = ".downloads"
BUILD = ".build"
LOCK = ".lock"
MARKER_FORMAT = 1
#: Converted DiT folders and the model class their weights must match.
CONVERTED_CLASSES = {"transformer": "Hallo3Transformer3DModel", "reference": "Hallo3ReferenceNet"}


# ---------------------------------------------------------------------------------------------
# what a preset is made of


@dataclass(frozen=True)
class Source:
    """One entry of ``[<preset>.components]``: where its files come from and which folders they become."""

    name: str
    repo: str
    revision: str
    files: tuple[str, ...]
    size: int
    subfolder: str = ""
    produces: tuple[str, ...] = ()
    convert: bool = False
    installed_size: int = 0
    optional: bool = False
    official: str | None = None
    official_files: tuple[str, ...] = ()
    official_extra: tuple[str, ...] = ()
    what: str = ""
    licence: str = ""

    @classmethod
    def from_table(cls, name: str, table: dict) -> "Source":
        files = tuple(table["files"])
        return cls(
            name=name,
            repo=table["repo"],
            revision=table.get("revision", "main"),
            files=files,
            size=int(table["size"]),
            subfolder=table.get("subfolder", "").strip("/"),
            produces=tuple(table.get("produces", [name])),
            convert=bool(table.get("convert", False)),
            installed_size=int(table.get("installed_size", table["size"])),
            optional=bool(table.get("optional", False)),
            official=table.get("official"),
            official_files=tuple(table.get("official_files", files)),
            official_extra=tuple(table.get("official_extra", ())),
            what=table.get("what", ""),
            licence=table.get("licence", ""),
        )

    def repo_path(self, file: str) -> str:
        return f"{self.subfolder}/{file}" if self.subfolder else file

    @property
    def origin(self) -> str:
        where = f" {self.subfolder}/" if self.subfolder else ""
        return f"{self.repo}@{self.revision[:8]}{where} ({len(self.files)} file{'s' * (len(self.files) > 1)})"


def sources(preset: Preset) -> list[Source]:
    """The download sources of a release preset, in ``models.toml`` order (none for random presets)."""
    if preset.is_random:
        return []
    return [Source.from_table(name, table) for name, table in preset.components.items()]


def component_names(preset: Preset) -> list[str]:
    """The local component folders of a preset (``transformer``, ``reference``, ``vae``, ...)."""
    return [folder for source in sources(preset) for folder in source.produces]


# ---------------------------------------------------------------------------------------------
# what is installed


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
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def component_state(preset_dir: str | Path, component: str, source: Source | None = None) -> ComponentState:
    """Inspect ``<preset_dir>/<component>`` without reading weights (sizes only)."""
    preset_dir = Path(preset_dir)
    folder = preset_dir / component
    marker = read_marker(folder)
    if marker is not None:
        listed = marker.get("files", {})
        bad = [name for name, size in listed.items() if not _has_size(folder / name, size)]
        size = sum(int(s) for s in listed.values())
        if bad or not listed:
            what = f"{len(bad)} of {len(listed)} files missing or changed (e.g. {bad[0]})" if bad else "empty marker"
            return ComponentState(component, folder, "damaged", _tree_size(folder), marker.get("revision"), what)
        return ComponentState(component, folder, "complete", size, marker.get("revision") or marker.get("source"))
    staged = []
    if source is not None:
        staged = [p for p in (preset_dir / DOWNLOADS / source.name, preset_dir / BUILD / source.name) if p.exists()]
    if folder.exists() or staged:
        detail = "download in progress or interrupted (resumable)" if staged else "no .complete marker"
        size = sum(_tree_size(p) for p in [folder, *staged] if p.exists())
        return ComponentState(component, folder, "partial", size, None, detail)
    return ComponentState(component, folder, "missing")


def _has_size(path: Path, size) -> bool:
    try:
        return path.stat().st_size == int(size)
    except OSError:
        return False


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_installed(preset_dir: Path, folder: str) -> bool:
    """(``Preset.is_installed`` for a model home given as a folder: the same test.)"""
    return component_state(preset_dir, folder).state == "complete"


# ---------------------------------------------------------------------------------------------
# reports


@dataclass
class ComponentReport:
    """What ``download`` did (or would do) for one source."""

    name: str
    folders: tuple[str, ...]
    origin: str
    action: str  # "installed" (already), "fetch", "import", "missing", "skipped"
    size: int = 0  # bytes fetched or imported; for "missing"/"skipped": what the Hub download would be
    note: str = ""


@dataclass
class DownloadReport:
    """Result of :func:`download`; ``str(report)`` is the table the CLI prints."""

    model: str
    home: Path
    components: list[ComponentReport] = field(default_factory=list)
    dry_run: bool = False
    from_dir: Path | None = None
    peak_extra: int = 0  # extra bytes needed while converting (dry run / plan)
    command: str = ""
    hint: str = ""  # e.g. how other commands find weights installed with --dest

    @property
    def total(self) -> int:
        return sum(c.size for c in self.components if c.action in ("fetch", "import"))

    @property
    def already_installed(self) -> bool:
        return bool(self.components) and all(c.action == "installed" for c in self.components)

    @property
    def missing(self) -> list[ComponentReport]:
        return [c for c in self.components if c.action == "missing"]

    def summary(self) -> str:
        """One line for stderr."""
        if not self.components:
            return f"preset {self.model!r} has no files to download (its weights are generated in memory)"
        if self.already_installed:
            line = f"{self.model}: already installed in {self.home}; nothing to do"
            return f"{line}; {self.hint}" if self.hint else line
        if self.from_dir is not None:
            verb = "would import" if self.dry_run else "imported"
        else:
            verb = "would fetch" if self.dry_run else "installed"
        line = f"{self.model}: {verb} {human_size(self.total)} into {self.home}"
        if self.missing:
            names = ", ".join(f for c in self.missing for f in c.folders)
            line += f"; still missing: {names} ({human_size(sum(c.size for c in self.missing))}); run: {self.command}"
        return f"{line}; {self.hint}" if self.hint else line

    def __str__(self) -> str:
        return format_report(self)


def human_size(n: int) -> str:
    """Decimal units, as the Hub shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


_DONE = {"installed": "installed", "fetch": "fetched", "import": "imported", "missing": "MISSING", "skipped": "skipped"}
_PLANNED = {**_DONE, "fetch": "to fetch", "import": "to import"}


def format_report(report: DownloadReport) -> str:
    """A table: component, folders, source, size, action; then the totals."""
    if not report.components:
        return report.summary()
    rows = [("component", "into", "source", "size", "state")]
    for c in report.components:
        words = (_PLANNED if report.dry_run else _DONE).get(c.action, c.action)
        rows.append((c.name, ", ".join(f"{f}/" for f in c.folders), c.origin, human_size(c.size) if c.size else "-", words))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [f"{report.model} weights -> {report.home}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for c in report.components:
        if c.note:
            lines.append(f"  {c.name}: {c.note}")
    total = f"total: {human_size(report.total)}"
    if report.peak_extra:
        total += f" (+{human_size(report.peak_extra)} while converting the DiT)"
    lines.append(total)
    lines.append(report.summary())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the public entry points


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
    chosen = _select(preset, components)
    pending = []
    for source in chosen:
        if all(_is_installed(preset_dir, f) for f in source.produces):
            report.components.append(ComponentReport(source.name, source.produces, source.origin, "installed"))
        else:
            pending.append(source)
    if not pending:
        log.info("%s", report.summary())
    elif from_dir is not None:
        report = _import_official(preset, preset_dir, pending, Path(from_dir), report, progress)
    else:
        report = _fetch(preset, preset_dir, pending, report, progress)
    if not dry_run:
        write_model_index(preset, preset_dir)
    return report


#: ``Hallo3Pipeline`` component → the folder of the model home that holds it (``model_index.json`` layout).
PIPELINE_FOLDERS = {"transformer": "transformer", "reference_net": "reference", "vae": "vae",
                    "text_encoder": "text_encoder", "tokenizer": "tokenizer", "audio_encoder": "wav2vec",
                    "feature_extractor": "wav2vec"}


def write_model_index(preset: Preset, preset_dir: Path) -> Path | None:
    """Make the model home a folder ``Hallo3Pipeline.from_pretrained`` loads offline: ``model_index.json``,
    a ``scheduler/`` config, and links named after the pipeline's components to the folders that hold
    them. Written only once every component the pipeline needs is installed; returns its path."""
    from hallo3_cli.pipeline_hallo3 import COMPONENT_CLASSES
    from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

    if not all(_is_installed(preset_dir, folder) for folder in PIPELINE_FOLDERS.values()):
        return None
    for component, folder in PIPELINE_FOLDERS.items():
        link = preset_dir / component
        if component != folder and not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(folder, target_is_directory=True)
    if not (preset_dir / "scheduler" / Hallo3DPMSolverSDEScheduler.config_name).exists():
        Hallo3DPMSolverSDEScheduler().save_config(str(preset_dir / "scheduler"))
    index = {"_class_name": "Hallo3Pipeline", "_diffusers_version": _diffusers_version(),
             **{name: list(entry) for name, entry in COMPONENT_CLASSES.items()}, **preset.pipeline_config()}
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
    known = component_names(preset)
    unknown = [c for c in components if c not in known]
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no component {unknown[0]!r}; known: {', '.join(known)}")
    missing = [c for c in components if not _is_installed(preset.home, c)]
    if not missing:
        return
    command = f"hallo3 download --model {preset.name}"
    if not allow_download or _offline():
        why = "offline mode (HF_HUB_OFFLINE=1)" if allow_download else "--no-download"
        raise ModelError(
            f"the {', '.join(missing)} weights of preset {preset.name!r} are not installed in {preset.home} "
            f"and {why} prevents fetching them; run: {command}"
        )
    plan = download(preset.name, dry_run=True, components=missing)
    extra = f" (+{human_size(plan.peak_extra)} temporarily)" if plan.peak_extra else ""
    log.warning(
        "the %s weights of preset %r are not installed: downloading %s%s into %s (once; or run: %s)",
        ", ".join(missing), preset.name, human_size(plan.total), extra, preset.home, command,
    )
    download(preset.name, progress=progress, components=missing)


def _select(preset: Preset, names: Iterable[str] | None) -> list[Source]:
    all_sources = sources(preset)
    if names is None:
        return all_sources
    names = set(names)
    known = {s.name for s in all_sources} | {f for s in all_sources for f in s.produces}
    unknown = sorted(names - known)
    if unknown:
        raise InputError(f"unknown component {unknown[0]!r} of preset {preset.name!r}; known: {', '.join(sorted(known))}")
    return [s for s in all_sources if s.name in names or names & set(s.produces)]


def _offline() -> bool:
    import huggingface_hub.constants as constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------------------------------
# fetching from the Hub


def _fetch(
    preset: Preset, preset_dir: Path, pending: list[Source], report: DownloadReport, progress: bool
) -> DownloadReport:
    planned = sorted(pending, key=lambda s: s.size)  # small first: quick feedback, the DiT last
    if report.dry_run:
        for source in planned:
            already = _downloaded_bytes(preset_dir / DOWNLOADS / source.name)
            note = "resumes a partial download" if already else ""
            report.components.append(
                ComponentReport(source.name, source.produces, source.origin, "fetch", max(source.size - already, 0), note)
            )
        report.peak_extra = sum(s.installed_size for s in planned if s.convert)
        return report

    sizes = {source.name: _remote_sizes(source, preset_dir / DOWNLOADS / source.name) for source in planned}
    remaining = sum(
        max(sum(sizes[s.name].values()) - _downloaded_bytes(preset_dir / DOWNLOADS / s.name), 0) for s in planned
    )
    converted = sum(s.installed_size for s in planned if s.convert)
    _check_disk(preset_dir, remaining + converted, f"{human_size(remaining)} to download"
                + (f" + {human_size(converted)} while converting the DiT" if converted else ""))

    with _locked(preset_dir):
        for source in planned:
            if all(_is_installed(preset_dir, f) for f in source.produces):  # another run finished it meanwhile
                report.components.append(ComponentReport(source.name, source.produces, source.origin, "installed"))
                continue
            total = sum(sizes[source.name].values())
            log.info("fetching %s (%s) from %s", source.name, human_size(total), source.origin)
            _install_from_hub(source, preset_dir, sizes[source.name], progress)
            report.components.append(ComponentReport(source.name, source.produces, source.origin, "fetch", total))
    log.info("%s", report.summary())
    return report


def _remote_sizes(source: Source, download_dir: Path) -> dict[str, int]:
    """Exact sizes from the Hub (one HEAD request per file, no retries: fails fast when unreachable).

    Offline, files already fetched completely by an earlier run are used as they are.
    """
    import huggingface_hub

    if _offline():
        local = {f: download_dir / source.repo_path(f) for f in source.files}
        absent = [f for f, path in local.items() if not path.is_file()]
        if absent:
            raise ModelError(
                f"cannot download {source.repo} ({source.name}): offline mode is on (HF_HUB_OFFLINE=1); "
                f"unset it, or import an official folder with: hallo3 download --from PRETRAINED_MODELS_DIR"
            )
        return {f: path.stat().st_size for f, path in local.items()}
    sizes = {}
    for file in source.files:
        url = huggingface_hub.hf_hub_url(source.repo, file, subfolder=source.subfolder or None, revision=source.revision)
        try:
            meta = huggingface_hub.get_hf_file_metadata(url)
        except Exception as err:  # noqa: BLE001 - every hub failure becomes one line
            raise _hub_error(err, source, file) from None
        sizes[file] = int(meta.size) if meta.size is not None else source.size // len(source.files)
    return sizes


def _hub_error(err: Exception, source: Source, file: str, started: bool = False) -> ModelError:
    from huggingface_hub import errors

    where = f"{source.repo}@{source.revision[:8]}"
    if isinstance(err, errors.LocalEntryNotFoundError) and err.__cause__ is not None:
        err = err.__cause__  # hf_hub_download's wrapper around the network error
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, errors.OfflineModeIsEnabled):
        message = f"cannot download {where}: offline mode is on (HF_HUB_OFFLINE=1)"
    elif isinstance(err, errors.GatedRepoError):
        message = f"{where} is gated: accept its terms on the Hub and log in (hf auth login, or set HF_TOKEN)"
    elif isinstance(err, errors.RepositoryNotFoundError):
        message = f"{source.repo}: repository not found or not accessible (private? set HF_TOKEN)"
    elif isinstance(err, errors.RevisionNotFoundError):
        message = f"{source.repo}: revision {source.revision} not found"
    elif isinstance(err, errors.EntryNotFoundError) and not isinstance(err, errors.LocalEntryNotFoundError):
        message = f"{where}: file {source.repo_path(file)} not found"
    elif isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "?")
        message = f"{where}: the Hub answered HTTP {status} for {source.repo_path(file)}"
    else:
        from huggingface_hub import constants

        message = (
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(err).__name__}: {first}); "
            "check the network or HF_ENDPOINT"
        )
    return ModelError(message + ("; rerun the same command to resume" if started else "; nothing was installed"))


def _downloaded_bytes(download_dir: Path) -> int:
    """Bytes already on disk for a source: finished files plus huggingface_hub's ``*.incomplete`` parts."""
    if not download_dir.exists():
        return 0
    parts = (p for p in download_dir.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".metadata")))
    return sum(p.stat().st_size for p in parts)


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _install_from_hub(source: Source, preset_dir: Path, sizes: dict[str, int], progress: bool) -> None:
    import huggingface_hub

    download_dir = preset_dir / DOWNLOADS / source.name
    fetched = {}
    with _hub_progress(progress):
        for file in source.files:
            try:
                path = huggingface_hub.hf_hub_download(
                    source.repo, file, subfolder=source.subfolder or None, revision=source.revision, local_dir=download_dir
                )
            except MemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - every hub failure becomes one line
                if isinstance(err, OSError) and getattr(err, "errno", None) == 28:  # ENOSPC
                    raise OutputError("disk full while downloading; free some space and rerun to resume",
                                      download_dir) from None
                raise _hub_error(err, source, file, started=True) from None
            path = Path(path)
            if path.stat().st_size != sizes[file]:
                got = path.stat().st_size
                path.unlink()  # or huggingface_hub would hand it back as already downloaded
                raise ModelError(f"{source.repo_path(file)} arrived with {got} bytes, the Hub announced {sizes[file]}; "
                                 "rerun to fetch it again", path)
            fetched[file] = path
    try:
        verify_files(fetched.values())
    except ModelError as err:
        shutil.rmtree(download_dir, ignore_errors=True)  # or the next run would get the same files back
        reason = str(err).removeprefix(f"{err.path}: ")
        raise ModelError(f"{err.path.name} from {source.repo}@{source.revision[:8]} is damaged ({reason}); "
                         "it was deleted: rerun to fetch it again") from None
    info = {"source": "hub", "repo": source.repo, "revision": source.revision}
    if source.convert:
        checkpoint = download_dir / source.subfolder if source.subfolder else download_dir
        try:
            _install_converted(source, preset_dir, checkpoint, {**info, "converted_from": list(source.files)}, progress)
        except Exception:
            log.error("the downloaded checkpoint is kept in %s (delete it to fetch it again)", checkpoint)
            raise
        freed = _tree_size(download_dir)
        shutil.rmtree(download_dir, ignore_errors=True)
        log.info("deleted the downloaded %s checkpoint (%s) after converting it", source.name, human_size(freed))
    else:
        _install_files(source, preset_dir, fetched, info, move=True)
        shutil.rmtree(download_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        download_dir.parent.rmdir()  # the last one leaves no empty .downloads/ behind


# ---------------------------------------------------------------------------------------------
# importing an official pretrained_models/ folder


def _import_official(
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
    _check_disk(preset_dir, need, f"importing {human_size(sum(sizes.values()))}")

    with _locked(preset_dir):
        for source in planned:
            if all(_is_installed(preset_dir, f) for f in source.produces):  # another run finished it meanwhile
                report.components.append(ComponentReport(source.name, source.produces, source.origin, "installed"))
                continue
            # The files are the user's: their revision is unknown (the release's is kept for reference).
            info = {"source": "import", "revision": None, "release": f"{source.repo}@{source.revision}",
                    "imported_from": str((from_dir / (source.official or "")).resolve())}
            log.info("importing %s from %s", source.name, _official_origin(source, from_dir))
            if source.convert:
                info["converted_from"] = source.official
                _install_converted(source, preset_dir, found[source.name], info, progress)
            else:
                _install_files(source, preset_dir, found[source.name], info, move=False)
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
        from hallo3_cli.convert import _resolve_source

        return _resolve_source(found).stat().st_size
    return sum(p.stat().st_size for p in found.values())


def _same_device(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == _existing_parent(b).stat().st_dev
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# assembling, verifying and publishing a component


def _install_files(source: Source, preset_dir: Path, files: dict[str, Path], info: dict, move: bool) -> None:
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
        write_marker(target, component=folder, **info)
        _publish(target, preset_dir / folder)


def _install_converted(source: Source, preset_dir: Path, checkpoint: Path, info: dict, progress: bool) -> None:
    """Convert the official DiT checkpoint into the diffusers folders it produces, verify, publish."""
    from hallo3_cli.convert import convert_checkpoint

    with _build(preset_dir, source) as build:
        written = convert_checkpoint(checkpoint, build, progress=progress)
        for folder in source.produces:
            if folder not in written:
                raise ModelError(f"converting the checkpoint did not produce {folder}/", checkpoint)
            verify_converted(written[folder], CONVERTED_CLASSES.get(folder))
            write_marker(written[folder], component=folder, **info)
        for folder in source.produces:
            if not _is_installed(preset_dir, folder):
                _publish(written[folder], preset_dir / folder)


@contextlib.contextmanager
def _build(preset_dir: Path, source: Source) -> Iterator[Path]:
    build = preset_dir / BUILD / source.name
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


def write_marker(folder: Path, **info) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    marker = {
        "format": MARKER_FORMAT,
        **info,
        "files": files,
        "fingerprint": _folder_fingerprint(folder),
        "installed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hallo3_cli": __version__,
    }
    with fsutil.atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2) + "\n")


def read_safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file; ModelError if it is truncated or not safetensors.

    Checks that the header parses and that the file ends exactly where the header says (cheap: the
    tensors are not read).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 1 << 28):
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"not a readable safetensors file ({err})", path) from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + length + end != size:
        raise ModelError(f"truncated or padded safetensors file: {size} bytes, expected {8 + length + end}", path)
    return {name: tuple(v["shape"]) for name, v in tensors.items()}


def verify_files(paths: Iterable[Path]) -> None:
    """Cheap integrity checks: JSON files parse, safetensors files are whole (headers only)."""
    for path in sorted(Path(p) for p in paths):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ModelError(f"unreadable JSON ({err})", path) from None
        elif path.suffix == ".safetensors":
            read_safetensors_header(path)


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
        found.update(read_safetensors_header(shard))
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


# ---------------------------------------------------------------------------------------------
# disk space and locking


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk(preset_dir: Path, need: int, what: str) -> None:
    probe = _existing_parent(preset_dir)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OutputError(
            f"not enough free disk space for the weights: {what} needs {human_size(need)}, only "
            f"{human_size(free)} free (choose another place with --dest or $HALLO3_HOME)",
            probe,
        )


@contextlib.contextmanager
def _locked(preset_dir: Path) -> Iterator[None]:
    try:
        preset_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the model folder ({err.strerror or err})", preset_dir) from None
    try:
        lock = fsutil.exclusive_lock(preset_dir / LOCK, wait=False)
        lock.__enter__()
    except BlockingIOError:
        raise ModelError("another 'hallo3 download' is installing into this folder; wait for it to finish",
                         preset_dir) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def pending_downloads(preset_dir: Path) -> dict[str, int]:
    """Bytes of unfinished downloads per source (for ``hallo3 doctor``)."""
    root = Path(preset_dir) / DOWNLOADS
    if not root.is_dir():
        return {}
    return {p.name: _downloaded_bytes(p) for p in sorted(root.iterdir()) if p.is_dir()}
