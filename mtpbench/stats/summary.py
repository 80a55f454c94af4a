"""Aggregates of the `runs` table shared by the sweep summary, the HTML report and the model card.

Words, used identically everywhere:
- acceptance at depth d (conditional): accepted at d / drafts that reached d (`decode.counts`: drafted, verified,
  every earlier draft of its step accepted and emitted; the steps table's rows at depth d)
- survival to depth d: share of verify steps whose first d drafts were all accepted
- mean acceptance length tau: 1 + accepted drafts per verify step (tokens per target forward)
- acceptance rate: accepted drafts / drafted tokens
- speedup: per prompt, mean MTP decode tok/s / mean AR decode tok/s over repetitions; summarised by the geometric
  mean over prompts with a percentile bootstrap CI resampling prompts.
- draft depth K: the reference decoder records it in `k`; a server endpoint records k = 0 (the client cannot set
  it), and its depth is the number of positions its speculative counters cover (len(accepted_at_depth)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from ..decode.counts import reached_by_depth
from ..sweep.axes import GROUP_KEYS

SETTING_KEYS = GROUP_KEYS  # every aggregate groups by the axes table's grouping keys
# What the acceptance and survival intervals are (acceptance_by_depth), in the words every page prints.
INTERVAL_LABEL = ("95% intervals: the wider of the Wilson interval on the counts pooled over runs and a percentile "
                  "bootstrap resampling prompts (steps within a sequence are not independent); greedy repetitions "
                  "count once")


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


def draft_depth(runs: pd.DataFrame) -> pd.Series:
    """Each row's draft depth: `k`, or for a row recorded with k = 0 (a server endpoint) the number of positions
    its accepted_at_depth counters cover (0 when it has none)."""
    positions = runs["accepted_at_depth"].map(lambda a: len(a) if hasattr(a, "__len__") else 0)
    k = runs["k"].fillna(0)
    return k.where(k != 0, positions).astype(int)


def acceptance_by_depth(runs: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (group, k, depth): reached, accepted, conditional acceptance and survival with 95% intervals.

    Counts the reference decoder's MTP rows and server rows with speculative counters alike (k = draft_depth):
    vLLM accepts draft position i only if positions < i were accepted, so its accepted-per-position counts are the
    same chain as the reference's accepted-at-depth and a server drafting 3 positions compares with K = 3.

    Intervals respect clustering (shared/STATS.md, 7): steps within one sequence are not independent, so each
    interval spans both the Wilson interval of the counts and a percentile bootstrap that resamples prompts
    (`prompt_clusters` of them); greedy repetitions are copies of one output and count once (`repeats_dropped`).
    """
    by = by or SETTING_KEYS
    mtp = ok_runs(runs)
    mtp = mtp[(mtp["mode"] == "mtp") & mtp["accepted_at_depth"].map(lambda a: a is not None and len(a) > 0)]
    mtp = mtp[mtp["verify_steps"].notna()]
    mtp = mtp.assign(k=draft_depth(mtp))
    mtp = mtp[mtp["accepted_at_depth"].map(len) == mtp["k"]]
    cluster = "prompt_digest" if "prompt_digest" in mtp else "prompt_id" if "prompt_id" in mtp else None
    rows = []
    for key, g in mtp.groupby(by + ["k"], dropna=False, sort=True):
        k = int(key[-1])
        n_runs = len(g)
        if cluster and "temperature" in g and (g["temperature"] == 0).all():
            g = g.drop_duplicates([cluster, "output_hash"] if "output_hash" in g else [cluster])
        acc_runs = np.stack([np.asarray(a, dtype=np.int64) for a in g["accepted_at_depth"]])
        steps_runs = g["verify_steps"].to_numpy(dtype=np.int64)
        reached_runs = _reached_runs(g)
        steps = int(steps_runs.sum())
        acc = acc_runs.sum(axis=0)
        reached = reached_runs.sum(axis=0)
        labels = g[cluster].to_numpy() if cluster else np.arange(len(g))
        boot = _cluster_bootstrap(labels, acc_runs, steps_runs, reached_runs, seed)
        for d in range(k):
            lo, hi = wilson(acc[d], reached[d])
            slo, shi = wilson(acc[d], steps)
            if boot is not None:
                (blo, bhi), (bslo, bshi) = boot[d]
                lo, hi, slo, shi = min(lo, blo), max(hi, bhi), min(slo, bslo), max(shi, bshi)
            rows.append({**dict(zip(by + ["k"], key)), "depth": d + 1, "verify_steps": steps,
                         "reached": int(reached[d]), "accepted": int(acc[d]),
                         "acceptance": acc[d] / reached[d] if reached[d] else np.nan, "acceptance_lo": lo,
                         "acceptance_hi": hi, "survival": acc[d] / steps if steps else np.nan,
                         "survival_lo": slo, "survival_hi": shi, "prompt_clusters": len(set(labels)),
                         "repeats_dropped": n_runs - len(g)})
    return pd.DataFrame(rows)


