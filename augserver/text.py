"""Plain-text tables for the terminal (``augserver status``, the evaluation report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ",
                 align_right: bool = False, rule: bool = False) -> list[str]:
    """``rows`` under ``header`` in columns as wide as their widest cell, one string a line.

    Cells are ``str()``-ed; ``align_right`` right-aligns every column but the first (numbers);
    ``rule`` puts a line of dashes under the header.
    """
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if align_right and i else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return (indent + "  ".join(parts)).rstrip()

    lines = [line(row) for row in cells]
    if rule:
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return lines
