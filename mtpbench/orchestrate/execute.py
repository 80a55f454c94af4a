"""Executing a sweep's work: the one writer of a results directory, one cell on a backend, and the local executor.

Shared by every executor: `execute_local` runs the work in this process; `ray_executor` runs reference groups as
Ray tasks on workers (each calling `run_backend`) and hands every finished cell to the same `Writer` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..errors import UserError
from ..sweep.rows import CellRows
from ..sweep.spec import Cell
from ..sweep.store import CELL_TABLES, update_manifest, write_part

Work = list[tuple[Backend, Cell]]


@dataclass(frozen=True)
class RunEvent:
    """What the progress display shows after each run."""

    done: int
    total: int
    label: str
    tok_s: float


@dataclass
class SweepOutcome:
    out: Path
    cells_total: int
    cells_run: int
    cells_skipped: int
    failed_runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def failure_line(row: dict[str, Any]) -> str:
    """One line naming a failed run (backend, prompt, mode) and its reason."""
    what = f"{row['mode']}{row['k'] or ''}"
    return f"{row['backend']} {row['prompt_set']}/{row['prompt_id']} {what}: {row['error']}"


def run_one(backend: Backend, cell: Cell, warmed: set[tuple], on_cell: Callable[[str, CellRows], None],
            on_run: Callable[[str, float], None] | None = None) -> None:
    """One cell on a prepared backend, after a warm-up when its group of like cells has had none yet."""
    if cell.warm_group not in warmed:
        backend.warm_up(cell)
        warmed.add(cell.warm_group)
    on_cell(backend.part(cell), backend.run_cell(cell, on_run))


def run_backend(backend: Backend, cells: list[Cell], on_cell: Callable[[str, CellRows], None],
                on_run: Callable[[str, float], None] | None = None) -> tuple[str, str, dict[str, Any]]:
    """Prepare one backend, run its cells, close it; returns its manifest entry (a Ray task runs this)."""
    backend.prepare()
    try:
        warmed: set[tuple] = set()
        for cell in cells:
            run_one(backend, cell, warmed, on_cell, on_run)
        return backend.manifest_entry()
    finally:
        backend.close()


class Writer:
    """The one writer of a results directory during a run: parts, manifest entries, progress and the outcome."""

    def __init__(self, out: Path, outcome: SweepOutcome, progress: Callable[[RunEvent], None] | None,
                 runs_total: int):
        self.out, self.outcome, self.progress, self.runs_total = out, outcome, progress, runs_total
        self.runs_done = 0

    def cell(self, part: str, rows: CellRows) -> None:
        """Steps and tokens first, runs last: a runs part is the mark of a finished cell."""
        for table in CELL_TABLES:
            write_part(self.out, table, part, rows.tables()[table])
        self.outcome.cells_run += 1
        self.outcome.failed_runs += [failure_line(r) for r in rows.runs if r["status"] != "ok"]

    def run(self, label: str, tok_s: float) -> None:
        self.runs_done += 1
        if self.progress:
            self.progress(RunEvent(self.runs_done, self.runs_total, label, tok_s))

    def record(self, section: str, key: str, info: dict[str, Any]) -> None:
        """Store what was measured in the manifest, refusing a checkpoint that changed on disk or an endpoint that
        now serves another model."""
        def change(manifest: dict[str, Any]) -> None:
            known = manifest.setdefault(section, {}).get(key) or {}
            for ident in ("fingerprint", "served_model"):
                if known.get(ident) and info.get(ident) and known[ident] != info[ident]:
                    raise UserError(f"{key} changed since this sweep started ({ident} {known[ident]} -> "
                                    f"{info[ident]}); use another --out")
            manifest[section][key] = info

        update_manifest(self.out, change)


def execute_local(work: Work, writer: Writer) -> None:
    """Run the work in this process, each backend open from its first cell to its last."""
    last = {id(b): i for i, (b, _) in enumerate(work)}
    warmed: dict[int, set[tuple]] = {}
    try:
        for i, (backend, cell) in enumerate(work):
            if id(backend) not in warmed:
                backend.prepare()
                warmed[id(backend)] = set()
            run_one(backend, cell, warmed[id(backend)], writer.cell, writer.run)
            if last[id(backend)] == i:
                writer.record(*backend.manifest_entry())
                backend.close()
    finally:
        for b, _ in work:
            if id(b) in warmed:
                b.close()
