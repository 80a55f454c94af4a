"""Model-card tables (markdown, or the same numbers as JSON) in the style of public MTP model cards.

The numbers come from the same tables.py functions as the HTML report, so a card pasted on a hub page and the
report it came from never disagree. Markdown is rendered from the JSON-able record dict, never recomputed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError
from .. import fmt
from . import backends, tables
from .load import GROUP_KEYS, Loaded, load
from ..stats.acceptance import draft_shares
from ..stats.fdr import sweep_errors
from ..stats.summary import INTERVAL_LABEL
from ..sweep.axes import context_label
from .present import acceptance_cell, mode_label, mode_speedup_cell, survival_cell

CELL_KEYS = [k for k in GROUP_KEYS if k not in ("source", "model")]  # a card is about one model
BACKEND_FIELDS = CELL_KEYS + ["mode", "k", "positions", "concurrency", "ok", "failed", "tok_s", "ttft_p50_s",
                              "itl_p50_s", "itl_p95_s", "speedup", "speedup_lo", "speedup_hi", "n_prompts", "baseline"]
CONTEXT_FIELDS = CELL_KEYS + ["k", "ar_prompt_tokens", "acceptance_by_depth", "tau", "speedup", "speedup_lo",
                               "speedup_hi", "cost_ratio", "ar_ttft_s", "mtp_ttft_s", "ar_peak_memory_bytes",
                               "mtp_peak_memory_bytes", "ar_kv_bytes_per_step", "mtp_kv_bytes_per_step",
                               "speedup_change", "acceptance_factor", "cost_factor", "residual"]
RUNTIME_FIELDS = ["runtime", "setting", "mode", "k", "tok_s", "clock", "speedup", "speedup_lo", "speedup_hi",
                  "acceptance", "efficiency", "efficiency_lo", "efficiency_hi", "efficiency_flag", "exactness",
                  "profile"]
SURVIVAL_FIELDS = ["setting", "k", "depth", "series", *CELL_KEYS, "verify_steps", "accepted", "survival",
                   "survival_lo", "survival_hi"]


def _plain(x: Any) -> Any:
    """JSON-safe scalars: numpy to Python, NaN and pandas' NA to None."""
    if x is pd.NA:
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    return x


