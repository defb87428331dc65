"""What ``hallo3 download`` did or would do: one row per source, the totals, one summary line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hallo3_cli.formatting import human_size


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
