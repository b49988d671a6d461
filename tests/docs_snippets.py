"""The code blocks of the docs pages, for tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def first_python_block(page: str, section: str) -> str:
    """The first Python block under the heading ``section`` of ``docs/<page>``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", body, re.S)
    assert found is not None, f"no Python block under {section!r} in {page}"
    return found.group(1)