def _records(df: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    if df.empty:
        return []
    return [{c: _plain(r[c]) for c in columns if c in df} for _, r in df.iterrows()]


def _models(data: Loaded) -> list[str]:
    from_runs = set(data.runs["model"].dropna()) if not data.runs.empty else set()
    if from_runs:  # the rows name models as tables show them (manifest keys add the policy, old ones a path)
        return sorted(from_runs)
    return sorted({m for man in data.manifests.values() for m in (man.get("models") or {})})


def _select_model(data: Loaded, model: str | None) -> str:
    models = _models(data)
    if model is None:
        if len(models) == 1:
            return models[0]
        raise UserError(f"these results hold {len(models)} models; pick one with model=...: {', '.join(models)}"
                        if models else "these results hold no runs and no model description")
    if model not in models:
        raise UserError(f"unknown model {model!r}; available: {', '.join(models) or '(none)'}")
    return model


def _subset(data: Loaded, model: str) -> Loaded:
    runs = data.runs[data.runs["model"] == model] if not data.runs.empty else data.runs
    verdicts = data.verdicts[data.verdicts["model"] == model] if not data.verdicts.empty else data.verdicts
    steps = data.steps[data.steps["run_id"].isin(runs["run_id"])] if not data.steps.empty else data.steps
    return Loaded(runs=runs, steps=steps, verdicts=verdicts, manifests=data.manifests, dirs=data.dirs)


def _hardware(data: Loaded) -> dict[str, str]:
    """Manifest provenance, falling back to what the runs recorded."""
    (rows,) = tables.provenance(data).values()
    return {r["field"]: r["manifest"] or r["runs"] for r in rows if r["field"] in tables.PROVENANCE_FIELDS}


def _formats(manifest: dict[str, Any], model: str) -> dict[str, dict[str, str]]:
    models = manifest.get("models") or {}
    info = models.get(model) or next((m for m in models.values() if isinstance(m, dict) and m.get("name") == model),
                                     {})
    mtp = info.get("mtp") or {}
    return {"trunk": dict(info.get("formats") or {}), "mtp": dict(mtp.get("formats") or {})}


def _preservation(data: Loaded) -> dict[str, Any]:
    """What was tested and what was not; never a claim without a verdict row."""
    cells = tables.cell_verdicts(data.verdicts)
    untested = tables.untested_cells(data.runs, data.verdicts)
    v = tables.verdict_rows(data.verdicts)
    controls = v[v["is_control"]] if not v.empty else v
    errors = sweep_errors(cells["min_p_holm"], cells["rejected"] > 0) if not cells.empty else None
    return {
        "tested": not cells.empty,
        "cells": _records(cells, CELL_KEYS + ["k", "tests", "names", "rejected", "min_p_holm", "max_n", "drift_tv",
                                              "blind", "q_fdr", "instrument"]),
        "sweep_errors": None if errors is None else {**{f: _plain(getattr(errors, f)) for f in (
            "cells", "rejected_in_cell", "expected_by_chance", "rejected_fdr", "rejected_by", "level")},
            "statement": errors.statement()},
        "untested": _records(untested, CELL_KEYS + ["k"]),
        "controls": {"rows": len(controls),
                     "rejected": int(controls["rejected"].fillna(False).astype(bool).sum()) if len(controls) else 0},
    }


def card_data(results_dir: Path, model: str | None = None, say=None) -> dict[str, Any]:
    """Every number the card shows, as plain JSON-able values (`say`: a warning line per damaged part)."""
    data = load([results_dir], say)
    name = _select_model(data, model)
    sub = _subset(data, name)
    (source,) = data.manifests
    modes = tables.mode_table(sub.runs)
    acc = tables.acceptance(sub.runs)
    return {
        "model": name, "source": source, "results_dir": str(results_dir),
        "throughput": _records(modes, CELL_KEYS + ["mode", "k", "tok_s", "tok_s_std", "runs", "speedup",
                                                   "speedup_lo", "speedup_hi", "n_prompts", "tau"]),
        "acceptance": _records(acc, CELL_KEYS + ["k", "depth", "verify_steps", "reached", "accepted", "acceptance",
                                                 "acceptance_lo", "acceptance_hi", "survival", "survival_lo",
                                                 "survival_hi"]),
        "headline": _records(tables.headline(sub.runs), CELL_KEYS + ["k", "speedup", "speedup_lo", "speedup_hi",
                                                                     "n_prompts", "n_select", "method"]),
        "context": _records(tables.context_table(sub.runs), CONTEXT_FIELDS),
        "projection": _projection(data, sub),
        "backends": _records(backends.comparison(sub.runs), BACKEND_FIELDS),
        "backend_survival": _records(backends.survival(sub.runs), SURVIVAL_FIELDS),
        "runtimes": _records(backends.runtimes(sub.runs, sub.verdicts, sub.steps), RUNTIME_FIELDS),
        "sampling": _records(tables.sampling(sub.runs), ["setting", *tables.SAMPLING_FIELDS, "prompt_sets",
                                                         "prompts", "repetitions"]),
        "hardware": _hardware(data),
        "preservation": _preservation(sub),
        "formats": _formats(data.manifests[source], name),
        "failed_runs": len(tables.failed(sub.runs)),
    }


def _projection(data: Loaded, sub: Loaded) -> list[dict[str, Any]]:
    """Per (cell, K): tau, the realized speedup and the bandwidth-bound projection of that tau, where the results
    keep the checkpoint's weight bytes (bench/ or the sweep's cost model); [] otherwise."""
    shares = draft_shares(data.costs)
    eff = tables.efficiency(sub.runs)
    if not shares or eff.empty:
        return []
    eff = tables.with_bandwidth_projection(eff, sub.runs, shares)
    return _records(eff[eff["projected_bw"].notna()], CELL_KEYS + ["k", "tau", "speedup", "speedup_lo", "speedup_hi",
                                                                   "projected_bw"])


# ---- markdown ------------------------------------------------------------------------------------------------

def _md_cell(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell_name(rec: dict[str, Any], multi: list[str]) -> str:
    """The setting label, naming the other keys (policy, backend, ...) only when the card covers more than one."""
    extra = ", ".join(f"{k} {rec[k]}" if k not in ("policy", "backend") else str(rec[k]) for k in multi)
    return f"{rec['setting']} ({extra})" if extra else str(rec["setting"])


def _groups(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in CELL_KEYS), []).append(r)
    return out


def _throughput_md(card: dict[str, Any]) -> list[str]:
    groups = _groups(card["throughput"])
    if not groups:
        return ["No completed runs: no throughput to report."]
    out = []
    for key, recs in groups.items():
        cell = dict(zip(CELL_KEYS, key))
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cell.items() if k != "setting"
                          and (k in ("policy", "backend") or len({r.get(k) for r in card["throughput"]}) > 1))
        out.append(f"**Decode throughput, `{cell['setting']}`** ({shown})")
        out.append("")
        out.append(md_table(["Mode", "Decode tok/s", "Speedup"],
                            [[mode_label(r), fmt.tok_s(r["tok_s"]), mode_speedup_cell(r)] for r in recs]))
        out.append("")
    n = sorted({int(r["n_prompts"]) for r in card["throughput"] if r["n_prompts"] is not None})
    n_text = "no paired prompts" if not n else f"n = {n[0]}" if len(n) == 1 else f"n = {n[0]}–{n[-1]}"
    out.append(f"Speedup: geometric mean over prompts ({n_text}) of the paired per-prompt ratio of MTP to AR "
               "decode tok/s, with a 95% bootstrap CI over prompts. Decode tok/s: mean over completed runs.")
    return out


