"""The report's and the card's tables, built once from mtpbench.stats.summary so both always agree.

Each function takes merged frames (see load.py) and returns a plain DataFrame of raw numbers grouped by
GROUP_KEYS; formatting happens later (fmt.py), so the HTML page and the markdown card print the same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stats import summary
from ..stats.acceptance import bandwidth_bound_speedup, iid_expected_tokens
from ..stats.fdr import fdr_adjust
from ..stats.sweep_verdicts import NOT_TESTS
from ..sweep.axes import COMPARED
from .load import GROUP_KEYS, MISSING, Loaded

BY = GROUP_KEYS
VERIFY_HINT = "mtpbench verify --out DIR"  # what to run when a cell has no preservation test
PROVENANCE_FIELDS = ["host", "device", "os", "python", "blas", "mtpbench_version", "mlx_version",
                     "mlx_lm_version", "git_sha"]
SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "draft_temperature", "max_tokens", "thinking"]


def ok_mtp(runs: pd.DataFrame) -> pd.DataFrame:
    r = summary.ok_runs(runs)
    return r[r["mode"] == "mtp"]


def ok_ar(runs: pd.DataFrame) -> pd.DataFrame:
    r = summary.ok_runs(runs)
    return r[r["mode"] == "ar"]


def failed(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not finish ('status' != 'ok'): excluded from every aggregate, but counted and shown."""
    return runs[runs["status"] != "ok"] if not runs.empty else runs


def mode_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Decode tok/s per (group, mode, K) with the paired speedup and its CI on the MTP rows (AR is K = 0)."""
    tp = summary.throughput_table(runs, BY)
    if tp.empty:
        return tp
    sp = summary.speedup_table(runs, BY)
    if not sp.empty:
        sp = sp.rename(columns={"tau": "tau_prompts"}).drop(columns=["ar_tok_s", "mtp_tok_s"]).assign(mode="mtp")
        tp = tp.merge(sp, on=[*BY, "mode", "k"], how="left")
    else:
        tp = tp.assign(n_prompts=np.nan, speedup=np.nan, speedup_lo=np.nan, speedup_hi=np.nan)
    tp["k"] = tp["k"].astype(int)
    return tp.sort_values([*BY, "k"], kind="stable").reset_index(drop=True)


def headline(runs: pd.DataFrame) -> pd.DataFrame:
    """Best K per group, chosen and estimated honestly (summary.honest_best_k: a prompt split, `method` says
    which), with the AR and MTP tok/s of mode_table."""
    best = summary.honest_best_k(runs, BY)
    if best.empty:
        return best
    modes = mode_table(runs)
    ar = modes[modes["mode"] == "ar"][[*BY, "tok_s"]].rename(columns={"tok_s": "ar_tok_s_runs"})
    mtp = modes[modes["mode"] == "mtp"][[*BY, "k", "tok_s"]].rename(columns={"tok_s": "mtp_tok_s_runs"})
    best = best.drop(columns=["ar_tok_s", "mtp_tok_s"]).merge(ar, on=BY, how="left").merge(mtp, on=[*BY, "k"],
                                                                                            how="left")
    return best.rename(columns={"ar_tok_s_runs": "ar_tok_s", "mtp_tok_s_runs": "mtp_tok_s"})


def acceptance(runs: pd.DataFrame) -> pd.DataFrame:
    """Acceptance and survival by depth with Wilson CIs (summary.acceptance_by_depth)."""
    return summary.acceptance_by_depth(runs, BY)


def tau_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Measured tau per K against the i.i.d. prediction (1 - a^(K+1)) / (1 - a), a = depth-1 acceptance.

    Measured tau here is pooled, 1 + sum(accepted) / sum(verify steps) = 1 + sum over depths of survival, i.e.
    the same counts the acceptance table shows.
    """
    acc = acceptance(runs)
    if acc.empty:
        return acc
    rows = []
    for key, g in acc.groupby([*BY, "k"], dropna=False, sort=True):
        k = int(key[-1])
        a = float(g.loc[g["depth"] == 1, "acceptance"].iloc[0])
        rows.append({**dict(zip([*BY, "k"], key)), "a1": a, "tau": 1 + float(g["survival"].sum()),
                     "tau_iid": iid_expected_tokens(a, k),
                     "verify_steps": int(g["verify_steps"].iloc[0])})
    out = pd.DataFrame(rows)
    out["tau_ratio"] = out["tau"] / out["tau_iid"]
    return out


