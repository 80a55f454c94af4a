"""The one row builder: every backend's runs, steps and tokens rows are made here, from a cell and what was measured.

Identity and axis columns come from the cell (so a new axis lands in every row by its `axes.AXES` entry), the
facts of what was measured (backend name, model name, fingerprint, path, device) from the backend, and the
measurements from the run. The decoder and the HTTP client hand back plain records; only this module knows the
columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..machine import MachineState, row_fields
from ..provenance import provenance
from .axes import AXES, RUN
from .spec import Cell


@dataclass
class CellRows:
    """The rows one cell produced, per table (what a backend's `run_cell` returns)."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"runs": self.runs, "steps": self.steps, "tokens": self.tokens}

    def stamp_machine(self, start: MachineState, end: MachineState) -> None:
        """Every run of the cell records the machine's state at the cell's start and end (a report then warns of
        cells measured on a busy or hot machine)."""
        fields = row_fields(start, end)
        for row in self.runs:
            row.update(fields)


def run_row(cell: Cell, target: Mapping[str, Any], mode: str, k: int, order: int, started: str, sweep: str,
            measured: Mapping[str, Any] | None = None, error: str = "", run_id: str | None = None) -> dict[str, Any]:
    """One runs-table row. `target` holds the backend's facts (backend, model, model_fingerprint, model_path and
    optionally device); `measured` the run's fields (absent for a run that produced nothing)."""
    setting = cell.setting
    row: dict[str, Any] = {a.column: cell[a.name] for a in AXES if a.scope != RUN and a.column != "model"}
    row.update({
        "run_id": run_id or cell.run_id(mode, k), "cell_id": cell.cell_id, "sweep": sweep, "mode": mode, "k": k,
        "setting": setting.label, "prompt_set": cell.prompt.set_name, "prompt_id": cell.prompt.id,
        "prompt_digest": cell.prompt.digest, "category": cell.prompt.category, "repetition": cell.repetition,
        "seed": cell.seed, "max_tokens": cell.max_tokens, "order": order,
        "started_at": started, **provenance(),
    })
    if "draft_temp" in dict(cell.point):  # the draft temperature actually used ('same' is the target's)
        row["draft_temperature"] = setting.draft
    row.update(target)
    ok = measured is not None and not error
    row.update(status="ok" if ok else "failed", error=error or None)
    if measured:
        row.update(measured)
    return row


def record_rows(run_id: str, records: Iterable[Any]) -> list[dict[str, Any]]:
    """Steps or tokens rows from a decoder's plain records (dataclasses)."""
    return [{"run_id": run_id, **asdict(r)} for r in records]
