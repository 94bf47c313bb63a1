"""The documentation stays true: the config reference is what the schema generates, and every
relative link in README.md and docs/*.md reaches an existing file and heading."""

import importlib.util
import re
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_HTML_ID = re.compile(r'<a\s+(?:id|name)="([^"]+)"')


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """Markdown without fenced code blocks, where brackets and headings mean nothing."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set(_HTML_ID.findall(text))
    for heading in _HEADING.findall(text):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path) -> list[str]:
    text = _CODE_SPAN.sub("", _prose(path.read_text(encoding="utf-8")))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_docs_config_md_is_what_the_schema_generates():
    generator = _load_script("config_reference")
    current = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == generator.render(), (
        "docs/config.md is out of date with mftcoder/config/schema.py: run `python scripts/config_reference.py` "
        "(edit descriptions in the schema, not in docs/config.md)"
    )


def test_the_config_reference_check_mode_agrees(capsys):
    assert _load_script("config_reference").main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        destination = (doc.parent / file_part).resolve() if file_part else doc
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_anchors(tmp_path):
    """The checker itself: it finds links outside code, and computes GitHub's anchors."""
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Rows: padding, pack, concat\n\n## Static modes: case1–case4\n\n## Twice\n\n## Twice\n\n"
        "See [b](b.md#x) and [web](https://example.com), not `[c](c.md)`.\n\n```\n[d](d.md)\n```\n"
    )
    assert relative_links(doc) == ["b.md#x"]
    assert anchors(doc) == {"rows-padding-pack-concat", "static-modes-case1case4", "twice", "twice-1"}