def _reached_runs(g: pd.DataFrame) -> np.ndarray:
    """(runs, K) drafts that reached each depth, by the one definition (`decode.counts.reached_by_depth`)."""
    recorded = g["reached_at_depth"] if "reached_at_depth" in g else pd.Series([None] * len(g), index=g.index)
    return np.stack([np.asarray(reached_by_depth(int(s), list(a), None if r is None or not hasattr(r, "__len__")
                                                 else list(r)), dtype=np.int64)
                     for s, a, r in zip(g["verify_steps"], g["accepted_at_depth"], recorded)])


def _cluster_bootstrap(labels: np.ndarray, acc_runs: np.ndarray, steps_runs: np.ndarray, reached_runs: np.ndarray,
                       seed: int, n_boot: int = 2000, confidence: float = 0.95):
    """Per depth, percentile intervals of (conditional acceptance, survival) resampling whole prompts; None with
    fewer than 2 prompts (nothing to resample)."""
    uniq, inverse = np.unique(labels.astype(str), return_inverse=True)
    if len(uniq) < 2:
        return None
    acc_c = np.zeros((len(uniq), acc_runs.shape[1]))
    np.add.at(acc_c, inverse, acc_runs)
    reached_c = np.zeros((len(uniq), reached_runs.shape[1]))
    np.add.at(reached_c, inverse, reached_runs)
    steps_c = np.bincount(inverse, weights=steps_runs, minlength=len(uniq)).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    acc_b = acc_c[idx].sum(axis=1)  # (B, K)
    steps_b = steps_c[idx].sum(axis=1)  # (B,)
    reached_b = reached_c[idx].sum(axis=1)  # (B, K)
    a = (1 - confidence) / 2
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = acc_b / reached_b
        surv = acc_b / steps_b[:, None]
    for d in range(acc_runs.shape[1]):
        out.append(tuple((float(np.nanquantile(x[:, d], a)), float(np.nanquantile(x[:, d], 1 - a)))
                         if np.isfinite(x[:, d]).any() else (float("nan"), float("nan")) for x in (cond, surv)))
    return out


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


PROMPT_KEYS = ["prompt_set", "prompt_id", "thinking"]


