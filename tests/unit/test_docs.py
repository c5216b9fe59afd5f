"""The README and docs/ point inside the repository only, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SOURCES = [
    path
    for folder in ("domain", "persistence", "workers", "migrations", "bench", "tests")
    for path in sorted((ROOT / folder).rglob("*.py"))
]


def test_the_documents_exist() -> None:
    names = {path.name for path in DOCUMENTS}
    assert {"README.md", "protocol.md", "operations.md", "design.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    text = document.read_text()
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (document.parent / target.partition("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert broken == []
    assert "../shared" not in text


def test_no_source_cites_a_contract_outside_the_repository() -> None:
    citing = [
        str(path.relative_to(ROOT))
        for path in SOURCES
        if re.search(r"SPEC §|SPEC\.md|\.\./shared", path.read_text())
        and path.name != "test_docs.py"
    ]
    assert citing == []


def test_the_readme_stays_a_front_door() -> None:
    """What it is, the two commands, running, configuration, where to read more, the
    latest bench table: the long stories live in docs/."""
    text = (ROOT / "README.md").read_text()
    for heading in ("## Quickstart", "## Configuration", "## Where to read more"):
        assert heading in text
    assert "make demo" in text and "make test" in text
    assert len(text) < 15_000
