"""User-facing errors. The CLI prints them as one line and exits with their code (no traceback)."""

from __future__ import annotations

from pathlib import Path


class Hallo3Error(Exception):
    """An error the user can act on. ``str(err)`` is the one-line message shown by the CLI."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class UsageError(Hallo3Error):
    """An option value that is well formed but cannot be used here (e.g. ``--device mps`` without MPS)."""

    exit_code = 2


class NonFiniteError(Hallo3Error):
    """Computation produced NaN or infinity (e.g. the sampler's latents): nothing is written from it.

    ``NonFiniteError.at(clip=3, step=17)`` gives the message naming where it happened.
    """

    exit_code = 1

    @classmethod
    def at(cls, *, clip: int | None = None, step: int | None = None, what: str = "latents", path=None) -> "NonFiniteError":
        where = ", ".join(f"{name} {value}" for name, value in (("clip", clip), ("step", step)) if value is not None)
        return cls(f"the {what} became non-finite (NaN or infinity){' at ' + where if where else ''}; "
                   "nothing was written from them (try --dtype float32, a smaller --cfg, or check the input files)", path)


class InputError(Hallo3Error):
    """An input file (media or stage file) is missing, unreadable or unsuitable."""

    exit_code = 3


class StageFileError(InputError):
    """A stage file has the wrong format, version, model, shapes or dtypes, or is corrupt."""


class OutputError(Hallo3Error):
    """An output path cannot be written."""

    exit_code = 4


class ModelError(Hallo3Error):
    """Model weights are missing, incomplete or inconsistent."""

    exit_code = 5



def reason(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line error quotes
    from a library's exception. OS and FFmpeg errors give their ``strerror`` (without errno and path: the
    message names the file itself)."""
    text = str(getattr(err, "strerror", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ArgumentError(UsageError, ValueError):
    """A Python API argument that cannot be used (``ValueError``, naming the argument); a usage error (exit 2)
    when it reaches the CLI."""
