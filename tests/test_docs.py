"""The documentation stays inside the repository and points at things that exist.

- every relative Markdown link in README.md and docs/*.md leads to a file of the
  repository, and its ``#anchor`` to a heading of that file;
- no file of the repository cites a document kept outside it (the design, style and
  performance notes the project started from);
- every ``docs/<name>.md`` that a file names exists, and so does a section it cites
  (``docs/sds.md, "Crash safety"``); every invariant cited as
  ``docs/design.md, invariant N`` is one that docs/design.md states; every test that a
  document names as ``tests/test_x.py::test_y`` is defined there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Directories that hold no file of the repository (see .gitignore).
NOT_OURS = {
    ".git",  # (in a worktree, a file naming the repository: skipped too)
    ".venv",
    "run",
    "artifacts",
    "build",
    "dist",
    ".build",
    ".ansible",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    ".schemathesis",
}
TEXT_SUFFIXES = {
    ".py", ".md", ".toml", ".yml", ".yaml", ".j2", ".cfg", ".ini", ".txt", ".sh",
    ".service", ".json", ".rules", ".tmpl", ".html", ".css", ".js", ".mako", "",
}  # fmt: skip

# Spelled in pieces so that this file does not match itself.
OUTSIDE_CITATIONS = (
    "DESIGN" + ".md",
    "PERFORMANCE" + "-NOTES",
    "STYLE" + ".md",
    "../" + "shared/",
    "/work" + "/",
)

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INVARIANT_HEADING = re.compile(r"^#{2,6}\s+Invariant (\d+)\b")
INVARIANT_CITATION = re.compile(
    r"docs/design\.md[,:]?\s+(?:#\s*)?invariants?\s+(\d+(?:(?:,\s*|\s+and\s+)\d+)*)"
)
DOC_PATH = re.compile(r"(?<![\w/.-])docs/([\w-]+)\.md\b")
# docs/sds.md, "Crash safety" / [sds.md](sds.md), "Crash safety" / docs/performance.md, *Data path*
SECTION_CITATION = re.compile(
    r"(?:(?<![\w/.-])docs/|\]\()([\w-]+)\.md\)?,?\s+(?:\"([^\"]{1,80})\"|\*([^*]{1,80})\*)"
)
TEST_CITATION = re.compile(r"(tests/test_\w+\.py)::(\w+)")


def repository_files() -> Iterator[Path]:
    """Every text file under the repository's root, outside generated directories."""
    stack = [ROOT]
    while stack:
        for path in sorted(stack.pop().iterdir()):
            if path.is_dir():
                if path.name not in NOT_OURS and not path.name.endswith(".egg-info"):
                    stack.append(path)
            elif path.suffix in TEXT_SUFFIXES and path.name != ".git" and path.is_file():
                yield path


def prose_lines(path: Path, keep_code_spans: bool = False) -> Iterator[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, code spans removed."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line if keep_code_spans else CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation
    removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def names_a_section(cited: str, heading: str) -> bool:
    """A citation names a heading by its text or by its first words ("Copies" for
    "Copies: resync, rebuild and rebalance moves")."""
    cited, heading = " ".join(cited.split()).lower(), heading.lower()
    return heading == cited or (heading.startswith(cited) and not heading[len(cited)].isalnum())


def headings(path: Path) -> list[str]:
    """The headings of a Markdown file as plain text (outside fenced code blocks)."""
    result = []
    for _, line in prose_lines(path, keep_code_spans=True):
        if m := HEADING.match(line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2)).replace("`", "")
            result.append(" ".join(text.split()))
    return result


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not dest.is_relative_to(root) or not dest.exists():
                problems.append(f"{where}: no such file in the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_of_the_docs_resolves() -> None:
    problems = [p for doc in DOCS for p in broken_links(doc)]
    assert problems == []


def test_the_link_checker_finds_broken_links_and_anchors(tmp_path: Path) -> None:
    assert slug("Health and metrics (`[control]`, default 127.0.0.1:7074)") == (
        "health-and-metrics-control-default-1270017074"
    )
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "b.md").write_text("# B\n## Two words: `x`\n## Two words: `x`\n")
    doc = tmp_path / "guide" / "a.md"
    doc.write_text(
        "# A\n[ok](b.md#two-words-x-1) [ok](#a) [web](https://example.org/x.md)\n"
        "[gone](c.md) [bad anchor](b.md#three) [out](../../etc/passwd)\n"
        "```\n[in code](nowhere.md)\n```\n`[in a span](nowhere.md)`\n"
    )
    assert broken_links(doc, tmp_path) == [
        "guide/a.md:3: c.md: no such file in the repository",
        "guide/a.md:3: b.md#three: no heading with anchor #three",
        "guide/a.md:3: ../../etc/passwd: no such file in the repository",
    ]


def test_no_file_cites_a_document_outside_the_repository() -> None:
    problems = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in OUTSIDE_CITATIONS:
            for m in re.finditer(re.escape(needle), text):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{path.relative_to(ROOT)}:{line}: cites {needle!r}")
    assert problems == []


def test_every_cited_doc_and_invariant_exists() -> None:
    design = ROOT / "docs" / "design.md"
    assert design.exists()
    stated = [
        int(m.group(1)) for _, line in prose_lines(design) if (m := INVARIANT_HEADING.match(line))
    ]
    assert stated == list(range(1, len(stated) + 1)), "invariants are numbered 1, 2, ... in order"
    problems = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(ROOT)
        for m in DOC_PATH.finditer(text):
            if not (ROOT / "docs" / f"{m.group(1)}.md").exists():
                problems.append(f"{where}: names docs/{m.group(1)}.md, which does not exist")
        for m in INVARIANT_CITATION.finditer(text):
            for number in map(int, re.findall(r"\d+", m.group(1))):
                if number not in stated:
                    problems.append(f"{where}: cites invariant {number}, not in docs/design.md")
    assert problems == []


def test_every_cited_section_exists() -> None:
    problems = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in SECTION_CITATION.finditer(text):
            doc, cited = ROOT / "docs" / f"{m.group(1)}.md", m.group(2) or m.group(3)
            if doc.exists() and not any(names_a_section(cited, h) for h in headings(doc)):
                where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
                problems.append(f"{where}: docs/{m.group(1)}.md has no section {cited!r}")
    assert problems == []


def test_every_test_a_document_names_is_defined() -> None:
    problems = []
    for doc in DOCS:
        for module, name in TEST_CITATION.findall(doc.read_text(encoding="utf-8")):
            source = ROOT / module
            definition = re.compile(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", re.M)
            if not (source.exists() and definition.search(source.read_text(encoding="utf-8"))):
                problems.append(f"{doc.relative_to(ROOT)}: {module}::{name} is not defined")
    assert problems == []