def _acceptance_md(card: dict[str, Any], multi: list[str]) -> list[str]:
    recs = card["acceptance"]
    if not recs:
        return ["No completed MTP runs: no acceptance to report."]
    rows = [[_cell_name(r, multi), str(r["k"]), str(r["depth"]), acceptance_cell(r), survival_cell(r)] for r in recs]
    return [md_table(["Setting", "K", "Depth", "Acceptance", "Survival"], rows), "",
            ("Acceptance at depth d: accepted at d / drafts that reached d. Survival to depth d: share of verify "
             f"steps whose first d drafts were all accepted. {INTERVAL_LABEL}.")]


def _headline_md(card: dict[str, Any], multi: list[str]) -> list[str]:
    """Best K per setting, chosen on one half of the prompts and estimated on the other (or, with too few prompts,
    with an interval simultaneous over the depths): the method is printed with each."""
    recs = card.get("headline") or []
    if not recs:
        return []
    rows = [[_cell_name(r, multi), str(r["k"]), fmt.with_ci(r["speedup"], r["speedup_lo"], r["speedup_hi"], fmt.ratio),
             fmt.integer(r["n_prompts"]), str(r["method"])] for r in recs]
    return ["**Headline: best K**", "", md_table(["Setting", "Best K", "Speedup (95% CI)", "Prompts estimated on",
                                                  "How K was chosen and estimated"], rows), "",
            ("Choosing the K with the highest speedup and quoting its own interval overstates it (the winner's "
             "curse): here K is chosen on a random half of the prompts and its speedup (geometric mean of the paired "
             "per-prompt ratios, 95% bootstrap CI over prompts) is estimated on the other half."), ""]


def _context_md(card: dict[str, Any], multi: list[str]) -> list[str]:
    """Acceptance, tau, speedup, TTFT and peak memory against context, with the acceptance/cost split."""
    recs = card.get("context") or []
    if not recs:
        return []
    rows = [[_cell_name(r, [m for m in multi if m != "context"]), str(r["k"]), context_label(r["context"]),
             fmt.integer(r["ar_prompt_tokens"]),
             " / ".join(fmt.rate(v) for v in r["acceptance_by_depth"] or []) or fmt.DASH, fmt.num(r["tau"], 3),
             fmt.with_ci(r["speedup"], r["speedup_lo"], r["speedup_hi"], fmt.ratio),
             fmt.num(r["ar_ttft_s"], 3), fmt.num(r["mtp_ttft_s"], 3), fmt.memory(r["mtp_peak_memory_bytes"]),
             fmt.ratio(r["speedup_change"]), fmt.ratio(r["acceptance_factor"]), fmt.ratio(r["cost_factor"])]
            for r in recs]
    return ["**Against context**", "",
            md_table(["Setting", "K", "Context", "Prompt tokens", "Acceptance by depth", "τ", "Speedup",
                      "TTFT AR s", "TTFT MTP s", "Peak memory MTP", "S / S₀", "τ / τ₀", "c₀ / c"], rows), "",
            ("Context buckets: the long-context set's documents (Python standard library modules, PSF licence) cut "
             "per tokenizer to at most that many tokens at a line boundary, task at the end. With c = (MTP s per "
             "verify step) / (AR s per token) the cost model predicts speedup = τ / c, so against the shortest "
             "context S / S₀ = (τ / τ₀) × (c₀ / c) × residual: τ / τ₀ < 1 means acceptance fell, c₀ / c < 1 that a "
             "verify step got dearer relative to an AR token. TTFT: prefill seconds (MTP includes the head's "
             "prefill)."), ""]


