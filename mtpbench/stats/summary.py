"""Aggregates of the `runs` table shared by the sweep summary, the HTML report and the model card.

Words, used identically everywhere:
- acceptance at depth d (conditional): accepted at d / drafts that reached d (a draft reaches d when d-1 was accepted)
- survival to depth d: share of verify steps whose first d drafts were all accepted
- mean acceptance length tau: 1 + accepted drafts per verify step (tokens per target forward)
- acceptance rate: accepted drafts / drafted tokens
- speedup: per prompt, mean MTP decode tok/s / mean AR decode tok/s over repetitions; summarised by the geometric
  mean over prompts with a percentile bootstrap CI resampling prompts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

SETTING_KEYS = ["model", "policy", "backend", "setting"]


def wilson(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (NaNs when n == 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = st.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "ok"] if "status" in runs else runs


def acceptance_by_depth(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """One row per (group, k, depth): reached, accepted, conditional acceptance and survival with Wilson CIs."""
    by = by or SETTING_KEYS
    mtp = ok_runs(runs)
    mtp = mtp[(mtp["mode"] == "mtp") & mtp["accepted_at_depth"].map(lambda a: a is not None and len(a) > 0)]
    mtp = mtp[mtp["accepted_at_depth"].map(len) == mtp["k"]]
    rows = []
    for key, g in mtp.groupby(by + ["k"], dropna=False, sort=True):
        k = int(key[-1])
        steps = int(g["verify_steps"].sum())
        acc = np.sum(np.stack([np.asarray(a, dtype=np.int64) for a in g["accepted_at_depth"]]), axis=0)
        reached = np.concatenate([[steps], acc[:-1]])
        for d in range(k):
            lo, hi = wilson(acc[d], reached[d])
            slo, shi = wilson(acc[d], steps)
            rows.append({**dict(zip(by + ["k"], key)), "depth": d + 1, "verify_steps": steps,
                         "reached": int(reached[d]), "accepted": int(acc[d]),
                         "acceptance": acc[d] / reached[d] if reached[d] else np.nan, "acceptance_lo": lo,
                         "acceptance_hi": hi, "survival": acc[d] / steps if steps else np.nan,
                         "survival_lo": slo, "survival_hi": shi})
    return pd.DataFrame(rows)


def bootstrap_ci(values: np.ndarray, stat=np.mean, n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` over `values` (seeded, so reports are reproducible)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = np.array([stat(values[i]) for i in idx])
    a = (1 - confidence) / 2
    return float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def per_prompt_ratios(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per (group, k, prompt): mean AR and MTP decode tok/s over repetitions and their ratio (paired by prompt)."""
    by = by or SETTING_KEYS
    r = ok_runs(runs)
    r = r[np.isfinite(r["decode_tok_s"])]
    prompt_keys = ["prompt_set", "prompt_id", "thinking"]
    ar = r[r["mode"] == "ar"].groupby(by + prompt_keys, dropna=False)["decode_tok_s"].mean().rename("ar_tok_s")
    mtp = r[r["mode"] == "mtp"].groupby(by + ["k"] + prompt_keys + ["category"], dropna=False).agg(
        mtp_tok_s=("decode_tok_s", "mean"), tau=("mean_acceptance_length", "mean")).reset_index()
    out = mtp.merge(ar.reset_index(), on=by + prompt_keys, how="inner")
    out["ratio"] = out["mtp_tok_s"] / out["ar_tok_s"]
    return out


def speedup_table(runs: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (group, k): AR and MTP tok/s, geometric-mean speedup over prompts with a bootstrap CI, tau."""
    by = by or SETTING_KEYS
    pp = per_prompt_ratios(runs, by)
    rows = []
    for key, g in pp.groupby(by + ["k"], dropna=False, sort=True):
        ratios = g["ratio"].to_numpy()
        lo, hi = bootstrap_ci(ratios, geomean, seed=seed)
        rows.append({**dict(zip(by + ["k"], key)), "n_prompts": len(g), "ar_tok_s": g["ar_tok_s"].mean(),
                     "mtp_tok_s": g["mtp_tok_s"].mean(), "speedup": geomean(ratios), "speedup_lo": lo,
                     "speedup_hi": hi, "tau": g["tau"].mean()})
    return pd.DataFrame(rows)


def throughput_table(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Decode tok/s by mode and k: mean, std over runs, n; AR is k = 0."""
    by = by or SETTING_KEYS
    r = ok_runs(runs)
    g = r.groupby(by + ["mode", "k"], dropna=False, sort=True)
    out = g.agg(tok_s=("decode_tok_s", "mean"), tok_s_std=("decode_tok_s", "std"), runs=("run_id", "count"),
                tau=("mean_acceptance_length", "mean"), peak_memory_bytes=("peak_memory_bytes", "max"),
                prefill_s=("prefill_s", "mean")).reset_index()
    return out


def best_k(speedups: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The K with the highest speedup per group (the report's headline)."""
    by = by or SETTING_KEYS
    if speedups.empty:
        return speedups
    idx = speedups.groupby(by, dropna=False)["speedup"].idxmax()
    return speedups.loc[idx].reset_index(drop=True)
