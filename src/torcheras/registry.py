"""Name lookup shared by losses, metrics and optimizers: one wording for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["lookup", "plural"]

V = TypeVar("V")


def plural(noun: str) -> str:
    """``"metric"`` -> ``"metrics"``, ``"loss"`` -> ``"losses"``.

    >>> plural("loss"), plural("optimizer")
    ('losses', 'optimizers')
    """
    return f"{noun}es" if noun.endswith(("s", "x", "z", "ch", "sh")) else f"{noun}s"


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
        f"Unknown {kind} {name!r}.{hint} Known {plural(kind)}: {', '.join(sorted(table))}; "
        f"or pass {alternatives}."
    )
