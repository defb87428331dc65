"""The package version (one place: ``pyproject.toml`` reads it, the root package re-exports it)."""

__version__ = "0.1.0"
