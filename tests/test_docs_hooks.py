"""The documentation site's pages take their text from README.md (scripts/docs_hooks.py): every README section
is on a page, a page naming a section the README lacks is refused, and links follow a section to its page."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="the docs tools come with the dev extra (scripts/setup_env.sh installs it)")
from mkdocs.exceptions import PluginError  # noqa: E402 - after the skip above


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_section_is_on_a_page_and_links_follow_it():
    hooks = _hooks()
    site = hooks._Site(REPO / "docs")  # raises when a README section is on no page
    titles = [line[3:].strip() for line in (REPO / "README.md").read_text().splitlines() if line.startswith("## ")]
    assert set(titles) <= set(site.sections)
    page = site.expand("<!-- readme: Data -->", "yaml-reference.md")
    assert page.startswith("## Data\n")
    assert "## Checkpoints" not in page
    # The YAML reference's link to the Checkpoints section points to the page that holds it.
    assert "](checkpoints.md#checkpoints)" in site._relinked("see [Checkpoints](#checkpoints)", "yaml-reference.md")
    assert "](#checkpoints)" in site._relinked("see [Checkpoints](#checkpoints)", "checkpoints.md")


def test_a_missing_or_unplaced_section_fails_the_build(tmp_path):
    hooks = _hooks()
    (tmp_path / "index.md").write_text("<!-- readme: (intro) | No such section -->\n")
    with pytest.raises(PluginError, match="README.md has no section `## No such section`"):
        hooks._Site(tmp_path)
    (tmp_path / "index.md").write_text("<!-- readme: (intro) | Checkpoints -->\n")
    with pytest.raises(PluginError, match=r"section\(s\) \[.*'Data'.*\] are on no documentation page"):
        hooks._Site(tmp_path)
