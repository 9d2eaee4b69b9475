"""The project stands alone: code, tests and benches cite the project's own docs/, and every cited
anchor exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("lycotools", "tests", "bench", "fixtures") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".md", ".sh") and p.name != "test_docs.py"] + [ROOT / "README.md"]
BRIEFS = ("lycoris.md", "kohya.md", "conventions.md", "consumers.md", "merging_adalora_layouts.md", "transformers.md")


def _anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", doc.read_text(), re.M)}


def test_no_reference_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
           if "shared/" in line or any(re.search(rf"(?<![\w/]){re.escape(b)}", line) for b in BRIEFS)]
    assert not bad, bad


def test_cited_doc_anchors_exist():
    missing = []
    for p in SOURCES:
        for m in re.finditer(r"docs/([\w\-]+\.md)(?:#([\w\-]+))?", p.read_text()):
            doc = ROOT / "docs" / m.group(1)
            if not doc.exists() or (m.group(2) and m.group(2) not in _anchors(doc)):
                missing.append(f"{p.relative_to(ROOT)}: {m.group(0)}")
    assert not missing, missing
