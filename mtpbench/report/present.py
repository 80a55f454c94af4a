"""Turn aggregate DataFrames into display tables (header + rows of strings) shared by the HTML report and card."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..sweep.axes import AXES, context_label
from .. import fmt
from .tables import BY

KEY_HEADERS = {"source": "Source", "backend": "Backend", "setting": "Setting", **{a.column: a.title for a in AXES}}

Cell = Callable[[pd.Series], str]


def group_title(sel: dict[str, Any], runs: pd.DataFrame) -> str:
    """One aggregate group's title: the model and the setting, then every other grouping key whose value varies
    in `runs` (context buckets as 1k, 4k...)."""
    shown = {c: context_label(v) if c == "context" else v for c, v in sel.items()}
    return "  |  ".join(f"{c} {v}" if c not in ("model", "setting") else str(v) for c, v in shown.items()
                        if c in ("model", "setting") or (c in runs and runs[c].nunique(dropna=False) > 1))


@dataclass
class Table:
    """A plain table: what the template renders as <table> and the card as markdown."""

    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)
    caption: str = ""

    @property
    def empty(self) -> bool:
        return not self.rows


def col(name: str) -> Cell:
    return lambda r: fmt.text(r[name])


def build(df: pd.DataFrame, columns: list[tuple[str, Cell, bool]], caption: str = "") -> Table:
    """Format each row of `df` with the given (header, cell function, is-numeric) columns."""
    rows = [[cell(r) for _, cell, _ in columns] for _, r in df.iterrows()] if not df.empty else []
    return Table([h for h, _, _ in columns], rows, [n for _, _, n in columns], caption)


KEY_FORMATS: dict[str, Cell] = {"context": lambda r: context_label(r["context"])}  # 1024 -> "1k", 0 -> "native"


def key_columns(keys: list[str]) -> list[tuple[str, Cell, bool]]:
    return [(KEY_HEADERS.get(k, k), KEY_FORMATS.get(k, col(k)), False) for k in keys]


def shown_keys(runs: pd.DataFrame) -> list[str]:
    """Group keys worth a column: those that vary across the report, plus model and setting always."""
    if runs.empty:
        return ["model", "setting"]
    return [k for k in BY if k in ("model", "setting") or runs[k].nunique(dropna=False) > 1]


def k_label(k: Any) -> str:
    return "AR" if int(k) == 0 else f"MTP K={int(k)}"


def mode_label(r: pd.Series | dict) -> str:
    """k_label, except that an MTP row recorded with K = 0 (a server endpoint: K unknown to the client) says MTP."""
    return "MTP" if r["mode"] == "mtp" and int(r["k"]) == 0 else k_label(r["k"])


def speedup_cell(r: pd.Series) -> str:
    return fmt.with_ci(r.get("speedup"), r.get("speedup_lo"), r.get("speedup_hi"), fmt.ratio)


def acceptance_cell(r: pd.Series) -> str:
    return fmt.with_ci(r["acceptance"], r["acceptance_lo"], r["acceptance_hi"])


def survival_cell(r: pd.Series) -> str:
    return fmt.with_ci(r["survival"], r["survival_lo"], r["survival_hi"])


def mode_speedup_cell(r: pd.Series) -> str:
    """AR is the reference (1.00×); MTP rows carry the paired speedup and its CI."""
    return "1.00× (baseline)" if r["mode"] == "ar" else speedup_cell(r)