def _cost_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Seconds per AR token and per MTP verify step, pooled over ok runs (ratios of sums, robust to short runs)."""
    ar = ok_ar(runs).assign(tokens=lambda d: (d["generated_tokens"] - 1).clip(lower=0))
    ar = ar.groupby(BY, dropna=False)[["decode_s", "tokens"]].sum().reset_index()
    ar["ar_s_per_token"] = ar["decode_s"] / ar["tokens"].where(ar["tokens"] > 0)
    mtp = ok_mtp(runs).groupby([*BY, "k"], dropna=False)[["decode_s", "verify_steps"]].sum().reset_index()
    mtp["mtp_s_per_step"] = mtp["decode_s"] / mtp["verify_steps"].where(mtp["verify_steps"] > 0)
    return mtp[[*BY, "k", "mtp_s_per_step"]].merge(ar[[*BY, "ar_s_per_token"]], on=BY, how="inner")


def efficiency(runs: pd.DataFrame) -> pd.DataFrame:
    """Predicted speedup tau / c, c = (MTP s per verify step) / (AR s per token); efficiency = realized / predicted."""
    tau = tau_table(runs)
    sp = summary.speedup_table(runs, BY)
    if tau.empty or sp.empty or ok_ar(runs).empty:
        return pd.DataFrame()
    out = _cost_rows(runs).merge(tau[[*BY, "k", "tau"]], on=[*BY, "k"], how="inner")
    out = out.merge(sp[[*BY, "k", "speedup", "speedup_lo", "speedup_hi"]], on=[*BY, "k"], how="inner")
    out["cost_ratio"] = out["mtp_s_per_step"] / out["ar_s_per_token"]
    out["predicted"] = out["tau"] / out["cost_ratio"]
    out["efficiency"] = out["speedup"] / out["predicted"]
    return out.sort_values([*BY, "k"], kind="stable").reset_index(drop=True)


def with_bandwidth_projection(eff: pd.DataFrame, runs: pd.DataFrame, shares: dict[str, float]) -> pd.DataFrame:
    """`efficiency` rows plus `projected_bw`, the bandwidth-bound projection of their tau (NaN where no bench of the
    checkpoint gives its draft share): see `stats.acceptance.bandwidth_bound_speedup`."""
    if eff.empty or "model_fingerprint" not in runs:
        return eff.assign(projected_bw=np.nan)
    fps = runs.groupby(BY, dropna=False)["model_fingerprint"].agg(lambda s: s.dropna().iloc[0] if s.notna().any()
                                                                  else None).rename("fp").reset_index()
    out = eff.merge(fps, on=BY, how="left")
    share = out["fp"].map(lambda f: shares.get(f, np.nan))
    out["projected_bw"] = [bandwidth_bound_speedup(t, int(k), s) for t, k, s in zip(out["tau"], out["k"], share)]
    return out.drop(columns="fp")


CONTEXT = "context"  # the context-bucket axis column (sweep/axes.py): 0 = the prompt sets' own prompts


def has_context(runs: pd.DataFrame) -> bool:
    """Whether these runs measured context buckets (any bucket, or more than one context value)."""
    if runs.empty or CONTEXT not in runs:
        return False
    c = pd.to_numeric(runs[CONTEXT], errors="coerce")
    return bool((c.fillna(0) > 0).any() or c.nunique(dropna=False) > 1)


def context_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (group, K) at each context: acceptance by depth, tau, the paired speedup, the cost ratio c, TTFT and
    peak memory of AR and MTP, prompt tokens and KV-cache bytes per step; and, against the group's shortest
    context, the split of the speedup change into acceptance and cost.

    With c = (MTP s per verify step) / (AR s per token), the cost model predicts speedup = tau / c, so between a
    context b and the shortest a: S_b / S_a = (tau_b / tau_a) x (c_a / c_b) x residual. `acceptance_factor` is
    tau_b / tau_a (acceptance fell if < 1), `cost_factor` is c_a / c_b (a verify step got dearer relative to an
    AR token if < 1), and `residual` is what neither explains (the realized speedup's efficiency changing)."""
    eff = efficiency(runs)
    if eff.empty or not has_context(runs):
        return pd.DataFrame()
    ok = summary.ok_runs(runs)
    ar, mtp = ok[ok["mode"] == "ar"], ok[ok["mode"] == "mtp"]
    agg = {"ttft_s": "mean", "peak_memory_bytes": "max", "kv_bytes_per_step": "mean"}
    agg = {c: f for c, f in agg.items() if c in ok}
    ar_cols = ar.groupby(BY, dropna=False).agg(agg | {"prompt_tokens": "mean"}).reset_index()
    ar_cols = ar_cols.rename(columns={c: f"ar_{c}" for c in [*agg, "prompt_tokens"]})
    mtp_cols = mtp.groupby([*BY, "k"], dropna=False).agg(agg).reset_index().rename(columns={c: f"mtp_{c}" for c in agg})
    out = eff.merge(ar_cols, on=BY, how="left").merge(mtp_cols, on=[*BY, "k"], how="left")
    acc = acceptance(runs)
    if not acc.empty:
        depth = acc.sort_values("depth").groupby([*BY, "k"], dropna=False)["acceptance"].agg(list).reset_index()
        out = out.merge(depth.rename(columns={"acceptance": "acceptance_by_depth"}), on=[*BY, "k"], how="left")
    out["_ctx"] = pd.to_numeric(out[CONTEXT], errors="coerce").fillna(0)
    others = [k for k in BY if k != CONTEXT]
    out = out.sort_values([*others, "k", "_ctx"], kind="stable")
    first = out.groupby([*others, "k"], dropna=False)[["speedup", "tau", "cost_ratio"]].transform("first")
    out["speedup_change"] = out["speedup"] / first["speedup"]
    out["acceptance_factor"] = out["tau"] / first["tau"]
    out["cost_factor"] = first["cost_ratio"] / out["cost_ratio"]
    out["residual"] = out["speedup_change"] / (out["acceptance_factor"] * out["cost_factor"])
    return out.drop(columns="_ctx").reset_index(drop=True)