def per_prompt_ratios(runs: pd.DataFrame, by: list[str] | None = None, baseline: list[str] | None = None,
                      pair_keys: list[str] | None = None) -> pd.DataFrame:
    """Per (group, k, prompt): mean AR and MTP decode tok/s over repetitions and their ratio (paired by prompt).

    By default an MTP group's baseline is the AR runs of the same group. `baseline` names group columns allowed to
    differ on the AR side (e.g. ["backend"]: a server's MTP endpoint over another endpoint serving AR); their AR
    values come back as `baseline_<column>` and every MTP group pairs with every AR group agreeing on the other
    keys, so the caller keeps the pairs it means (server_speedup_table). `pair_keys` are further columns both sides
    must share (e.g. ["concurrency"]).
    """
    by = by or SETTING_KEYS
    baseline = list(baseline or [])
    prompt_keys = PROMPT_KEYS + list(pair_keys or [])
    r = ok_runs(runs)
    r = r[np.isfinite(r["decode_tok_s"])]
    ar = r[r["mode"] == "ar"].groupby(by + prompt_keys, dropna=False)["decode_tok_s"].mean().rename("ar_tok_s")
    ar = ar.reset_index().rename(columns={c: f"baseline_{c}" for c in baseline})
    mtp = r[r["mode"] == "mtp"].groupby(by + ["k"] + prompt_keys + ["category"], dropna=False).agg(
        mtp_tok_s=("decode_tok_s", "mean"), tau=("mean_acceptance_length", "mean")).reset_index()
    out = mtp.merge(ar, on=[c for c in by if c not in baseline] + prompt_keys, how="inner")
    out["ratio"] = out["mtp_tok_s"] / out["ar_tok_s"]
    return out


def ratio_summary(pp: pd.DataFrame, keys: list[str], seed: int = 0) -> pd.DataFrame:
    """Per-prompt ratios (per_prompt_ratios) summarised per `keys` group: geometric mean with a bootstrap CI."""
    rows = []
    for key, g in pp.groupby(keys, dropna=False, sort=True):
        ratios = g["ratio"].to_numpy()
        lo, hi = bootstrap_ci(ratios, geomean, seed=seed)
        rows.append({**dict(zip(keys, key)), "n_prompts": len(g), "ar_tok_s": g["ar_tok_s"].mean(),
                     "mtp_tok_s": g["mtp_tok_s"].mean(), "speedup": geomean(ratios), "speedup_lo": lo,
                     "speedup_hi": hi, "tau": g["tau"].mean()})
    return pd.DataFrame(rows, columns=[*keys, "n_prompts", "ar_tok_s", "mtp_tok_s", "speedup", "speedup_lo",
                                       "speedup_hi", "tau"])


