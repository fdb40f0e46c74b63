"""Tables that fit the terminal: a Rich table printed whole where it fits, else split by columns.

Every table lrdeploy prints fits an 80-column terminal with no cell elided ("…"). A table of a few columns
only has to let its text wrap (``overflow="fold"``: a long name is folded, never cut). A table whose width
depends on the data (batch sizes, metrics, runs, long names) goes through :func:`fit`: printed as built where
the console is wide enough, otherwise as several tables that each repeat the first ``keys`` columns (what a
row is) and carry, in order, as many of the others as fit. Nothing is dropped: every column is in a part.
:class:`Items` is a cell of short items (op types, a rank history) that wraps only between items.
"""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
FOLD_FLOOR = 20  # a folding column keeps its longest word (a name) whole up to this width before a split
TEXT_FLOOR = 16  # and a column of text wraps no narrower than this
HEADER_FLOOR = 6  # a header this short is never wrapped ("p90 ms"); a longer one breaks between words


def fit(table: Table, keys: int = 1) -> FittedTable:
    """``table``, printed whole where it fits and otherwise split by columns (see the module docstring)."""
    return FittedTable(table, keys)


class FittedTable:
    """A Rich renderable: ``table`` whole when it fits ``options.max_width`` with no cell elided, else the
    fewest parts, in column order, each led by the first ``keys`` columns; the title is on every part (the
    later ones say "continued"), the caption under the first.

    A part fits when every column can have what it needs (:func:`_sizes`: a ``no_wrap`` column its widest
    cell, a folding one its floor, any other its longest word); its columns are then given fixed widths,
    the widest shrunk first, so Rich neither elides nor squeezes a column below that, and a header wider
    than its column is wrapped: "b32 median" over "0.100 ms" becomes two lines only where room is short."""

    def __init__(self, table: Table, keys: int = 1) -> None:
        self.table = table
        self.keys = max(0, min(keys, len(table.columns)))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)

    def parts(self, console: Console, options: ConsoleOptions) -> list[Table]:
        """The tables to print at ``options.max_width``: one when the whole table fits."""
        sizes = [_sizes(console, options, column) for column in self.table.columns]
        width = options.max_width
        n = len(sizes)
        whole = self._part(list(range(n)), sizes, width, 0)
        if whole is not None and _renders_within(console, options, whole):
            return [whole]
        keys = list(range(self.keys))
        groups: list[list[int]] = []
        for index in range(self.keys, n):
            trial = self._part(keys + groups[-1] + [index], sizes, width, 0) if groups else None
            if trial is not None and _renders_within(console, options, trial):
                groups[-1].append(index)
            else:
                groups.append([index])
        parts = []
        for number, group in enumerate(groups or [[]]):
            indices = keys + group
            part = self._part(indices, sizes, width, number)
            parts.append(part if part is not None else self._part(indices, None, width, number))
        return parts

    def _part(self, indices: Sequence[int], sizes: Sequence[tuple[int, int, int]] | None, width: int,
              number: int) -> Table | None:
        """A copy of the table with the columns ``indices`` at fixed widths that fit ``width`` (None when
        they cannot; with no ``sizes``, widths left to Rich), as part ``number``: a later part says
        "continued" and has no caption."""
        table = self.table
        part = copy.copy(table)
        part.columns = [dataclasses.replace(table.columns[i], _index=j) for j, i in enumerate(indices)]
        if sizes is not None:
            widths = _shrink([sizes[i] for i in indices], width - _chrome(part))
            if widths is None:
                return None
            for column, w in zip(part.columns, widths, strict=True):
                column.width = w
                if isinstance(column.header, str) and cell_len(column.header) > w:  # Rich would not wrap it
                    column.header = "\n".join(textwrap.wrap(column.header, w, break_long_words=False))
        if number and table.title is not None:
            part.title = Text.assemble(table.title, " (continued)") if isinstance(table.title, Text) \
                else f"{table.title} (continued)"
        if number:
            part.caption = None
        return part


def _sizes(console: Console, options: ConsoleOptions, column: Any) -> tuple[int, int, int]:
    """(needed, cells, natural) content width of a column. Its cells need: in a ``no_wrap`` column, the
    widest; else the longest word (in a folding column at most :data:`FOLD_FLOOR`: a longer name is folded)
    and at least :data:`TEXT_FLOOR`, or the widest cell where that is less. Its header needs its longest word
    (:data:`HEADER_FLOOR` at least): a header wider than its column is wrapped (:meth:`FittedTable._part`),
    even in a ``no_wrap`` column. ``cells`` is the widest cell, ``natural`` the widest of cells and header."""
    cells = [Measurement.get(console, options, c) for c in column.cells] or [Measurement(1, 1)]
    header = Measurement.get(console, options, column.header)
    widest = max(m.maximum for m in cells)
    if column.no_wrap:
        need = widest
    else:
        longest = max(m.minimum for m in cells)
        if column.overflow == "fold":
            longest = min(longest, FOLD_FLOOR)
        need = min(widest, max(longest, TEXT_FLOOR))
    floor = column.min_width or 1
    need = max(need, min(header.maximum, max(header.minimum, HEADER_FLOOR)), floor)
    return need, max(widest, need), max(widest, header.maximum, floor)


def _shrink(sizes: Sequence[tuple[int, int, int]], room: int) -> list[int] | None:
    """Natural widths shrunk until they fit ``room`` (None when the needs alone do not): first headers wider
    than their cells (they wrap), then cells, the widest column above its need first."""
    if sum(need for need, _, _ in sizes) > room:
        return None
    widths = [natural for _, _, natural in sizes]
    for floors in ([cells for _, cells, _ in sizes], [need for need, _, _ in sizes]):
        while sum(widths) > room:
            over = [i for i, floor in enumerate(floors) if widths[i] > floor]
            if not over:
                break
            widths[max(over, key=lambda i: widths[i])] -= 1
    return widths


def _chrome(table: Table) -> int:
    """Cells a table adds around its columns' content: padding and borders."""
    _, right, _, left = table.padding
    n = len(table.columns)
    pad = n * (left + right) - (0 if table.pad_edge or not n else left + right)
    return pad + ((2 if table.show_edge else 0) + max(n - 1, 0) if table.box else 0)


def _renders_within(console: Console, options: ConsoleOptions, table: Table) -> bool:
    """Whether Rich draws ``table`` within ``options.max_width`` with no more "…" than its text holds."""
    width = options.max_width
    shown = 0
    for line in Segment.split_lines(console.render(table, options)):
        text = "".join(segment.text for segment in line if not segment.control)
        if cell_len(text) > width:
            return False
        shown += text.count(ELLIPSIS)
    return shown <= _ellipses(console, table)


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
