"""Filesystem helpers: atomic writes, output checks and content hashes.

Every command validates its outputs with :func:`check_outputs` before any work starts, and writes
each of them through :func:`atomic_path`, so an output is either the complete new file or untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from hallo3_cli.errors import InputError, OutputError

#: What each kind of output must be named (see :func:`check_outputs`).
VIDEO_SUFFIXES = (".mp4",)
STAGE_SUFFIXES = (".safetensors",)
PREVIEW_SUFFIXES = (".png",)

NAME_MAX = 255
"""Longest file name (in bytes) of common file systems (ext4, xfs, btrfs, APFS, NTFS)."""
STALE_SECONDS = 24 * 3600
"""A temporary file of our pattern from another machine is stale after this long without change."""


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a Path if it is an existing readable regular file, else raise InputError.

    The one check every input goes through before anything opens it: a fifo, socket or device (``<(...)``,
    ``/dev/stdin``, ``/dev/zero``) is refused here, by its kind, so that no reader blocks forever on it or
    reads without end; symlinks are followed (a link to a regular file is that file).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputError("no such file", path) from None
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES on a folder above...
        raise InputError(f"cannot open ({err.strerror or err})", path) from None
    except ValueError:  # a NUL byte in the name (Python API)
        raise InputError("no such file (the name holds a NUL character)", repr(str(path))) from None
    if stat.S_ISDIR(mode):
        raise InputError("is a directory, expected a file", path)
    if not stat.S_ISREG(mode):
        raise InputError(f"is {_file_kind(mode)}, not a regular file; give a file (save the stream to a file first)", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable", path)
    return path


def path_argument(value, name: str, *, optional: bool = False) -> Path | None:
    """A file or folder path given to the Python API, as a Path: ``str``, ``bytes`` or ``os.PathLike``
    (``None`` only when ``optional``). Anything else raises ``TypeError``, an empty path
    :class:`~hallo3_cli.errors.ArgumentError` (a ``ValueError``), each naming the argument ``name``."""
    from hallo3_cli.errors import ArgumentError

    if value is None:
        if optional:
            return None
        raise ArgumentError(f"{name} is required (a file path), got None")
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(value).__name__}")
    path = Path(value)
    if not str(value).strip():
        raise ArgumentError(f"{name} is an empty path")
    return path


def name_max(folder: str | Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` allows (:data:`NAME_MAX` if it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return NAME_MAX


def check_name(path: str | Path, folder: str | Path | None = None) -> Path:
    """Refuse (OutputError, exit 4) a path this program would create but could not: a name longer than
    its file system allows (``folder``: an existing folder on that file system, default the parent) or a
    path that is not valid UTF-8 (it is printed, logged and handed to libraries as text)."""
    path = _check_text(path)
    size = len(path.name.encode("utf-8"))
    limit = name_max(folder if folder is not None else (path.parent if str(path.parent) else "."))
    if size > limit:
        raise OutputError(f"the name is {size} bytes long, more than the {limit} its file system allows; "
                          "choose a shorter name", path)
    return path


def _check_text(path: str | Path) -> Path:
    path = Path(path)
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace") if _fs_encodable(text) else ascii(text)
        raise OutputError("the path is not valid UTF-8 text; use a name in UTF-8", shown) from None
    if "\0" in text:
        raise OutputError("the name holds a NUL character", ascii(text))
    return path


def side_path(path: str | Path, prefix: str = "", suffix: str = "") -> Path:
    """``prefix + name + suffix`` beside ``path`` (a lock file, a ``.parts`` folder), the name part shortened
    with a digest when the whole would exceed :data:`NAME_MAX` bytes, so that a long output name never makes
    its side paths impossible. Deterministic: every process derives the same name."""
    path = Path(path)
    name = path.name
    room = NAME_MAX - len(prefix.encode()) - len(suffix.encode())
    if len(name.encode("utf-8", "surrogateescape")) > room:
        name = _shorten(name, room)
    return path.with_name(f"{prefix}{name}{suffix}")


def _shorten(name: str, room: int) -> str:
    """``name`` cut to ``room`` bytes: its head, ``~`` and 12 hex of its sha256."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    head = name.encode("utf-8", "surrogateescape")[: room - 13].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def _fs_encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def check_output_path(path: str | Path, suffixes: Sequence[str] | None = None) -> Path:
    """Fail early (before any expensive work) if ``path`` cannot be written atomically.

    The folder must exist and be writable; ``path`` must be absent or a regular file (a device,
    fifo, socket or folder would be replaced by a regular file by the atomic rename); with
    ``suffixes``, its extension must be one of them (case-insensitive).
    """
    path = check_name(path, folder=None)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {str(parent)!r} does not exist", path)
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable", path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None  # absent, or a dangling symlink (the rename replaces the link, never its target)
    except OSError as err:
        raise OutputError(f"cannot inspect the existing file ({err.strerror or err})", path) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError("is a directory, expected a file path", path)
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"exists and is not a regular file ({_file_kind(mode)}); refusing to replace it", path)
    if suffixes is not None and path.suffix.lower() not in tuple(s.lower() for s in suffixes):
        expected = " or ".join(suffixes)
        got = f"{path.suffix!r}" if path.suffix else "no extension"
        raise OutputError(f"has {got}, but what is written here is a {expected} file; name it *{suffixes[0]}", path)
    return path


