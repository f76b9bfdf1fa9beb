"""MkDocs hook: the documentation pages take their text from README.md (and benchmarks/RESULTS.md), not copies.

A page in ``docs/`` holds directives that this hook replaces with text from the repository:

    <!-- readme: Checkpoints | Stopping and failures -->   the README's ``## Checkpoints`` and ``## Stopping
                                                          and failures`` sections, in that order
    <!-- file: benchmarks/RESULTS.md -->                    a whole file

so the README stays the one text a reader of the repository sees, and the site cannot drift from it. The
build fails (``mkdocs build --strict``) when a directive names a section the README no longer has, or when
a README section is on no page (a new section must be given a page in ``mkdocs.yml``'s pages). Links
between README sections (``[Checkpoints](#checkpoints)``) point to the page that now holds the section;
links to repository files that are pages here (``benchmarks/RESULTS.md``) point to that page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

REPO = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r"<!--\s*(readme|file):\s*(.*?)\s*-->")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# README text that belongs to no page on purpose: the title and the paragraphs above the first section
# (the home page includes them with `readme: (intro)`).
_INTRO = "(intro)"
# Repository files that are pages of the site.
_FILE_PAGES = {"benchmarks/RESULTS.md": "benchmarks.md", "docs/architecture.md": "architecture.md"}


def _slug(title: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\s-]", "", title.strip().lower())
    return re.sub(r"\s+", "-", text)


def readme_sections(text: str) -> dict[str, str]:
    """README.md as ``{section title: its text with its heading}``; the text above the first ``## `` is
    ``(intro)`` (its ``# `` title line dropped). Headings inside code blocks are not sections."""
    sections: dict[str, list[str]] = {_INTRO: []}
    current, fenced = _INTRO, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif not fenced and current == _INTRO and line.startswith("# "):
            continue
        sections[current].append(line)
    return {title: "\n".join(lines).strip() + "\n" for title, lines in sections.items()}


def _directives(markdown: str) -> list[tuple[str, list[str]]]:
    return [(kind, [n.strip() for n in names.split("|")]) for kind, names in _DIRECTIVE.findall(markdown)]


def _headings(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(_slug(line.lstrip("#")))
    return out


class _Site:
    """The README's sections and which page holds each one (built once per build from the docs pages)."""

    def __init__(self, docs_dir: Path) -> None:
        self.sections = readme_sections((REPO / "README.md").read_text())
        self.page_of_anchor: dict[str, str] = {}
        placed: dict[str, str] = {}
        for page in sorted(docs_dir.rglob("*.md")):
            name = page.relative_to(docs_dir).as_posix()
            for kind, names in _directives(page.read_text()):
                for title in names:
                    text = self._text(kind, title, name)
                    if kind == "readme":
                        placed[title] = name
                    for anchor in _headings(text):
                        self.page_of_anchor.setdefault(anchor, name)
        unplaced = [t for t in self.sections if t not in placed]
        if unplaced:
            raise PluginError(
                f"README.md section(s) {unplaced} are on no documentation page: add them to a page's "
                "`<!-- readme: ... -->` directive in docs/"
            )

    def _text(self, kind: str, name: str, page: str) -> str:
        if kind == "file":
            path = REPO / name
            if not path.is_file():
                raise PluginError(f"docs/{page}: `file: {name}` names no file of the repository")
            return path.read_text()
        if name not in self.sections:
            raise PluginError(
                f"docs/{page}: README.md has no section `## {name}` (its sections: {list(self.sections)[1:]})"
            )
        return self.sections[name]

    def expand(self, markdown: str, page: str) -> str:
        def replace(match: re.Match[str]) -> str:
            kind, names = match.group(1), [n.strip() for n in match.group(2).split("|")]
            return "\n\n".join(self._relinked(self._text(kind, n, page), page) for n in names)

        return _DIRECTIVE.sub(replace, markdown)

    def _relinked(self, text: str, page: str) -> str:
        def relink(match: re.Match[str]) -> str:
            target = match.group(1)
            if target.startswith("#"):
                holder = self.page_of_anchor.get(target[1:])
                if holder is not None and holder != page:
                    return f"]({holder}{target})"
            path, _, anchor = target.partition("#")
            if path in _FILE_PAGES:
                return f"]({_FILE_PAGES[path]}{'#' + anchor if anchor else ''})"
            return match.group(0)

        return _LINK.sub(relink, text)


_site: _Site | None = None


def on_config(config: Any) -> Any:
    global _site  # MkDocs hooks are module functions; the site is read once per build
    _site = _Site(Path(config["docs_dir"]))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    assert _site is not None, "on_config runs before any page"
    return _site.expand(markdown, page.file.src_uri)
