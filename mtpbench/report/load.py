"""Read one or more results directories into one set of tables, tagged by `source`.

Reports merge machines, policies and checkpoints; the `source` column (manifest name, else the directory name)
keeps rows from different directories apart even when every other key is equal. Everything downstream reads
these frames only, never live decoder objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import pyarrow as pa

from ..sweep.store import Damage, read_manifest, read_results

from ..sweep.axes import AXES, REFERENCE, SERVER
from ..sweep.axes import GROUP_KEYS as AXIS_GROUP_KEYS

# Every aggregate in the report and the card is grouped by these keys, so both always agree.
GROUP_KEYS: list[str] = ["source", *AXIS_GROUP_KEYS]
MISSING = "(none)"
INTEGER_AXES = {a.column for a in AXES if pa.types.is_integer(a.arrow)}
LEGACY = {a.column: a for a in AXES if a.legacy is not None}


@dataclass
class Loaded:
    """Merged tables plus each source's manifest and directory."""

    runs: pd.DataFrame
    steps: pd.DataFrame
    verdicts: pd.DataFrame
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    benches: list[dict[str, Any]] = field(default_factory=list)  # `mtpbench bench` results kept in a dir's bench/
    costs: list[dict[str, Any]] = field(default_factory=list)  # per checkpoint its bench, else its cost model
    damaged: list[str] = field(default_factory=list)  # parts that could not be read (path: reason), left out


def sampling_label(row: pd.Series) -> str:
    """A readable setting name when the runs carry none (mirrors SamplingConfig.label)."""
    t = row.get("temperature")
    if t is None or pd.isna(t):
        return MISSING
    if t == 0:
        return "greedy"
    parts = [f"T={t:g}"]
    if pd.notna(row.get("top_p")) and row["top_p"] < 1:
        parts.append(f"top_p={row['top_p']:g}")
    if pd.notna(row.get("top_k")) and row["top_k"]:
        parts.append(f"top_k={int(row['top_k'])}")
    if pd.notna(row.get("min_p")) and row["min_p"]:
        parts.append(f"min_p={row['min_p']:g}")
    return " ".join(parts)


def _fill_keys(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Missing group keys become a visible placeholder, so groupby/merge never silently drop or mismatch them."""
    df = df.copy()
    kind = df["backend"].map(lambda b: REFERENCE if b == REFERENCE else SERVER) if "backend" in df else None
    for k in keys:
        if k in df and k != "k":
            if k in LEGACY and kind is not None:  # rows written before the axis existed, by a backend it applies to
                old = df[k].isna() & kind.isin(LEGACY[k].backends)
                df[k] = df[k].astype(object).where(~old, LEGACY[k].legacy)
            if k in INTEGER_AXES:  # a number axis a backend lacks stays a number: nullable, never "(none)" text
                df[k] = pd.to_numeric(df[k]).astype("Int64")
                if len(df) and df[k].isna().all() and k in LEGACY:  # no backend of these rows has the axis
                    df[k] = df[k].fillna(LEGACY[k].legacy)
                continue
            col = df[k].astype(object)
            df[k] = col.where(col.notna() & (col != ""), MISSING)
    return df


def _normalize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    if not runs.empty:
        no_setting = runs["setting"].isna() | (runs["setting"] == "")
        if no_setting.any():
            runs.loc[no_setting, "setting"] = runs[no_setting].apply(sampling_label, axis=1)
    return _fill_keys(runs, GROUP_KEYS + ["category", "thinking"])


def _source_names(dirs: list[Path], manifests: list[dict[str, Any]]) -> list[str]:
    """Manifest name, else directory name; made unique so two machines never merge into one source."""
    names: list[str] = []
    for d, m in zip(dirs, manifests):
        base = str(m.get("name") or d.name)
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def cost_sources(results_dir: Path) -> list[dict]:
    """What a results dir keeps of each checkpoint's measured costs: its bench.json, else its cost_model.json."""
    out = []
    for d in sorted(p for p in (results_dir / "bench").glob("*") if p.is_dir()):
        f = next((d / n for n in ("bench.json", "cost_model.json") if (d / n).exists()), None)
        if f is not None:
            out.append(json.loads(f.read_text()))
    return out

def load(results_dirs: list[Path | str], say: Callable[[str], None] | None = None) -> Loaded:
    """Read each directory with results.read_results and tag its rows with a source name. A damaged part is left
    out, kept in `damaged` (the page shows it) and said as one warning line."""
    dirs = [Path(d) for d in results_dirs]
    damage = Damage()
    manifests = [read_manifest(d) for d in dirs]
    names = _source_names(dirs, manifests)
    frames: dict[str, list[pd.DataFrame]] = {"runs": [], "steps": [], "verdicts": []}
    for d, name in zip(dirs, names):
        tables = read_results([d], damage)
        for t, parts in frames.items():
            parts.append(tables[t].assign(source=name))
    runs = _normalize_runs(pd.concat(frames["runs"], ignore_index=True))
    verdicts = _fill_keys(pd.concat(frames["verdicts"], ignore_index=True), GROUP_KEYS)
    steps = pd.concat(frames["steps"], ignore_index=True)
    costs = [c for d in dirs for c in cost_sources(d)]
    benches = [c for c in costs if c.get("kind") != "cost_model"]  # the whole benches, read once
    for line in damage.parts if say else ():
        say(f"warning: left out a damaged results part: {line}")
    return Loaded(runs=runs, steps=steps, verdicts=verdicts, manifests=dict(zip(names, manifests)),
                  dirs=dict(zip(names, dirs)), benches=benches, costs=costs, damaged=damage.parts)
