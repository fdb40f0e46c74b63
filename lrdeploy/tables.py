"""Tables that fit the terminal: a wide Rich table is printed whole where it fits, else split by columns.

Every table lrdeploy prints must fit an 80-column terminal with no cell elided ("…"). Tables whose columns
are few and free-text wrap (``overflow="fold"``); tables whose column count depends on the data (batch sizes,
metrics, runs) go through :func:`fit`: the table as built when the console is wide enough, otherwise several
tables that each repeat the first ``keys`` columns (what a row is) and carry as many of the other columns,
in order, as fit. Nothing is dropped: every column is in one of the parts.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
FOLD_FLOOR = 12  # a folding column is given at least its longest word, up to this many cells, before a split


def fit(table: Table, keys: int = 1) -> FittedTable:
    """``table``, printed whole where it fits and otherwise split by columns (see the module docstring)."""
    return FittedTable(table, keys)


class FittedTable:
    """A Rich renderable: ``table`` whole when it fits ``options.max_width`` with no cell elided, else the
    fewest parts, in column order, each led by the first ``keys`` columns; the title is on every part (the
    later ones say "continued"), the caption under the first."""

    def __init__(self, table: Table, keys: int = 1) -> None:
        self.table = table
        self.keys = max(0, min(keys, len(table.columns)))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)

    def parts(self, console: Console, options: ConsoleOptions) -> list[Table]:
        """The tables to print at ``options.max_width``: one when the whole table fits."""
        n = len(self.table.columns)
        whole = self._part(console, options, list(range(n)), 0, 1)
        if fits(console, options, whole):
            return [whole]
        if n <= self.keys + 1:  # nothing to split off: let Rich fold what it must
            return [self._part(console, options, list(range(n)), 0, 1, floors=False)]
        keys = list(range(self.keys))
        groups: list[list[int]] = []
        current: list[int] = []
        for index in range(self.keys, n):
            if current and not fits(console, options, self._part(console, options, keys + current + [index],
                                                                  0, 1)):
                groups.append(current)
                current = []
            current.append(index)
        groups.append(current)
        parts = []
        for i, group in enumerate(groups):
            part = self._part(console, options, keys + group, i, len(groups))
            if not fits(console, options, part):  # one column too wide even alone: let Rich fold it
                part = self._part(console, options, keys + group, i, len(groups), floors=False)
            parts.append(part)
        return parts

    def _part(self, console: Console, options: ConsoleOptions, indices: Sequence[int], number: int,
              count: int, floors: bool = True) -> Table:
        """A copy of the table with the columns ``indices``; part ``number`` of ``count``."""
        table = self.table
        part = copy.copy(table)
        part.columns = [
            dataclasses.replace(table.columns[i], _index=j,
                                min_width=_floor(console, options, table.columns[i]) if floors else None)
            for j, i in enumerate(indices)
        ]
        if number and table.title is not None:
            part.title = Text.assemble(table.title, " (continued)") if isinstance(table.title, Text) \
                else f"{table.title} (continued)"
        if number:
            part.caption = None
        return part


def _floor(console: Console, options: ConsoleOptions, column: Any) -> int | None:
    """The least width of a column: its own ``min_width``, or for a folding column its longest word (at most
    :data:`FOLD_FLOOR`), so that squeezing the table folds words only past that."""
    if column.min_width is not None or column.overflow != "fold" or column.no_wrap:
        return column.min_width
    words = [Measurement.get(console, options, c).minimum for c in (column.header, *column.cells)]
    return min(max(words, default=1), FOLD_FLOOR)


def fits(console: Console, options: ConsoleOptions, renderable: Table) -> bool:
    """Whether ``renderable`` renders within ``options.max_width`` with no more "…" than its text holds."""
    width = options.max_width
    shown = 0
    for line in Segment.split_lines(console.render(renderable, options)):
        text = "".join(segment.text for segment in line if not segment.control)
        if cell_len(text) > width:
            return False
        shown += text.count(ELLIPSIS)
    return shown <= _ellipses(console, renderable)


def _ellipses(console: Console, table: Table) -> int:
    """How many "…" the table's own text holds (title, caption, headers, cells)."""
    texts = [table.title, table.caption, *(c.header for c in table.columns),
             *(cell for c in table.columns for cell in c.cells)]
    return sum(_plain(console, t).count(ELLIPSIS) for t in texts if t is not None)


def _plain(console: Console, renderable: object) -> str:
    if isinstance(renderable, Text):
        return renderable.plain
    if isinstance(renderable, str):
        return console.render_str(renderable).plain
    return ""


class Items:
    """Short items joined by ``sep`` in a cell that wraps only between items (a line break replaces the
    separator; an item is folded only when it alone is wider than the column): "MatMul 55.2 %" stays whole."""

    def __init__(self, items: Sequence[str], sep: str = " · ") -> None:
        self.items = [str(i) for i in items]
        self.sep = sep

    def __str__(self) -> str:
        return self.sep.join(self.items)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widest = max((cell_len(i) for i in self.items), default=0)
        return Measurement(min(widest, options.max_width), min(cell_len(str(self)), options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines: list[str] = []
        for item in self.items:
            joined = f"{lines[-1]}{self.sep}{item}" if lines else item
            if lines and cell_len(joined) <= options.max_width:
                lines[-1] = joined
            else:
                lines.append(item)
        yield Text("\n".join(lines), overflow="fold")
