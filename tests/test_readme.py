"""The README's "Common problems" table points at sections that exist."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_every_section_the_readme_cites_exists():
    readme = (ROOT / "README.md").read_text()
    cited = re.findall(r"\[(\d\d) §(\d+[a-z]?)", readme)
    assert len(cited) > 30
    scripts = {path.name[:2]: path.read_text() for path in ROOT.glob("[0-9][0-9]_*.py")}
    missing = [f"{number} §{section}" for number, section in cited
               if not re.search(rf"^# %% {section}\.", scripts[number], re.MULTILINE)]
    assert missing == []