def _projection_md(card: dict[str, Any], multi: list[str]) -> list[str]:
    recs = card.get("projection") or []
    if not recs:
        return []
    rows = [[_cell_name(r, multi), str(r["k"]), fmt.num(r["tau"], 2),
             fmt.with_ci(r["speedup"], r["speedup_lo"], r["speedup_hi"], fmt.ratio), fmt.ratio(r["projected_bw"])]
            for r in recs]
    return ["**Realized speedup and the bandwidth-bound projection**", "",
            md_table(["Setting", "K", "τ", "Realized speedup", "Bandwidth-bound projection (not measured)"], rows), "",
            ("Projection: what the measured τ gives where a (K+1)-token verify costs one decode step and a draft step "
             "its share of the weight bytes (Apple silicon, GPUs at batch 1): τ / (1 + K × share). A projection "
             "from this run's τ, not a measurement."), ""]


def _backends_md(card: dict[str, Any]) -> list[str]:
    """Backends side by side (only when the card covers more than one), from the records, never recomputed."""
    recs = card["backends"]
    if len({r["backend"] for r in recs}) < 2:
        return []
    df = pd.DataFrame(recs)
    keys = ["setting"] + (["policy"] if df["policy"].nunique() > 1 else [])
    t = backends.comparison_table(df, keys)
    out = ["**Backends side by side**", "", md_table(t.headers, t.rows), "",
           ("Speedup: the reference decoder's MTP over its own AR mode at each K; a server's MTP endpoint over the AR "
            "endpoint named as its baseline, paired per prompt at the same concurrency (geometric mean over prompts, "
            "95% bootstrap CI). A server's K is the number of draft positions its speculative counters report. "
            "TTFT p50: median time to first token; ITL p50/p95: median over runs of each run's inter-token-latency "
            "percentile."), ""]
    surv = backends.survival_table(pd.DataFrame(card["backend_survival"]))
    if surv.empty:
        return out + [("No acceptance by position to compare: no server exposed speculative counters for a K "
                       "that another backend also ran."), ""]
    return out + [md_table(surv.headers, surv.rows), "",
                  ("Survival to depth d: share of drafts whose first d positions were all accepted (a server: accepted "
                   f"tokens at position d / drafts, from its counters). {INTERVAL_LABEL}."), ""]


def _runtimes_md(card: dict[str, Any]) -> list[str]:
    """The runtime table (only where a server endpoint was measured), from the records, never recomputed."""
    recs = card.get("runtimes") or []
    if not recs:
        return []
    t = backends.runtime_table(pd.DataFrame(recs))
    return ["**Runtimes**", "", md_table(t.headers, t.rows), "",
            ("Clock: the server's own (llama.cpp `timings`) where it reports one, else the client's median rate over "
             "windows of token arrivals (runs read in a burst are counted). Rule efficiency: the server's depth-1 "
             "acceptance over the mean teacher-forced alpha of the local MTP head (about 1: the optimal exact rule; "
             "clearly below 1 with an exact verdict: exact but wasteful; above 1: impossible for an exact rule)."), ""]


def _sampling_line(card: dict[str, Any]) -> str:
    parts = []
    for s in card["sampling"]:
        top_k = fmt.integer(s["top_k"]) if s["top_k"] else "off"
        parts.append(f"`{s['setting']}` = temperature {fmt.param(s['temperature'])}, top_p {fmt.param(s['top_p'])}, "
                     f"top_k {top_k}, min_p {fmt.param(s['min_p'])}, draft temperature "
                     f"{fmt.param(s['draft_temperature'])}, max_tokens {fmt.integer(s['max_tokens'])}, thinking "
                     f"{fmt.text(s['thinking'])}; {s['prompts']} prompts ({s['prompt_sets']}) × "
                     f"{s['repetitions']} repetitions")
    return "**Sampling:** " + ("; ".join(parts) if parts else "no completed runs") + "."


