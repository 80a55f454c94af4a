"""Plain-text tables for the terminal (the sweep's closing summary); numbers come from stats.summary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..sweep.axes import GROUP_KEYS
from .conditions import machine_warnings
from .present import group_title
from .load import cost_sources

from ..stats.acceptance import (StepCosts, bandwidth_bound_speedup, draft_shares, expected_tokens,
                                predicted_speedup, setting_costs)
from ..stats.summary import (acceptance_by_depth, per_prompt_ratios, server_speedup_table, speedup_table,
                            throughput_table)


def _fmt_ci(v: float, lo: float, hi: float) -> str:
    return f"{v:.2f}x [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else f"{v:.2f}x"


def summary_of(results_dir) -> str:
    """The closing summary of one results directory (with the step costs kept in it, when there are any)."""
    from ..sweep.store import read_table

    return sweep_summary(read_table(results_dir, "runs"), cost_sources(Path(results_dir)))


def _cost_model(benches: list[dict], fingerprint, setting: str) -> tuple[StepCosts | None, float] | None:
    """The step costs of `setting` and the draft share (draft-step bytes / trunk bytes) measured on the checkpoint
    `fingerprint` (from its bench.json or cost_model.json); the costs are None where no terms of that setting were
    measured."""
    share = draft_shares(benches).get(fingerprint)
    for b in benches:
        if b.get("model", {}).get("fingerprint") == fingerprint and "costs" in b and share is not None:
            return setting_costs(b, setting), share
    return None


def _projections(model: tuple[StepCosts | None, float] | None, k: int, survival: list[float],
                 ar_tok_s: float) -> dict[str, str]:
    """Predicted (this machine's measured terms of the setting, the AR loop's own time per token in these runs) and
    bandwidth-bound projected speedups of one (setting, K)."""
    if model is None or len(survival) != k:
        return {}
    costs, share = model
    predicted = (predicted_speedup(survival, replace(costs, ar_step=1.0 / ar_tok_s))
                 if costs is not None and k in costs.verify and ar_tok_s > 0 else float("nan"))
    return {"predicted (this machine)": f"{predicted:.2f}x" if pd.notna(predicted) else "-",
            "bandwidth-bound projection": f"{bandwidth_bound_speedup(expected_tokens(survival), k, share):.2f}x"}


def sweep_summary(runs: pd.DataFrame, benches: list[dict] | None = None) -> str:
    """Per group: AR tok/s, then per K the realized speedup; with the checkpoint's measured step costs (`benches`:
    bench.json or cost_model.json documents), beside it the speedup the cost model predicts from the measured
    survival on this machine and the bandwidth-bound projection (see `stats.acceptance.bandwidth_bound_speedup`)."""
    if runs.empty:
        return "no runs"
    by = [c for c in GROUP_KEYS if c in runs]
    sp = speedup_table(runs, by)
    thr = throughput_table(runs, by)
    acc = acceptance_by_depth(runs, by)
    lines = []
    for key, g in sp.groupby(by, sort=True, dropna=False):
        sel = dict(zip(by, key))

        def rows(df: pd.DataFrame, _sel=sel) -> pd.DataFrame:
            return df[(df[list(_sel)] == pd.Series(_sel)).all(axis=1)]

        ar = rows(thr)
        ar = ar[ar["mode"] == "ar"]
        head = group_title(sel, runs)
        lines.append(f"\n{head}  |  AR {ar.tok_s.iloc[0]:.1f} tok/s (sd {ar.tok_s_std.iloc[0]:.1f}, "
                     f"{int(ar.runs.iloc[0])} runs)")
        table = []
        fingerprints = rows(runs)["model_fingerprint"].dropna().unique() if "model_fingerprint" in runs else []
        model = _cost_model(benches or [], fingerprints[0], sel.get("setting", "greedy")) \
            if len(fingerprints) == 1 else None
        for _, r in g.iterrows():
            t = rows(thr)
            t = t[(t["mode"] == "mtp") & (t.k == r.k)].iloc[0]
            a = rows(acc)
            a = a[a.k == r.k].sort_values("depth")
            table.append({"K": int(r.k), "MTP tok/s": f"{t.tok_s:.1f} (sd {t.tok_s_std:.1f})",
                          "speedup [95% CI]": _fmt_ci(r.speedup, r.speedup_lo, r.speedup_hi),
                          "acceptance by depth": " ".join(f"{x:.2f}" for x in a.acceptance),
                          "survival": " ".join(f"{x:.2f}" for x in a.survival), "tau": f"{r.tau:.2f}",
                          "prompts": int(r.n_prompts),
                          **_projections(model, int(r.k), list(a.survival), float(ar.tok_s.iloc[0]))})
        lines.append(pd.DataFrame(table).to_string(index=False))
        if model is not None:
            lines.append("  predicted: the cost model on this machine's measured terms of this setting (bench/ in "
                         "the results; '-' where none were measured), the AR loop's time per token in these runs "
                         "and the measured survival.\n"
                         "  bandwidth-bound projection: the same survival where a (K+1)-token verify costs one decode "
                         "step and a draft its share of weight bytes (Apple silicon, GPUs): not a measurement.")
    pp = per_prompt_ratios(runs, by)
    if not pp.empty and pp["category"].nunique() > 1:
        cat = pp.groupby([*by, "k", "category"]).agg(speedup=("ratio", "mean"), tau=("tau", "mean"))
        lines += ["\nBy prompt category (mean per-prompt speedup, tau):", cat.round(2).to_string()]
    lines += _server_lines(runs)
    lines += [f"\nwarning: {group_title(sel, runs)}: {msg}" for sel, msg in machine_warnings(runs, by)]
    failed = int((runs["status"] != "ok").sum())
    if failed:
        lines.append(f"\n{failed} run(s) failed; see the `error` column of the runs table")
    return "\n".join(lines)


def _server_lines(runs: pd.DataFrame) -> list[str]:
    """Server endpoints: tok/s and latency per (backend, mode, setting, concurrency), and MTP-over-AR speedups."""
    servers = runs[runs["backend"] != "reference"]
    if servers.empty:
        return []
    ok = servers[servers["status"] == "ok"]
    table = servers.assign(ok=servers["status"] == "ok").groupby(
        ["backend", "mode", "setting", "concurrency"], dropna=False).agg(runs=("ok", "sum"), failed=("ok", lambda x: int((~x).sum())))
    stats = ok.groupby(["backend", "mode", "setting", "concurrency"], dropna=False).agg(
        tok_s=("decode_tok_s", "mean"), ttft_p50_s=("ttft_s", "median"), itl_p50_ms=("itl_p50_s", "median"),
        itl_p95_ms=("itl_p95_s", "median"))
    stats[["itl_p50_ms", "itl_p95_ms"]] *= 1e3
    lines = ["\nServer endpoints:", table.join(stats).round(3).to_string()]
    sp = server_speedup_table(runs, ["model", "backend", "setting"])
    if not sp.empty:
        lines.append("Server MTP over AR endpoint (paired per prompt):")
        lines += [f"  {r.backend} over {r.baseline_backend} | {r.setting} | concurrency {int(r.concurrency)}: "
                  f"{_fmt_ci(r.speedup, r.speedup_lo, r.speedup_hi)} ({int(r.n_prompts)} prompts)"
                  for r in sp.itertuples()]
    return lines
