"""Backends side by side: the reference decoder and server endpoints (tok/s, latency, speedup, survival).

Raw numbers come from mtpbench.stats.summary (speedup_table for the reference decoder's MTP over its own AR mode,
server_speedup_table for a server's MTP endpoint over its AR endpoint, acceptance_by_depth for survival); the
column specs below are shared by the HTML report and the model card, so both print the same strings.
"""

from __future__ import annotations

import pandas as pd

from ..stats import summary
from .. import fmt
from .present import Table, build, key_columns
from .tables import BY

ROW_KEYS = [*BY, "mode", "k", "concurrency"]
SERIES_KEYS = [k for k in BY if k != "setting"]  # one series per backend and every other key
OWN_AR = "own AR mode"


def n_backends(runs: pd.DataFrame) -> int:
    return 0 if runs.empty else int(runs["backend"].nunique(dropna=False))


def _rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with concurrency filled in (the reference decoder decodes one sequence at a time) and, on MTP rows,
    the draft positions (K, or what a server's counters cover; NaN when unknown)."""
    depth = summary.draft_depth(runs)
    return runs.assign(concurrency=runs["concurrency"].fillna(1).astype(int),
                       positions=depth.where((runs["mode"] == "mtp") & (depth > 0)))


def _speedups(runs: pd.DataFrame) -> pd.DataFrame:
    """The reference decoder's speedups (over its own AR mode, concurrency 1) and the server pairs, keyed like the
    comparison rows, with the baseline named."""
    cols = [*BY, "k", "concurrency", "baseline", "n_prompts", "speedup", "speedup_lo", "speedup_hi"]
    frames = []
    own = summary.speedup_table(runs, BY)
    if not own.empty:
        frames.append(own.assign(concurrency=1, baseline=OWN_AR)[cols])
    srv = summary.server_speedup_table(runs, BY)
    if not srv.empty:
        name = srv["baseline_backend"].astype(str)
        named = name.where(srv["baseline_model"] == srv["model"], name + " (" + srv["baseline_model"].astype(str) + ")")
        frames.append(srv.assign(baseline=named)[cols])
    if not frames:
        return pd.DataFrame(columns=[*cols, "mode"])
    out = pd.concat(frames, ignore_index=True)
    return out.assign(mode="mtp", concurrency=out["concurrency"].astype(int), k=out["k"].astype(int))


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, model, policy, backend, setting, mode, K, concurrency), with the speedup and baseline
    on MTP rows (one row per baseline when a server MTP endpoint has several). Latencies in seconds."""
    if runs.empty:
        return pd.DataFrame()
    r = _rows(runs)
    ok = r["status"] == "ok"
    counts = r.assign(ok=ok, failed=~ok).groupby(ROW_KEYS, dropna=False)[["ok", "failed"]].sum().reset_index()
    stats = r[ok].groupby(ROW_KEYS, dropna=False).agg(
        tok_s=("decode_tok_s", "mean"), ttft_p50_s=("ttft_s", "median"), itl_p50_s=("itl_p50_s", "median"),
        itl_p95_s=("itl_p95_s", "median"), positions=("positions", "max")).reset_index()
    out = counts.merge(stats, on=ROW_KEYS, how="left").merge(_speedups(runs), on=ROW_KEYS, how="left")
    out["server"] = out["backend"].isin(_servers(runs))  # the reference decoder first
    order = ["source", "model", "setting", "server", "concurrency", "mode", "backend", "policy", "k", "baseline"]
    return out.sort_values(order, kind="stable").reset_index(drop=True).drop(columns="server")


def _servers(runs: pd.DataFrame) -> set[str]:
    """Backends that are server endpoints (their rows record a concurrency; the reference decoder's do not)."""
    return set(runs.loc[runs["concurrency"].notna(), "backend"])


def _series(acc: pd.DataFrame) -> pd.Series:
    """A column name per (source, model, policy, backend): the backend, plus whichever of the others vary within
    one backend (all that vary if that is still ambiguous)."""
    others = [k for k in SERIES_KEYS if k != "backend"]
    within = [k for k in others if acc.groupby("backend")[k].nunique(dropna=False).max() > 1]
    n = len(acc[SERIES_KEYS].drop_duplicates())
    if len(acc[["backend", *within]].drop_duplicates()) < n:
        within = [k for k in others if acc[k].nunique(dropna=False) > 1]
    return acc[["backend", *within]].astype(str).agg(" · ".join, axis=1)


def survival(runs: pd.DataFrame) -> pd.DataFrame:
    """Survival by depth per series (a backend, see _series), reference decoder first, kept only for the settings
    and K that at least two series share: a server's positions against the reference decoder's K."""
    acc = summary.acceptance_by_depth(runs, BY)
    if acc.empty:
        return acc
    acc = acc.assign(series=_series(acc), server=acc["backend"].isin(_servers(runs)))
    acc = acc[acc.groupby(["setting", "k"])["series"].transform("nunique") > 1]
    cols = ["setting", "k", "depth", "series", *SERIES_KEYS, "verify_steps", "accepted", "survival", "survival_lo",
            "survival_hi"]
    return acc.sort_values(["server", "setting", "k", "depth"], kind="stable")[cols].reset_index(drop=True)


# ---- display (HTML and card) -----------------------------------------------------------------------------------

def _ms(x) -> str:
    return fmt.DASH if fmt._bad(x) else fmt.num(1e3 * float(x), 1)


def _speedup(r) -> str:
    if r["mode"] == "ar":
        return "1.00× (baseline)"
    return fmt.with_ci(r.get("speedup"), r.get("speedup_lo"), r.get("speedup_hi"), fmt.ratio)


def _baseline(r) -> str:
    return fmt.DASH if r["mode"] == "ar" else fmt.text(r.get("baseline"))


COLUMNS = [
    ("Mode", lambda r: "AR" if r["mode"] == "ar" else "MTP", False),
    ("K", lambda r: fmt.integer(r["positions"]) if r["mode"] == "mtp" else fmt.DASH, True),
    ("Concurrency", lambda r: fmt.integer(r["concurrency"]), True),
    ("Decode tok/s", lambda r: fmt.tok_s(r["tok_s"]), True),
    ("TTFT p50 ms", lambda r: _ms(r["ttft_p50_s"]), True),
    ("ITL p50 ms", lambda r: _ms(r["itl_p50_s"]), True),
    ("ITL p95 ms", lambda r: _ms(r["itl_p95_s"]), True),
    ("Runs ok / failed", lambda r: f"{fmt.integer(r['ok'])} / {fmt.integer(r['failed'])}", True),
    ("Speedup over AR [95% CI]", _speedup, True),
    ("AR baseline", _baseline, False),
    ("Prompts", lambda r: fmt.integer(r.get("n_prompts")), True),
]
CAPTION = "Backends side by side"


def comparison_table(df: pd.DataFrame, keys: list[str]) -> Table:
    """The comparison as a display table, led by the group `keys` shown (always including the backend)."""
    return build(df, key_columns([k for k in BY if k in keys or k == "backend"]) + COLUMNS, caption=CAPTION)


def survival_table(df: pd.DataFrame) -> Table:
    """Survival to each depth with its Wilson 95% CI, one column per series, rows (setting, K, depth)."""
    caption = "Survival by draft position, side by side (share of drafts whose first d positions were all accepted)"
    if df.empty:
        return Table([], [], [], caption)
    series = list(dict.fromkeys(df["series"]))
    rows = []
    for (setting, k, depth), g in df.groupby(["setting", "k", "depth"], sort=True):
        by = {r["series"]: r for _, r in g.iterrows()}
        rows.append([fmt.text(setting), fmt.integer(k), fmt.integer(depth)]
                    + [fmt.with_ci(by[s]["survival"], by[s]["survival_lo"], by[s]["survival_hi"]) if s in by
                       else fmt.DASH for s in series])
    return Table(["Setting", "K", "Depth"] + series, rows, [False, True, True] + [True] * len(series), caption)