def speedup_table(runs: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (group, k): AR and MTP tok/s, geometric-mean speedup over prompts with a bootstrap CI, tau."""
    by = by or SETTING_KEYS
    return ratio_summary(per_prompt_ratios(runs, by), by + ["k"], seed)


SERVER_PAIR_KEYS = ["concurrency"]
SWAPPABLE = ["backend", "model"]  # may differ between an MTP endpoint and its AR baseline


def server_speedup_table(runs: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """MTP-over-AR speedup between backends that each ran one mode: a server's MTP endpoint over its AR endpoint.

    Pairing rule. A server endpoint is declared AR or MTP, so its backend holds one mode only (the reference
    decoder holds both and is compared with its own AR mode by speedup_table, never here). Within one scope (the
    `by` keys other than model, policy, backend and setting: the results directory, `source`, in the report), each
    MTP-only backend is paired with every AR-only backend serving the same model; when none serves the same model
    and the scope has exactly one AR-only backend, with that one. Otherwise it gets no speedup. The ratio is paired
    like the reference's: the same cells (setting, thinking, prompt set and id; runs averaged over repetitions and
    the concurrent requests of a batch, i.e. matching cell_ids) at the same concurrency, per prompt mean MTP tok/s /
    mean AR tok/s, then the geometric mean over prompts with a bootstrap CI (ratio_summary). The baseline used is
    in `baseline_backend` / `baseline_model`; one row per (group, baseline, concurrency, k). Both sides must agree
    on the other group keys (policy: servers record "as-is").
    """
    by = list(dict.fromkeys([*(by or SETTING_KEYS), *SWAPPABLE]))  # a server speedup is always per backend
    if runs.empty:
        return pd.DataFrame()
    scope = [c for c in by if c not in ("model", "policy", "backend", "setting")]  # source, other axes
    one_mode = runs[runs.groupby(scope + ["backend"], dropna=False)["mode"].transform("nunique") == 1]
    pp = per_prompt_ratios(one_mode, by, baseline=SWAPPABLE, pair_keys=SERVER_PAIR_KEYS)
    if pp.empty:
        return pd.DataFrame()
    ar_only = one_mode[one_mode["mode"] == "ar"]
    if scope:
        n_ar = ar_only.groupby(scope, dropna=False)["backend"].nunique().rename("n_ar").reset_index()
        pp = pp.merge(n_ar, on=scope, how="left")
    else:
        pp = pp.assign(n_ar=ar_only["backend"].nunique())
    same_model = pp["baseline_model"] == pp["model"]
    any_same = same_model.groupby([pp[c] for c in scope + ["backend", "model"]], dropna=False).transform("any")
    pp = pp[same_model | (~any_same & (pp["n_ar"] == 1))]
    keys = by + [f"baseline_{c}" for c in SWAPPABLE] + SERVER_PAIR_KEYS + ["k"]
    return ratio_summary(pp, keys, seed)


def axis_ratio_table(runs: pd.DataFrame, column: str, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """Each value of `column` against its first value (the baseline), per (other group keys, mode, K): the
    geometric mean over prompts of the paired per-prompt ratio of decode tok/s (runs averaged over repetitions),
    with a bootstrap CI. The same prompts, settings and K on both sides; only `column` differs."""
    by = [c for c in (by or SETTING_KEYS) if c != column]
    r = ok_runs(runs)
    r = r[np.isfinite(r["decode_tok_s"])]
    if r.empty or r[column].nunique(dropna=False) < 2:
        return pd.DataFrame()
    keys = by + ["mode", "k"] + PROMPT_KEYS
    per = r.groupby(keys + [column], dropna=False)["decode_tok_s"].mean().rename("tok_s").reset_index()
    values = list(dict.fromkeys(r[column]))  # first seen is the baseline (the sweep's first value)
    base = per[per[column] == values[0]].drop(columns=column).rename(columns={"tok_s": "base_tok_s"})
    pp = per[per[column] != values[0]].merge(base, on=keys, how="inner")
    pp = pp.assign(ratio=pp["tok_s"] / pp["base_tok_s"], baseline=values[0])
    rows = []
    for key, g in pp.groupby(by + ["mode", "k", column], dropna=False, sort=True):
        lo, hi = bootstrap_ci(g["ratio"].to_numpy(), geomean, seed=seed)
        rows.append({**dict(zip(by + ["mode", "k", column], key)), "baseline": values[0], "n_prompts": len(g),
                     "ratio": geomean(g["ratio"].to_numpy()), "ratio_lo": lo, "ratio_hi": hi})
    return pd.DataFrame(rows)


def throughput_table(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Decode tok/s by mode and k: mean, std over runs, n; AR is k = 0. With the roofline: achieved weight GB/s
    (weight bytes per token x tok/s, mean over runs) and its share of the machine's measured copy bandwidth."""
    by = by or SETTING_KEYS
    r = ok_runs(runs)
    r = r.assign(weight_gb_s=r["weight_bytes_per_token"] * r["decode_tok_s"] / 1e9)
    g = r.groupby(by + ["mode", "k"], dropna=False, sort=True)
    out = g.agg(tok_s=("decode_tok_s", "mean"), tok_s_std=("decode_tok_s", "std"), runs=("run_id", "count"),
                tau=("mean_acceptance_length", "mean"), peak_memory_bytes=("peak_memory_bytes", "max"),
                prefill_s=("prefill_s", "mean"), weight_gb_s=("weight_gb_s", "mean"),
                memory_gb_s=("memory_gb_s", "max")).reset_index()
    out["bandwidth_share"] = out["weight_gb_s"] / out["memory_gb_s"]
    return out


