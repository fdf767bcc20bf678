"""Plain-text tables: ``tablist`` and ``string_trim`` (OpenFed's helpers, no dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["string_trim", "tablist"]

#: Width of the terminal the tables are made for.
_COLUMNS = 80


def string_trim(string: Any, length: int = 15) -> str:
    """``string`` as text of at most about ``length`` characters.

    Floats are shown with two decimals; anything else with ``str``. Text longer
    than ``length + 3`` keeps its first and last ``length // 2`` characters
    around ``...``.

    >>> string_trim(15, 4)
    '15'
    >>> string_trim("this is a message from zmqfed", 15)
    'this is... zmqfed'
    """
    text = f"{string:.2f}" if isinstance(string, float) else str(string)
    if len(text) > length + 3:
        half = length // 2
        return text[:half] + "..." + text[len(text) - half :]
    return text


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """One ASCII table, every cell centred with one space of padding."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c:^{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([sep, line(head), sep, *(line(r) for r in rows), sep])


def _trimmed_table(head: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    length = max(1, (_COLUMNS - len(head) * 3 - 1) // max(1, len(head)))
    names = [string_trim(h, length) for h in head]
    if len(set(names)) != len(names):
        raise ValueError(
            f"trimming the head to {length} characters makes some names equal ({names}); "
            "use shorter or more distinct names, or fewer items per row"
        )
    return _table(names, [[string_trim(c, length) for c in row] for row in rows])


def tablist(
    head: Sequence[Any],
    data: Sequence[Any],
    items_per_row: int = 8,
    force_in_one_row: bool = False,
) -> str:
    """Show ``data`` under ``head`` as ASCII tables of at most ``items_per_row`` columns.

    With ``force_in_one_row``, all of ``head`` makes one table and ``data``
    fills as many rows as it needs (the last one padded with blanks).

    >>> print(tablist(["a", "b", "c", "d"], [1, 2, 3, 4], items_per_row=2))
    +---+---+
    | a | b |
    +---+---+
    | 1 | 2 |
    +---+---+
    +---+---+
    | c | d |
    +---+---+
    | 3 | 4 |
    +---+---+
    >>> print(tablist(["a", "b"], [1, 2, 3], force_in_one_row=True))
    +---+---+
    | a | b |
    +---+---+
    | 1 | 2 |
    | 3 |   |
    +---+---+
    """
    head, data = list(head), list(data)
    if not head:
        return ""
    if force_in_one_row:
        width = len(head)
        rows = [data[i : i + width] for i in range(0, len(data), width)]
        if rows and len(rows[-1]) < width:
            rows[-1] = rows[-1] + [" "] * (width - len(rows[-1]))
        return _trimmed_table(head, rows)
    if items_per_row < 1:
        raise ValueError(f"items_per_row must be >= 1, got {items_per_row!r}")
    if len(data) != len(head):
        raise ValueError(f"data has {len(data)} items but head has {len(head)}")
    tables = [
        _trimmed_table(head[i : i + items_per_row], [data[i : i + items_per_row]])
        for i in range(0, len(head), items_per_row)
    ]
    return "\n".join(tables)