def _hardware_line(card: dict[str, Any]) -> str:
    h = {k: fmt.text(v or None) for k, v in card["hardware"].items()}
    return (f"**Hardware and versions:** {h.get('device', fmt.DASH)} on {h.get('host', fmt.DASH)}, "
            f"{h.get('os', fmt.DASH)}, Python {h.get('python', fmt.DASH)}, BLAS {h.get('blas', fmt.DASH)}; "
            f"mtpbench {h.get('mtpbench_version', fmt.DASH)}, mlx {h.get('mlx_version', fmt.DASH)}, "
            f"mlx-lm {h.get('mlx_lm_version', fmt.DASH)}, git {h.get('git_sha', fmt.DASH)}.")


def _preservation_line(card: dict[str, Any], multi: list[str]) -> str:
    p = card["preservation"]
    if not p["tested"]:
        return ("**Distribution preservation:** not tested (no preservation test in these results; "
                f"run `{tables.VERIFY_HINT}`).")
    parts = []
    for c in p["cells"]:
        verdict = (f"rejected by {c['rejected']} of {c['tests']} tests" if c["rejected"] else
                   "not rejected, but could not see rule errors (too few accepted drafts)" if c.get("blind")
                   else "not rejected")
        q = c.get("q_fdr")
        q = f", FDR q across cells {fmt.pvalue(q)}" if q is not None and q == q else ""
        verdict += f"; {c['instrument']}" if c.get("instrument") else ""
        drift = c.get("drift_tv")
        drift = f", drift vs fresh target {fmt.stat(drift)} TV" if drift is not None and drift == drift else ""
        parts.append(f"K={c['k']} `{_cell_name(c, multi)}`: {verdict} ({c['names']}; "
                     f"n up to {fmt.integer(c['max_n'])}, smallest Holm p {fmt.pvalue(c['min_p_holm'])}{q}{drift})")
    if p["untested"]:
        parts.append("not tested: " + ", ".join(f"K={c['k']} `{_cell_name(c, multi)}`" for c in p["untested"]))
    ctrl = p["controls"]
    if ctrl["rows"]:
        parts.append(f"control tests: {ctrl['rejected']} of {ctrl['rows']} rejected")
    errors = p.get("sweep_errors")
    across = f" **Across cells:** {errors['statement']}." if errors else ""
    return "**Distribution preservation:** " + "; ".join(parts) + "." + across


def _formats_md(card: dict[str, Any]) -> list[str]:
    f = card["formats"]
    rows = [[k, v] for k, v in f["trunk"].items()]
    rows += [[k if k.startswith("mtp") else f"mtp.{k}", v] for k, v in f["mtp"].items()]
    if not rows:
        return ["Checkpoint formats were not recorded in the manifest."]
    return [md_table(["Component", "Format"], rows)]


def to_markdown(card: dict[str, Any]) -> str:
    multi = [k for k in CELL_KEYS if k != "setting" and len({r.get(k) for r in card["throughput"]}) > 1]
    lines = [f"## MTP speculative decoding: {card['model']}", "",
             f"Measured with mtpbench (results `{card['source']}`).", ""]
    lines += _headline_md(card, multi)
    lines += _throughput_md(card) + ["", "**MTP draft acceptance**", ""] + _acceptance_md(card, multi) + [""]
    lines += _context_md(card, multi)
    lines += _projection_md(card, multi)
    lines += _backends_md(card)
    lines += _runtimes_md(card)
    lines += [_sampling_line(card), "", _hardware_line(card), "", _preservation_line(card, multi), ""]
    if card["failed_runs"]:
        lines += [f"{card['failed_runs']} failed run(s) are excluded from these numbers.", ""]
    lines += ["**What's in this checkpoint**", ""] + _formats_md(card)
    # The card writes no HTML of its own: any < or > came from a name (model, backend, prompt set, host) and
    # would be live HTML where the markdown is rendered (`<img src=x onerror=...>` in a heading), so all are escaped.
    return "\n".join(lines).replace("<", "&lt;").replace(">", "&gt;") + "\n"


def render_card(results_dir: Path, model: str | None = None, fmt: str = "markdown", say=None) -> str:
    """Model-card tables for one model of one results directory, as markdown or (fmt="json") the same numbers."""
    if fmt not in ("markdown", "json"):
        raise UserError(f"unknown card format {fmt!r}; use 'markdown' or 'json'")
    card = card_data(Path(results_dir), model, say)
    return json.dumps(card, indent=2, sort_keys=False) + "\n" if fmt == "json" else to_markdown(card)