def categories(runs: pd.DataFrame) -> pd.DataFrame:
    """Per prompt category: geometric-mean speedup with a bootstrap CI over prompts, and depth-1 acceptance."""
    pp = summary.per_prompt_ratios(runs, BY)
    if pp.empty:
        return pd.DataFrame()
    rows = []
    for key, g in pp.groupby([*BY, "k", "category"], dropna=False, sort=True):
        ratios = g["ratio"].to_numpy()
        lo, hi = summary.bootstrap_ci(ratios, summary.geomean)
        rows.append({**dict(zip([*BY, "k", "category"], key)), "n_prompts": len(g),
                     "speedup": summary.geomean(ratios), "speedup_lo": lo, "speedup_hi": hi})
    out = pd.DataFrame(rows)
    acc = summary.acceptance_by_depth(runs, [*BY, "category"])
    if not acc.empty:
        acc = acc[acc["depth"] == 1][[*BY, "category", "k", "acceptance", "acceptance_lo", "acceptance_hi"]]
        out = out.merge(acc, on=[*BY, "k", "category"], how="left")
    return out


def compared_columns(runs: pd.DataFrame) -> list[str]:
    """The compared axes (policy, KV-cache bits, ...) that take more than one value in these runs."""
    if runs.empty:
        return []
    return [a.column for a in COMPARED if a.column in runs and runs[a.column].nunique(dropna=False) > 1]


