"""Every relative link in README.md, CHANGELOG.md and docs/*.md names an existing file, and a
``#anchor`` names a heading of its target (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

#: ``[text](target)`` and ``![alt](target)``; the target ends at the first space or ``)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of the Markdown headings in ``text``: lower case, punctuation other than ``-`` and
    ``_`` dropped, spaces to ``-``; a repeated id gets ``-1``, ``-2``, ..."""
    ids: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def relative_links(doc: Path) -> list[str]:
    """Targets of the links in ``doc`` that point into the repository (no scheme, no ``mailto:``)."""
    return [t for t in LINK.findall(_prose(doc.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(doc: Path) -> list[str]:
    """``"target: why"`` for every relative link of ``doc`` that does not resolve."""
    bad = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert doc.exists()
    assert not broken_links(doc), f"{doc.relative_to(ROOT)}: " + "; ".join(broken_links(doc))


def test_docs_have_links():
    """The check sees links at all (a parser that finds none would pass every file)."""
    assert len(relative_links(ROOT / "README.md")) >= 10
    assert any("#" in t for d in DOCS for t in relative_links(d)), "no #anchor link to check"


def test_heading_ids_match_github():
    ids = heading_ids("# The default: `--xshare-budget auto`\n## Optimality of `xshare_ep`\n"
                      "## Offline GPU hosts (`scripts/gpu/`)\n```\n# not a heading\n```\n## Notes\n## Notes\n")
    assert ids == {"the-default---xshare-budget-auto", "optimality-of-xshare_ep", "offline-gpu-hosts-scriptsgpu",
                   "notes", "notes-1"}
