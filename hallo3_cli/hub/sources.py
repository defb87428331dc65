"""What a release preset is made of: one download source per ``[<preset>.components]`` entry of ``models.toml``
(where its files come from, which folders they become, where an official ``pretrained_models/`` folder has them)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hallo3_cli.errors import InputError
from hallo3_cli.presets import Preset


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


def select(preset: Preset, names: Iterable[str] | None) -> list[Source]:
    all_sources = sources(preset)
    if names is None:
        return all_sources
    names = set(names)
    known = {s.name for s in all_sources} | {f for s in all_sources for f in s.produces}
    unknown = sorted(names - known)
    if unknown:
        raise InputError(f"unknown component {unknown[0]!r} of preset {preset.name!r}; known: {', '.join(sorted(known))}")
    return [s for s in all_sources if s.name in names or names & set(s.produces)]
