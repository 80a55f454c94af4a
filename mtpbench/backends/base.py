"""The one interface a sweep drives: whatever it measures (mtpbench's reference decoder on a checkpoint, or a
running server), it is prepared once, warmed up per group of like cells, asked for each cell's rows, and closed.

The runner (`orchestrate.sweep`) iterates backends without knowing which kind they are; every row comes from the
one row builder (`sweep.rows`), so a sweep that mixes backends writes one table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..sweep.rows import CellRows
from ..sweep.spec import Cell

OnRun = Callable[[str, float], None]  # (label, decode tok/s) after each run: progress display


class Backend(Protocol):
    kind: str  # axes.REFERENCE or axes.SERVER: which cells it takes
    name: str  # unique within a sweep: what logs and progress say

    def takes(self, cell: Cell) -> bool:
        """Whether this backend runs `cell` (its kind and, for the reference decoder, its model and policy)."""

    def part(self, cell: Cell) -> str:
        """The name of this cell's part files (unique per backend and cell)."""

    def prepare(self) -> None:
        """Load or connect; called once, before the first cell. Raises UserError for what the user must fix."""

    def manifest_entry(self) -> tuple[str, str, dict[str, Any]]:
        """(manifest section, key, description) of what was measured, after `prepare`."""

    def runs_in(self, cell: Cell) -> int:
        """How many runs (rows) one cell gives: the progress display's unit."""

    def warm_up(self, cell: Cell) -> None:
        """Unrecorded work so first-call costs never land in a timed row; once per `cell.warm_group`."""

    def run_cell(self, cell: Cell, on_run: OnRun | None = None) -> CellRows:
        """Every run of one cell, as rows; a failed run is a row with its reason, not an exception."""

    def close(self) -> None:
        """Free what `prepare` took (a model's memory, connections)."""
