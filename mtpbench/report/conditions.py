"""Warnings about the conditions a sweep was measured under, from the machine state its rows keep: cells run on a
busy machine (load above the core count), under thermal pressure, throttled or hot, and groups whose first and last
ABBA blocks drift apart by more than their spread (heat soak). The judgments are `mtpbench.machine`'s; this module
only groups rows. Rows written before the machine state was kept give no warning."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..machine import busy_reasons, drift_warning, states_from_row


def _busy(cell_rows: pd.DataFrame) -> tuple[float, list[str]]:
    """A cell's busy reasons (its rows share the cell's states) and its worst load, for picking the example."""
    row = cell_rows.iloc[0].to_dict()
    states = states_from_row(row)
    if states is None:
        return 0.0, []
    loads = [x for x in (row.get("load_start"), row.get("load_end")) if pd.notna(x)]
    return max(loads, default=0.0), busy_reasons(*states)


def _drift(g: pd.DataFrame) -> str | None:
    """The first and the last repetition (ABBA block) of a group, paired by prompt and run (mode, K)."""
    ok = g[(g["status"] == "ok") & g["decode_tok_s"].notna()]
    if ok.empty or ok["repetition"].nunique() < 2:
        return None
    key = ["prompt_set", "prompt_id", "mode", "k"]

    def block(rep: int) -> pd.Series:
        rates = ok[ok["repetition"] == rep].set_index(key)["decode_tok_s"]
        return rates[~rates.index.duplicated()]

    first, last = block(ok["repetition"].min()), block(ok["repetition"].max())
    both = first.index.intersection(last.index)
    return drift_warning(list(first.loc[both]), list(last.loc[both])) if len(both) else None


def machine_warnings(runs: pd.DataFrame, by: list[str]) -> list[tuple[dict[str, Any], str]]:
    """(group selection, one-line warning) per group of `by` with cells on a busy machine or a drift."""
    if runs.empty or "cores" not in runs or runs["cores"].isna().all():
        return []
    out: list[tuple[dict[str, Any], str]] = []
    keys = [c for c in by if c in runs]
    kept = runs[runs["cores"].notna()]  # rows with a machine state: the reference decoder's, since it was kept
    for key, g in kept.groupby(keys, sort=True, dropna=False):
        sel = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        cells = [_busy(c) for _, c in g.groupby("cell_id", sort=False)]
        busy = [c for c in cells if c[1]]
        if busy:
            worst = max(busy, key=lambda c: c[0])[1]
            out.append((sel, f"{len(busy)} of {len(cells)} cells ran on a busy machine ({'; '.join(worst)}): "
                             f"their speeds measure the machine as much as the decoder"))
        drift = _drift(g)
        if drift:
            out.append((sel, drift))
    return out
