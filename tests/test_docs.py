"""The repository carries what its comments cite: every "spec §N" in the code is a section of docs/spec.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.M)
# a citation: "§4.3", "§§", "§2.1-§2.4", "§3.2-3.3", "§3, §4.5, §8", "§3.4/§3.5"
CITATION = re.compile(r"§+\s?(\d+(?:\.\d+)?(?:\s*(?:[-,/–]|and)\s*§?\d+(?:\.\d+)?)*)")


def spec_sections(text: str) -> set[str]:
    return set(HEADING.findall(text))


def dangling(text: str, sections: set[str]) -> list[str]:
    """Section numbers cited in `text` that `sections` lacks."""
    cited = [n for m in CITATION.finditer(text) for n in re.findall(r"\d+(?:\.\d+)?", m.group(1))]
    return sorted({n for n in cited if n not in sections})


def test_every_spec_citation_in_the_package_and_docs_resolves():
    sections = spec_sections((ROOT / "docs" / "spec.md").read_text())
    missing = {}
    docs = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "spec.md"]
    for path in sorted((ROOT / "parity").rglob("*.py")) + docs:
        text = path.read_text()
        if "§" in text and (bad := dangling(text, sections)):
            missing[str(path.relative_to(ROOT))] = bad
    assert not missing, f"spec sections cited but absent from docs/spec.md: {missing}"


def test_a_planted_dangling_citation_is_found():
    sections = spec_sections("## 3. Formats\n### 3.2 `act_quant`\n### 3.3 fp4\n## 13. Quirks\n### 13.1 state\n")
    assert sections == {"3", "3.2", "3.3", "13", "13.1"}
    assert dangling("exact (spec §3.2-3.3), see §13.1", sections) == []
    assert dangling("exact (spec §3.2, §3.4), stale (§14)", sections) == ["14", "3.4"]
