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


def has_server(runs: pd.DataFrame) -> bool:
    return not runs.empty and bool(_servers(runs))


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



# ---- one runtime table: speed (which clock), speedup, acceptance by depth, rule efficiency, exactness, profile ----

EFFICIENT_FLOOR = 0.9  # an efficiency interval wholly below this: the rule keeps clearly fewer drafts than optimal
INEFFICIENT = "exact but inefficient: keeps fewer drafts than the optimal rule (a sample-match-like rule)"
IMPOSSIBLE = "impossible for an exact rule: accepts more than alpha allows"
REFERENCE_PROFILE = "mlx"  # the reference decoder's transform (sampling.SamplingConfig's default order)
RUNTIME_KEYS = [*BY, "mode", "k"]


def _efficiency_fields(accepted: float, drafts: float, alpha: float) -> dict:
    lo, hi = summary.wilson(accepted, drafts)
    eff, eff_lo, eff_hi = accepted / drafts / alpha, lo / alpha, hi / alpha
    flag = IMPOSSIBLE if eff_lo > 1 else INEFFICIENT if eff_hi < EFFICIENT_FLOOR else ""
    return {"acceptance_d1": accepted / drafts, "alpha": alpha, "efficiency": eff, "efficiency_lo": eff_lo,
            "efficiency_hi": eff_hi, "efficiency_flag": flag}


def reference_efficiency(g: pd.DataFrame, steps: pd.DataFrame | None) -> dict:
    """The reference decoder's own rule efficiency, from its steps records: depth-1 acceptance over the mean
    alpha of the same steps (the exact rule's expectation: ~1 by construction, a check of the figure itself)."""
    if steps is None or steps.empty or not {"run_id", "depth", "accepted", "alpha"} <= set(steps):
        return {}
    s = steps[steps["run_id"].isin(set(g["run_id"])) & (steps["depth"] == 1)]
    s = s[s["alpha"].notna()]
    if s.empty or not s["alpha"].mean() > 0:
        return {}
    return _efficiency_fields(float(s["accepted"].sum()), float(len(s)), float(s["alpha"].mean()))


def rule_efficiency(g: pd.DataFrame) -> dict:
    """A server's depth-1 acceptance (its counters: accepted at position 0 over drafts) against the mean
    teacher-forced alpha of the local checkpoint's MTP head over its audited runs (what the exact optimal rule
    accepts there): the efficiency of its rule, with the Wilson 95% interval of the acceptance divided by alpha
    (alpha's own spread is small beside it: hundreds of positions). ~1: the optimal rule; well below 1 with an exact
    verdict: exact but wasteful (keeping a draft only when it equals the target's own sample accepts sum p q, near
    alpha^2 where rows are flat); above 1: no exact rule can accept that much."""
    both = g[g["audit_alpha_positions"].fillna(0).gt(0) & g["verify_steps"].fillna(0).gt(0)
             & g["accepted_at_depth"].map(lambda a: a is not None and len(a) > 0)] \
        if {"audit_alpha_positions", "verify_steps", "accepted_at_depth"} <= set(g) else g.iloc[:0]
    if both.empty:
        return {}
    drafts = float(both["verify_steps"].sum())
    accepted = float(both["accepted_at_depth"].map(lambda a: a[0]).sum())
    alpha = float(both["audit_alpha_sum"].sum() / both["audit_alpha_positions"].sum())
    return _efficiency_fields(accepted, drafts, alpha) if alpha > 0 else {}


def _clock(g: pd.DataFrame, server: bool) -> str:
    if not server:
        return "reference decoder's own clock"
    clocks = g["decode_clock"].dropna() if "decode_clock" in g else pd.Series(dtype=str)
    bursts = int(g["client_burst"].fillna(False).astype(bool).sum()) if "client_burst" in g else 0
    name = "server (timings)" if (clocks == "server").all() and len(clocks) else \
        "client (median of arrival windows)" if len(clocks) else "client (mean)"
    return name + (f"; {bursts} run(s) read in a burst" if bursts else "")


def _exactness(verdicts: pd.DataFrame, key: dict) -> str:
    """The cell's preservation verdict: rejected by N of M tests, passes M tests, or not tested."""
    if verdicts.empty:
        return "not tested"
    v = verdicts
    for c in ("backend", "setting", "model"):
        if c in v and c in key:
            v = v[v[c].astype(str) == str(key[c])]
    if "k" in v and key.get("mode") == "mtp" and key.get("k"):
        v = v[v["k"] == key["k"]]
    fam = v.get("family", pd.Series("preservation", index=v.index)).fillna("preservation")
    v = v[(fam == "preservation") & ~v["test"].isin(["audit", "drift"])] if "test" in v else v.iloc[:0]
    if v.empty:
        return "not tested"
    rejected = int(v["rejected"].fillna(False).astype(bool).sum())
    return f"rejected by {rejected} of {len(v)} tests" if rejected else f"passes {len(v)} tests"


