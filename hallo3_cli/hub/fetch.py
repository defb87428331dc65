"""Fetching a preset's sources from the Hugging Face Hub (through huggingface_hub only, which honours ``HF_TOKEN``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT``): exact sizes first,
resumable downloads into ``.downloads/``, every failure one line."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from hallo3_cli import store
from hallo3_cli.errors import ModelError, OutputError, reason
from hallo3_cli.formatting import human_size
from hallo3_cli.hub.install import check_disk, install_converted, install_files, locked
from hallo3_cli.hub.report import ComponentReport, DownloadReport
from hallo3_cli.hub.sources import Source
from hallo3_cli.hub.verify import verify_files
from hallo3_cli.presets import Preset

log = logging.getLogger("hallo3")


def offline() -> bool:
    import huggingface_hub.constants as constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def fetch(
    preset: Preset, preset_dir: Path, pending: list[Source], report: DownloadReport, progress: bool
) -> DownloadReport:
    planned = sorted(pending, key=lambda s: s.size)  # small first: quick feedback, the DiT last
    if report.dry_run:
        for source in planned:
            already = _downloaded_bytes(preset_dir / store.DOWNLOADS / source.name)
            note = "resumes a partial download" if already else ""
            report.components.append(
                ComponentReport(source.name, source.produces, source.origin, "fetch", max(source.size - already, 0), note)
            )
        report.peak_extra = sum(s.installed_size for s in planned if s.convert)
        return report

    sizes = {source.name: _remote_sizes(source, preset_dir / store.DOWNLOADS / source.name) for source in planned}
    remaining = sum(
        max(sum(sizes[s.name].values()) - _downloaded_bytes(preset_dir / store.DOWNLOADS / s.name), 0) for s in planned
    )
    converted = sum(s.installed_size for s in planned if s.convert)
    check_disk(preset_dir, remaining + converted, f"{human_size(remaining)} to download"
                + (f" + {human_size(converted)} while converting the DiT" if converted else ""))

    with locked(preset_dir):
        for source in planned:
            if all(store.is_installed(preset_dir, f) for f in source.produces):  # another run finished it meanwhile
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

    if offline():
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
    first = reason(err)
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

    download_dir = preset_dir / store.DOWNLOADS / source.name
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
            install_converted(source, preset_dir, checkpoint, {**info, "converted_from": list(source.files)}, progress)
        except Exception:
            log.error("the downloaded checkpoint is kept in %s (delete it to fetch it again)", checkpoint)
            raise
        freed = store.tree_size(download_dir)
        shutil.rmtree(download_dir, ignore_errors=True)
        log.info("deleted the downloaded %s checkpoint (%s) after converting it", source.name, human_size(freed))
    else:
        install_files(source, preset_dir, fetched, info, move=True)
        shutil.rmtree(download_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        download_dir.parent.rmdir()  # the last one leaves no empty .downloads/ behind


def pending_downloads(preset_dir: Path) -> dict[str, int]:
    """Bytes of unfinished downloads per source (for ``hallo3 doctor``)."""
    root = Path(preset_dir) / store.DOWNLOADS
    if not root.is_dir():
        return {}
    return {p.name: _downloaded_bytes(p) for p in sorted(root.iterdir()) if p.is_dir()}
