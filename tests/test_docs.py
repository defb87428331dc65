"""docs/ ships the model's description: every section the code cites exists, nothing cites the specification that
lives outside the repository, docs/README.md lists every page, and docs/model.md restates the specification in
the project's own words rather than copying it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, SHARED

DOCS = REPO / "docs"
MODEL = DOCS / "model.md"
#: Where the code and its tests cite the model description. No other numbered document is cited there, so
#: every section sign in these trees is a docs/model.md cite (continuations like "§2, §9" included).
CITING_TREES = ("hallo3_cli", "tests", "bench")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".json", ".yaml", ".cfg"}

SECTION = r"\d+[a-z]?(?:\.\d+)*"
HEADING = re.compile(rf"^#{{2,4}} ({SECTION})\.? ", re.MULTILINE)
#: §N, a range §N–M, or §N with numbered steps ("§5 steps 2–4" = §5.2 … §5.4).
CITE = re.compile(rf"§({SECTION})(?:\s*[–-]\s*({SECTION}))?(?:\s+steps?\s+(\d+)(?:\s*[–-]\s*(\d+))?)?")
#: A cite in prose that may also cite other things (the README, docs/): only those that name model.md.
NAMED_CITE = re.compile(rf"model\.md\s+(§{SECTION}(?:\s*[–-]\s*{SECTION})?(?:\s+steps?\s+\d+(?:\s*[–-]\s*\d+)?)?)")
SPEC_CITE = re.compile(r"\bSPEC(?:\.md|\s+§)")


def headings() -> list[str]:
    return HEADING.findall(MODEL.read_text(encoding="utf-8"))


def cited_sections(text: str, pattern: re.Pattern = CITE) -> set[str]:
    """The section numbers a text cites (a range: both ends; steps: each step's subsection)."""
    found = set()
    for cite in pattern.findall(text):
        match = CITE.match(cite) if isinstance(cite, str) else None
        section, end, first_step, last_step = match.groups() if match else cite
        found.add(section)
        if end:
            found.add(end)
        if first_step:
            found.update(f"{section}.{step}" for step in range(int(first_step), int(last_step or first_step) + 1))
    return found


def text_files(*roots: Path):
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_headings_are_numbered_once():
    numbers = headings()
    assert {"1", "2", "2.3", "5.6", "6", "7.5", "8", "8b", "8b.10", "9", "10", "10.9"} <= set(numbers)
    assert [n for n, count in Counter(numbers).items() if count > 1] == []


def test_cited_sections_exist():
    """Every section the package, its tests and benchmarks, the README and docs/ cite is a heading of model.md."""
    available = set(headings())
    missing = {}
    for path in text_files(*(REPO / tree for tree in CITING_TREES)):
        for section in cited_sections(path.read_text(encoding="utf-8")) - available:
            missing.setdefault(section, []).append(str(path.relative_to(REPO)))
    for path in text_files(REPO / "README.md", DOCS):
        text = path.read_text(encoding="utf-8")
        sections = cited_sections(text) if path == MODEL else cited_sections(text, NAMED_CITE)
        for section in sections - available:
            missing.setdefault(section, []).append(str(path.relative_to(REPO)))
    assert missing == {}


def test_cite_parsing():
    """The parser itself: ranges, continuations and steps are all checked, not only the first number."""
    text = "(docs/model.md §2.3–2.4, §8b.7) ... (docs/model.md §5 steps 2–4) ... §10.3. ... model.md §7.1."
    assert cited_sections(text) == {"2.3", "2.4", "8b.7", "5", "5.2", "5.3", "5.4", "10.3", "7.1"}
    assert cited_sections(text, NAMED_CITE) == {"2.3", "2.4", "5", "5.2", "5.3", "5.4", "7.1"}


def test_nothing_cites_the_external_specification():
    """The specification beside the repository is not shipped: the package, tests and benchmarks cite docs/model.md."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in text_files(*(REPO / tree for tree in CITING_TREES), REPO / "models.toml")
        if path != Path(__file__).resolve()  # this file names the specification to compare model.md with it
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if SPEC_CITE.search(line)
    ]
    assert offenders == []


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    unlisted = [path.name for path in sorted(DOCS.iterdir()) if path.name != "README.md" and path.name not in index]
    assert unlisted == []


def _prose_words(text: str) -> list[str]:
    """Words of running text; code spans, paths, file:line citations and numbers become breaks ("|")."""
    text = re.sub(r"`[^`]*`", " | ", text)
    words = []
    for token in text.split():
        if re.search(r"[/\d:]|\.py", token):
            words.append("|")
        else:
            words.append(re.sub(r"[^a-z'-]", "", token.lower()) or "|")
    return words


def _runs(words: list[str], length: int) -> set[tuple[str, ...]]:
    return {run for i in range(len(words) - length + 1) if "|" not in (run := tuple(words[i : i + length]))}


def test_model_description_is_not_a_copy_of_the_specification():
    """No run of 10 words of prose is shared with the specification it restates (identifiers, formulas and the
    official code's file:line citations are facts and may coincide)."""
    spec = SHARED / "SPEC.md"
    if not spec.is_file():
        pytest.skip(f"{spec} is not available (set HALLO3_SHARED)")
    ours, theirs = (_runs(_prose_words(path.read_text(encoding="utf-8")), 10) for path in (MODEL, spec))
    assert sorted(" ".join(run) for run in ours & theirs) == []
