"""Every reference to the documentation resolves, and nothing cites notes a reader does not have.

Scans every file of the repository (tracked or new, not ignored) for ``docs/<file>.md`` and
``docs/<file>.md#anchor`` references (and relative links inside docs/), and checks that the file exists
and has a heading with that anchor (GitHub's rule: lower case, punctuation dropped, spaces to hyphens).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_REF = re.compile(r"docs/([\w./-]+?\.md)(#[\w-]+)?")
MD_LINK = re.compile(r"\]\(([\w./-]+?\.md)(#[\w-]+)?\)")
# developer notes outside the repository, in any of the forms they were cited
# (a call such as ``resume_identity(spec)`` is code, not a citation: the word before it is a name)
EXTERNAL_NOTES = re.compile(r"\bspec/|\bspec §|(?<![\w.])\(spec\)|\b(?:hrvit|ablations|baselines|tooling)" + r"\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".csv", ".txt", ".cfg", ".ini", ".tex", ""}


def repo_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    paths = [ROOT / p for p in out if p]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES and p.name != Path(__file__).name]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def references() -> list[tuple[Path, int, Path, str | None]]:
    """(citing file, line, cited doc, anchor or None) for every docs reference in the repository."""
    refs = []
    for path in repo_files():
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            for match in DOC_REF.finditer(line):
                refs.append((path, number, ROOT / "docs" / match.group(1), match.group(2)))
            if path.parent == ROOT / "docs":
                for match in MD_LINK.finditer(line):
                    refs.append((path, number, path.parent / match.group(1), match.group(2)))
    return refs


def test_the_docs_exist_and_are_cited():
    refs = references()
    cited = {doc.resolve() for _, _, doc, _ in refs}
    for name in ("statuses.md", "flop-convention.md", "table5-readings.md", "hrnet-vit-fit.md", "recipes.md", "departures.md"):
        assert (ROOT / "docs" / name).resolve() in cited, f"docs/{name} is cited nowhere"
    assert len(refs) > 10


def test_every_cited_doc_and_anchor_exists():
    broken = []
    for source, number, doc, anchor in references():
        where = f"{source.relative_to(ROOT)}:{number}"
        if not doc.is_file():
            broken.append(f"{where}: {doc.relative_to(ROOT)} does not exist")
        elif anchor and anchor[1:] not in anchors(doc):
            broken.append(f"{where}: {doc.relative_to(ROOT)} has no heading for {anchor} (has {sorted(anchors(doc))})")
    assert not broken, "\n".join(broken)


def test_no_citation_of_notes_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in repo_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if EXTERNAL_NOTES.search(line)]
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("heading, expected", [
    ("## What mmcv 1.x counts", "what-mmcv-1x-counts"),
    ("## K1 (key-value sharing)", "k1-key-value-sharing"),
    ("## HRViT-b3 windows 1-2-9-9 on Cityscapes", "hrvit-b3-windows-1-2-9-9-on-cityscapes"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading.lstrip("#")) == expected