def runtimes(runs: pd.DataFrame, verdicts: pd.DataFrame | None = None,
             steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per runtime (the reference decoder per mode and K, each server endpoint) and setting, at
    concurrency 1: decode tok/s and which clock, speedup over its own AR, acceptance by depth, rule efficiency
    (servers: `rule_efficiency`; the reference decoder: `reference_efficiency` from its steps), exactness and
    profile."""
    if not has_server(runs):
        return pd.DataFrame()
    verdicts = verdicts if verdicts is not None else pd.DataFrame()
    r = _rows(runs)
    r = r[(r["status"] == "ok") & (r["concurrency"] == 1)]
    servers = _servers(runs)
    acc = summary.acceptance_by_depth(runs[runs["concurrency"].fillna(1) == 1], BY)
    speed = _speedups(runs)
    out = []
    for key, g in r.groupby(RUNTIME_KEYS, dropna=False, sort=True):
        k = dict(zip(RUNTIME_KEYS, key))
        server = k["backend"] in servers
        row = {**k, "runtime": k["backend"], "tok_s": float(g["decode_tok_s"].mean()), "clock": _clock(g, server),
               "runs": len(g)}
        profiles = g["audit_profile"].dropna().unique() if "audit_profile" in g else []
        row["profile"] = ", ".join(map(str, profiles)) if server else REFERENCE_PROFILE
        if k["mode"] == "mtp":
            positions = int(summary.draft_depth(g).max()) if len(g) else 0
            a = acc[(acc["backend"] == k["backend"]) & (acc["setting"] == k["setting"]) & (acc["k"] == positions)] \
                if not acc.empty else acc
            row["acceptance"] = tuple(a.sort_values("depth")["survival"]) if len(a) else ()
            s = speed[(speed["backend"] == k["backend"]) & (speed["setting"] == k["setting"])
                      & (speed["k"] == k["k"])] if not speed.empty else speed
            if len(s):
                row.update(speedup=s["speedup"].iloc[0], speedup_lo=s["speedup_lo"].iloc[0],
                           speedup_hi=s["speedup_hi"].iloc[0], baseline=s["baseline"].iloc[0])
            row.update(rule_efficiency(g) if server else reference_efficiency(g, steps))
        row["exactness"] = _exactness(verdicts, k)
        out.append(row)
    return pd.DataFrame(out)


def _efficiency(r) -> str:
    if fmt._bad(r.get("efficiency")):
        return fmt.DASH
    text = fmt.with_ci(r.get("efficiency"), r.get("efficiency_lo"), r.get("efficiency_hi"), fmt.ratio)
    return text + (f" — {r['efficiency_flag']}" if r.get("efficiency_flag") else "")


def _acceptance(r) -> str:
    values = r.get("acceptance")
    if not isinstance(values, (tuple, list)) or not len(values):
        return fmt.DASH
    return " · ".join(f"d{i + 1} {fmt.rate(v)}" for i, v in enumerate(values))


RUNTIME_COLUMNS = [
    ("Runtime", lambda r: fmt.text(r["runtime"]), False),
    ("Setting", lambda r: fmt.text(r["setting"]), False),
    ("Mode", lambda r: "AR" if r["mode"] == "ar" else f"MTP K={fmt.integer(r['k'])}" if r["k"] else "MTP", False),
    ("Decode tok/s", lambda r: fmt.tok_s(r["tok_s"]), True),
    ("Clock", lambda r: fmt.text(r["clock"]), False),
    ("Speedup over its own AR [95% CI]", lambda r: _speedup(r) if r["mode"] == "mtp" and not fmt._bad(
        r.get("speedup")) else ("1.00× (baseline)" if r["mode"] == "ar" else fmt.DASH), True),
    ("Survival by depth", _acceptance, False),
    ("Rule efficiency [95% CI]", _efficiency, False),
    ("Exactness", lambda r: fmt.text(r["exactness"]), False),
    ("Profile", lambda r: fmt.text(r["profile"]), False),
]
RUNTIME_CAPTION = ("Runtimes side by side (concurrency 1): decode speed and the clock it was read on, speedup over "
                   "the runtime's own AR, survival by draft depth, rule efficiency (depth-1 acceptance over the "
                   "teacher-forced alpha of the local MTP head), exactness verdict and the sampling profile audited")


def runtime_table(df: pd.DataFrame) -> Table:
    return build(df, RUNTIME_COLUMNS, caption=RUNTIME_CAPTION)
