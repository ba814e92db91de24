"""The README and docs/ hold together: every relative link and image in README.md and docs/*.md names a file
of the checkout, every `#anchor` into a markdown file names one of its headings (GitHub's slugs), and every
docs/ page is one click from the README. External (http, https, mailto) links are not fetched."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
# The destination of every inline link or image, nested ones included: `[text](dest "title")`, `![alt](<dest>)`.
INLINE = re.compile(r"\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*(<[^>\n]*>|\S+)", re.M)
HTML = re.compile(r"\b(?:src|href)=[\"']([^\"']+)[\"']")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def blank(match: re.Match) -> str:
    """The matched text with every character but newlines turned into a space (keeps line numbers)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def without_code(text: str) -> str:
    """Markdown with fenced blocks and code spans blanked out: a link written inside code is no link."""
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation other than `-` and `_`
    dropped, each space a hyphen ("Evaluation with DINO / CLIP" -> "evaluation-with-dino--clip")."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)  # an image renders no text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub(blank, page.read_text(encoding="utf-8"))):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_targets(page: Path) -> list[tuple[int, str]]:
    """(line number, destination) of every link and image of a markdown page, code left out."""
    text = without_code(page.read_text(encoding="utf-8"))
    found = []
    for pattern in (INLINE, REFERENCE, HTML):
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start(1)) + 1, match.group(1).strip("<>")))
    return sorted(found)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of `page` that names no file under `root`, or no heading of it."""
    problems = []
    for line, dest in link_targets(page):
        if SCHEME.match(dest):  # http(s), mailto: not fetched
            continue
        path, _, anchor = dest.partition("#")
        path = unquote(path.split("?")[0])
        target = (root / path.lstrip("/")) if path.startswith("/") else (page.parent / path) if path else page
        target = target.resolve()
        where = f"{page.relative_to(root)}:{line}: {dest}"
        if not target.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not target.exists():
            problems.append(f"{where} (no such file: {target.relative_to(root.resolve())})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{where} (no heading with anchor #{anchor} in {target.relative_to(root.resolve())})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / dest.partition("#")[0]).resolve() for _, dest in link_targets(ROOT / "README.md")
              if not SCHEME.match(dest)}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []


@pytest.mark.parametrize("heading, anchor", [
    # what GitHub renders for these headings (its id attributes)
    ("Set-up: two commands", "set-up-two-commands"),
    ("The main job: `make demo`", "the-main-job-make-demo"),
    ("Evaluation with DINO / CLIP (the paper's protocol)", "evaluation-with-dino--clip-the-papers-protocol"),
    ("Compiled step: inductor vs eager on the CPU (`compile_check.py`)",
     "compiled-step-inductor-vs-eager-on-the-cpu-compile_checkpy"),
    ("Measured: one H200, beside diffusers' scripts", "measured-one-h200-beside-diffusers-scripts"),
    ("See [the docs](docs/x.md) **now**", "see-the-docs-now"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n"
        "[ok](docs/other.md#twice-1) ![ok](pic.png) [ok](#top) [ok](https://example.com/missing.md)\n"
        "[![badge](pic.png)](docs/other.md) [ok](<docs/other.md> \"title\") [ok](docs/%6Fther.md)\n"
        "`[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/gone.md) ![gone](images/gone.png)\n"
        "[bad anchor](docs/other.md#twice-2) [bad anchor](#nowhere)\n"
        "[up](../outside.md)\n"
        "[ref]: docs/gone_too.md\n"
        '<img src="pic2.png">\n'
    )
    assert broken_links(page, root=tmp_path) == [
        "README.md:8: docs/gone.md (no such file: docs/gone.md)",
        "README.md:8: images/gone.png (no such file: images/gone.png)",
        "README.md:9: #nowhere (no heading with anchor #nowhere in README.md)",
        "README.md:9: docs/other.md#twice-2 (no heading with anchor #twice-2 in docs/other.md)",
        "README.md:10: ../outside.md (outside the repository)",
        "README.md:11: docs/gone_too.md (no such file: docs/gone_too.md)",
        "README.md:12: pic2.png (no such file: pic2.png)",
    ]
