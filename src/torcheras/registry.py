"""Name lookup shared by losses, metrics and optimizers: one wording for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["lookup"]

V = TypeVar("V")


def lookup(table: Mapping[str, V], name: str, kind: str, alternatives: str) -> V:
    """``table[name.lower()]``, or a ValueError with the closest name and the known ones.

    >>> lookup({"adam": 1}, "Adam", "optimizer", "an instance")
    1
    """
    key = name.lower()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, table, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(table))}; "
        f"or pass {alternatives}."
    )