def check_outputs(
    outputs: Mapping[str | Path, Sequence[str] | None] | Iterable[tuple[str | Path | None, Sequence[str] | None]],
    inputs: Iterable[str | Path | None] = (),
) -> list[Path]:
    """Validate all outputs of one command against each other and against its inputs; the one
    entry point every command calls before any work.

    ``outputs`` holds ``(path, extensions)`` pairs (or a mapping path → extensions), the extensions
    being what the file may be named (e.g. :data:`VIDEO_SUFFIXES`; ``None`` = any); pairs whose path
    is ``None`` (an option not given) are skipped. ``inputs`` are the files the command reads
    (``None`` entries are skipped).
    Each output goes through :func:`check_output_path`, then is refused if it resolves (``..``,
    symlinks of the file or of any folder above it, or the same inode through a hard link) to one of
    the inputs or to another output. Raises :class:`OutputError` (exit 4) with one line; returns
    the outputs as Paths, in order.
    """
    checked: list[Path] = []
    real_inputs = [(Path(p), os.path.realpath(p)) for p in inputs if p is not None]
    seen: list[tuple[Path, str]] = []
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    for raw, suffixes in pairs:
        if raw is None:
            continue
        path = check_output_path(raw, suffixes)
        real = os.path.realpath(path)
        for other, other_real in real_inputs:
            if real == other_real or _same_file(path, other):
                raise OutputError(f"is also an input of this command ({other}); refusing to overwrite it", path)
        for other, other_real in seen:
            if real == other_real or _same_file(path, other):
                raise OutputError(f"is the same file as another output of this command ({other})", path)
        seen.append((path, real))
        checked.append(path)
    return checked