def comparison(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The values of one axis side by side: tok/s, speedup over AR, depth-1 acceptance and peak memory per
    (cell, K), and each value's paired tok/s ratio over the first value (same prompts, settings and K)."""
    modes = mode_table(runs)
    if modes.empty:
        return modes
    acc = acceptance(runs)
    if not acc.empty:
        acc = acc[acc["depth"] == 1][[*BY, "k", "acceptance", "acceptance_lo", "acceptance_hi"]]
        modes = modes.merge(acc, on=[*BY, "k"], how="left")
    ratios = summary.axis_ratio_table(runs, column, BY)
    if not ratios.empty:
        modes = modes.merge(ratios.drop(columns="n_prompts"), on=[*BY, "mode", "k"], how="left")
    order = [c for c in ["model", "backend", "setting", "k", "mode"] + BY if c != column] + [column]
    return modes.sort_values(list(dict.fromkeys(order)), kind="stable").reset_index(drop=True)


def position(runs: pd.DataFrame, steps: pd.DataFrame, n_bins: int = 8) -> pd.DataFrame:
    """Depth-1 acceptance against the verify-step index, in ~n_bins equal-width bins shared by every group."""
    if steps.empty or runs.empty:
        return pd.DataFrame()
    d1 = steps[steps["depth"] == 1][["source", "run_id", "step", "accepted"]]
    d1 = d1.merge(ok_mtp(runs)[["source", "run_id", *[k for k in BY if k != "source"], "k"]],
                  on=["source", "run_id"], how="inner")
    if d1.empty:
        return pd.DataFrame()
    edges = np.unique(np.linspace(0, int(d1["step"].max()) + 1, n_bins + 1).round().astype(int))
    d1 = d1.assign(bin=np.searchsorted(edges, d1["step"].to_numpy(), side="right") - 1)
    rows = []
    for key, g in d1.groupby([*BY, "k", "bin"], dropna=False, sort=True):
        b = int(key[-1])
        n, acc = len(g), int(g["accepted"].sum())
        lo, hi = summary.wilson(acc, n)
        rows.append({**dict(zip([*BY, "k"], key[:-1])), "bin": b, "step_lo": int(edges[b]),
                     "step_hi": int(edges[b + 1]) - 1, "n": n, "accepted": acc, "acceptance": acc / n,
                     "acceptance_lo": lo, "acceptance_hi": hi})
    return pd.DataFrame(rows)


def is_control(v: pd.DataFrame) -> pd.Series:
    c = v["control"].astype(object)
    return c.notna() & ~c.isin(["", "none", MISSING])


def verdict_rows(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdicts table as stored, sorted, with a boolean for negative/positive control rows."""
    if verdicts.empty:
        return verdicts.assign(is_control=pd.Series(dtype=bool))
    v = verdicts.assign(is_control=is_control(verdicts))
    return v.sort_values(["is_control", *BY, "k", "test"], kind="stable").reset_index(drop=True)


def cell_verdicts(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per tested cell (controls excluded): number of tests, which ones, and whether any rejected."""
    v = verdict_rows(verdicts)
    v = v[~v["is_control"]] if not v.empty else v
    if v.empty:
        return pd.DataFrame()
    rows = []
    for key, g in v.groupby([*BY, "k"], dropna=False, sort=True):
        drift, audit, oracle = g[g["test"] == "drift"], g[g["test"] == "audit"], g[g["test"] == "oracle"]
        g = g[~g["test"].isin(NOT_TESTS)]  # measurements beside the tests, not tests
        if g.empty:  # e.g. a server cell none of whose runs could be audited: untested, never "not rejected"
            continue
        family = g.get("family", pd.Series("preservation", index=g.index)).fillna("preservation")
        notes = g["note"].fillna("") if "note" in g else pd.Series("", index=g.index)
        rows.append({**dict(zip([*BY, "k"], key)), "tests": len(g), "names": ", ".join(sorted(set(g["test"]))),
                     # only the preservation family decides the verdict; acceptance calibration and the
                     # diagnostics (decoder-row PIT/score, drift) are reported with the tests but an
                     # unbiased-yet-suboptimal rule must not read as "not preserving"
                     "rejected": int((g["rejected"].fillna(False).astype(bool) & (family == "preservation")).sum()),
                     "min_p_holm": float(g.loc[family == "preservation", "p_holm"].min()),
                     "max_n": int(g["n"].max()),
                     "drift_tv": float(drift["statistic"].iloc[0]) if len(drift) else float("nan"),
                     "audit": str(audit["note"].iloc[0]) if len(audit) else "",  # a server: profile, assumption
                     "blind": bool(notes.str.contains("could not see rule errors").any()),
                     # the fresh target disagreed with the independent oracle: the verdict is not the decoder's
                     "instrument": str(oracle["note"].iloc[0]) if len(oracle) and oracle["statistic"].iloc[0] > 0
                     else ""})
    out = pd.DataFrame(rows)
    # the sweep-wide statement's second verdict: each cell's smallest Holm p, FDR-adjusted across the cells shown
    return out.assign(q_fdr=fdr_adjust(out["min_p_holm"])) if len(out) else out


def untested_cells(runs: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """MTP cells that were benchmarked but have no preservation test row: never implied to preserve anything."""
    cells = ok_mtp(runs)[[*BY, "k"]].drop_duplicates()
    tested = cell_verdicts(verdicts)
    if cells.empty or tested.empty:
        return cells.reset_index(drop=True)
    keys = [k for k in BY if k != "source"] + ["k"]
    tested = tested[keys].astype({k: cells[k].dtype for k in keys})  # rebuilt from dicts: key types realigned
    merged = cells.merge(tested.drop_duplicates().assign(_t=1), on=keys, how="left")
    return merged[merged["_t"].isna()].drop(columns="_t").reset_index(drop=True)


def _first(values: pd.Series) -> Any:
    """The first recorded value (a server's rows leave e.g. draft_temperature empty; the reference's fill it)."""
    known = values.dropna()
    return known.iloc[0] if len(known) else values.iloc[0]


def sampling(runs: pd.DataFrame) -> pd.DataFrame:
    """Distinct sampling settings per setting label, with prompt and repetition counts."""
    r = summary.ok_runs(runs)
    if r.empty:
        return pd.DataFrame()
    rows = []
    for key, g in r.groupby(["source", "model", "setting"], dropna=False, sort=True):
        rows.append({"source": key[0], "model": key[1], "setting": key[2],
                     **{f: _first(g[f]) for f in SAMPLING_FIELDS},
                     "prompt_sets": ", ".join(sorted(set(map(str, g["prompt_set"].dropna())))),
                     "prompts": int(g[["prompt_set", "prompt_id"]].drop_duplicates().shape[0]),
                     "repetitions": int(g["repetition"].nunique())})
    return pd.DataFrame(rows)


def _distinct(values: pd.Series) -> str:
    vals = sorted({str(v) for v in values.dropna() if str(v) != ""})
    return ", ".join(vals)


def provenance(data: Loaded) -> dict[str, list[dict[str, str]]]:
    """Per source: field -> manifest value and the distinct values the runs recorded (they should agree)."""
    out: dict[str, list[dict[str, str]]] = {}
    for source, manifest in data.manifests.items():
        prov: dict[str, Any] = manifest.get("provenance") or {}
        runs = data.runs[data.runs["source"] == source] if not data.runs.empty else data.runs
        fields = PROVENANCE_FIELDS + [f for f in prov if f not in PROVENANCE_FIELDS]
        rows = [{"field": f, "manifest": str(prov.get(f, "")),
                 "runs": _distinct(runs[f]) if f in runs else ""} for f in fields]
        if "started_at" in runs and runs["started_at"].notna().any():
            started = runs["started_at"].dropna().astype(str)
            rows.append({"field": "runs started", "manifest": "", "runs": f"{started.min()} … {started.max()}"})
        out[source] = rows
    return out


def group_label(row: pd.Series | dict, keys: list[str]) -> str:
    """A short legend label from the group keys that actually vary."""
    parts = [str(row[k]) for k in keys if k in row]
    return " · ".join(parts) if parts else str(row.get("model", ""))


def varying(df: pd.DataFrame, keys: list[str] = BY) -> list[str]:
    """Group keys with more than one value in `df` (the ones worth naming in a legend or a column)."""
    if df.empty:
        return []
    out = [k for k in keys if k in df and df[k].nunique(dropna=False) > 1]
    return out or ["model"]
