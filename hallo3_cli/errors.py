"""User-facing errors. The CLI prints them as one line and exits with their code (no traceback)."""

from __future__ import annotations

from pathlib import Path


class Hallo3Error(Exception):
    """An error the user can act on. ``str(err)`` is the one-line message shown by the CLI."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


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


class UsageError(Hallo3Error):
    """An invalid option value or combination (the CLI's usage errors)."""

    exit_code = 2


class NonFiniteError(Hallo3Error):
    """A computation produced NaN or infinite values (nothing is written from them)."""