def check_output_folder(folder: str | Path, *, outputs: Iterable[str | Path | None] = (),
                        inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early if ``folder`` could not be created or written, without creating anything.

    For checks before any work (a cache, an ``--out-dir``, a ``.parts`` folder); :func:`ensure_output_folder`
    creates it when it is needed. Every folder still to be created must have a name its file system takes
    (:func:`check_name`); an existing entry on the way must be a folder. ``outputs``: files the command
    writes, which the folder may not be nor lie inside (creating it would take their place); ``inputs``:
    files it reads, which the folder may not be. Raises :class:`OutputError` (exit 4), one line.
    """
    folder = _check_text(folder)
    probe = folder
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create the folder: {str(probe)!r} is not a folder", folder)
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder is not writable" if probe == folder else f"cannot create the folder: {str(probe)!r} is not writable"
        raise OutputError(what, folder)
    limit = name_max(probe)
    for part in folder.relative_to(probe).parts if probe != folder and folder.is_relative_to(probe) else ():
        if len(part.encode("utf-8")) > limit:
            raise OutputError(f"cannot create the folder: the name {part[:40]!r}... is {len(part.encode())} bytes, more "
                              f"than the {limit} its file system allows", folder)
    real = os.path.realpath(folder)
    for other in (p for p in outputs if p is not None):
        other_real = os.path.realpath(other)
        if real == other_real or real.startswith(other_real.rstrip(os.sep) + os.sep):
            raise OutputError(f"is (or lies inside) {other}, an output of this command: a folder there would take "
                              "its place; choose another folder", folder)
    for other in (p for p in inputs if p is not None):
        if real == os.path.realpath(other):
            raise OutputError(f"is {other}, an input of this command; choose another folder", folder)
    return folder


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

    The temporary file is named ``.<name>.<host>-<pid>.<random>.tmp<suffix>`` (``<name>`` shortened
    with a digest when the whole would exceed :data:`NAME_MAX` bytes) and keeps the suffix of
    ``path``, so that tools choosing a format by extension (PyAV, safetensors) behave the same. On
    any exception it is removed; the temporaries of this output left by a killed process are removed
    by the next write of the same output (see :func:`remove_stale_temporaries`).
    """
    path = check_output_path(path)
    remove_stale_temporaries(path)
    prefix, suffix = _temp_affixes(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write here ({err.strerror or err})", path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _sync(tmp_path)  # a full disk shows here at the latest (delayed allocation), before the rename
        os.chmod(tmp_path, 0o644 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        full = disk_full(err)
        if full:
            raise OutputError(f"cannot write: {full}; nothing was written (free some space and rerun)", path) from None
        raise


#: errno values that mean "the device cannot take more data", whatever library met them
_FULL_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the file system or the process's limit"}
#: how libraries that do not raise OSError (safetensors' Rust core, FFmpeg) word the same conditions
_FULL_WORDS = (("No space left on device", errno.ENOSPC), ("StorageFull", errno.ENOSPC),
               ("Disk quota exceeded", errno.EDQUOT), ("QuotaExceeded", errno.EDQUOT),
               ("File too large", errno.EFBIG), ("FileTooLarge", errno.EFBIG))


def disk_full(err: BaseException) -> str | None:
    """What ran out when ``err`` (from any writer: Python, safetensors, PyAV, through ``__cause__`` chains)
    means the disk or quota is full, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[err.errno]
        text = str(err)
        for words, code in _FULL_WORDS:
            if words in text:
                return _FULL_ERRNOS[code]
        err = err.__cause__ or err.__context__
    return None


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):  # file systems without fsync
            raise
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the leftover temporaries of :func:`atomic_path` for ``path``; returns what was removed.

    Only files of exactly our pattern for this very output name are considered. One is stale when
    its writer, named in it by host and process id, was on this machine and no longer runs, or, if
    written from another machine (shared folder), when it is older than :data:`STALE_SECONDS`.
    A live writer's file is never touched.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    pattern = re.compile(re.escape(prefix[: -len(_writer_tag()) - 1]) + r"([0-9a-f]{4})-(\d+)\.[a-z0-9_]{8}" + re.escape(suffix))
    removed = []
    try:
        entries = list(os.scandir(path.parent if str(path.parent) else "."))
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        if match.group(1) == host:
            if _pid_alive(int(match.group(2))):
                continue
        else:
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_SECONDS:
                    continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _temp_affixes(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporaries of ``path``; mkstemp adds 8 random characters between."""
    tag = _writer_tag()
    suffix = ".tmp" + (path.suffix if len(path.suffix.encode()) <= 32 else "")
    # room for the name part, reserving the longest tag (4 hex + "-" + a 10-digit pid) so that every
    # process shortens a long name identically (stale files of other pids still match the pattern)
    room = NAME_MAX - len("...") - 15 - 8 - len(suffix.encode())
    name = path.name
    if len(name.encode("utf-8", "surrogateescape")) > room:
        name = _shorten(name, room)
    return f".{name}.{tag}.", suffix


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]


def _writer_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


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


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = True) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on the file ``path``, created if missing and deleted when the
    holder is done. A waiter that wakes up holding a deleted file (its inode is no longer the one at
    ``path``) starts over, so no two processes ever hold it; a file left by a killed process is harmless
    (the kernel released its lock). ``wait=False``: raise ``BlockingIOError`` if another process holds it.
    """
    import fcntl

    path = Path(path)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as err:
            why = disk_full(err) or err.strerror or str(err)
            raise OutputError(f"cannot create the lock file ({why})", path) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            raise
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding the lock: see above
        handle.close()