def best_k(speedups: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The K with the highest speedup per group, chosen and estimated on the same prompts (in-sample: its
    interval is optimistic; the headline uses `honest_best_k`)."""
    by = by or SETTING_KEYS
    if speedups.empty:
        return speedups
    idx = speedups.groupby(by, dropna=False)["speedup"].idxmax()
    return speedups.loc[idx].reset_index(drop=True)


MIN_SPLIT = 4  # prompts a group needs for the split (2 to choose on, 2 to estimate on)


def honest_best_k(runs: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """The headline's best K per group, chosen and estimated without the winner's curse.

    Taking the K with the highest speedup and quoting its own interval overstates it: the maximum of several noisy
    estimates is biased upwards, and its interval ignores the selection. With at least MIN_SPLIT paired prompts the
    prompts are split at random (seeded) in two halves: K is chosen on the first (highest geometric-mean speedup)
    and its speedup, bootstrap CI and tau are estimated on the second, which played no part in the choice, so the
    estimate is unbiased for the chosen K. With fewer prompts K is chosen on all of them and its interval is
    simultaneous over the m depths compared (Bonferroni: each at 1 - 0.05 / m), which covers the chosen K's true
    speedup with probability >= 95% whatever the choice; the point estimate then stays the optimistic in-sample
    one. `method` says which was done, `n_select` / `n_prompts` how many prompts chose / estimated."""
    by = by or SETTING_KEYS
    pp = per_prompt_ratios(runs, by)
    cols = [*by, "k", "n_prompts", "ar_tok_s", "mtp_tok_s", "speedup", "speedup_lo", "speedup_hi", "tau",
            "n_select", "method"]
    if pp.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in pp.groupby(by, dropna=False, sort=True):
        prompts = sorted(set(map(tuple, g[PROMPT_KEYS].astype(str).to_numpy())))
        ks = sorted(set(g["k"]))
        ids = g[PROMPT_KEYS].astype(str).apply(tuple, axis=1)
        if len(prompts) >= MIN_SPLIT:
            order = np.random.default_rng(seed).permutation(len(prompts))
            choose = {prompts[i] for i in order[: len(prompts) // 2]}
            pick = g[ids.isin(choose)]
            k = int(pick.groupby("k")["ratio"].apply(lambda r: geomean(r.to_numpy())).idxmax())
            est = g[~ids.isin(choose) & (g["k"] == k)]
            summary = ratio_summary(est, ["k"], seed).iloc[0]
            method = (f"split: K chosen on {len(choose)} prompts, speedup estimated on the other "
                      f"{len(prompts) - len(choose)} (unbiased for the chosen K)")
            n_select = len(choose)
        else:
            speeds = ratio_summary(g, ["k"], seed).set_index("k")
            k = int(speeds["speedup"].idxmax())
            summary = speeds.loc[k].copy()
            summary["k"] = k
            lo, hi = bootstrap_ci(g.loc[g["k"] == k, "ratio"].to_numpy(), geomean, seed=seed,
                                  confidence=1 - 0.05 / len(ks))
            summary["speedup_lo"], summary["speedup_hi"] = lo, hi
            method = (f"too few prompts to split ({len(prompts)} < {MIN_SPLIT}): K chosen and estimated on the same "
                      f"prompts, interval simultaneous over {len(ks)} depths (Bonferroni); the point estimate is "
                      f"optimistic")
            n_select = len(prompts)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "k": k,
                     **{c: summary[c] for c in ("n_prompts", "ar_tok_s", "mtp_tok_s", "speedup", "speedup_lo",
                                                "speedup_hi", "tau")}, "n_select": n_select, "method": method})
    return pd.DataFrame(rows, columns=cols)


def scan_table(rows: list[dict]) -> pd.DataFrame:
    """Per category, from `decode.scan.scan_texts` records: texts, positions, greedy draft match rate, mean alpha."""
    df = pd.DataFrame(rows)
    g = df.groupby("category").agg(texts=("positions", "size"), positions=("positions", "sum"),
                                   matches=("matches", "sum"), alpha=("alpha", "mean"))
    g["greedy_match"] = g["matches"] / g["positions"]
    return g[["texts", "positions", "greedy_match", "alpha"]].round(4)
