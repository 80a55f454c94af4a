"""The self-contained HTML comparison report: tables and inline-SVG plots from parquet results only.

One file, no external URL, script or font, so it can be mailed, archived or opened offline; several results
directories (machines, policies, checkpoints) merge into one comparison, told apart by a `source` column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .. import fmt
from ..secrets import redact_urls
from . import backends, plots, tables
from ..stats.acceptance import draft_shares
from ..sweep.axes import GROUP_KEYS
from .conditions import machine_warnings
from ..stats.fdr import sweep_errors
from .load import Loaded, load
from .present import (
    KEY_FORMATS,
    group_title,
    KEY_HEADERS,
    Table,
    acceptance_cell,
    build,
    col,
    key_columns,
    mode_label,
    mode_speedup_cell,
    shown_keys,
    speedup_cell,
    survival_cell,
)

VERIFY_HINT = tables.VERIFY_HINT


@dataclass
class Section:
    """One <section>: tables and an optional inline SVG; `empty` explains why there is nothing to show."""

    id: str
    title: str
    tables: list[Table] = field(default_factory=list)
    svg: Markup | None = None
    empty: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _svg(svg: str | None) -> Markup | None:
    return Markup(svg) if svg else None  # our own matplotlib output, not user text


def headline_section(data: Loaded, keys: list[str]) -> Section:
    best = tables.headline(data.runs)
    t = build(best, key_columns(keys) + [
        ("Best K", lambda r: str(int(r["k"])), True),
        ("AR tok/s", lambda r: fmt.tok_s(r["ar_tok_s"]), True),
        ("MTP tok/s", lambda r: fmt.tok_s(r["mtp_tok_s"]), True),
        ("Speedup", lambda r: fmt.ratio(r["speedup"]), True),
        ("95% CI", lambda r: fmt.ci(r["speedup_lo"], r["speedup_hi"], fmt.ratio), True),
        ("Prompts", lambda r: fmt.integer(r["n_prompts"]), True),
        ("τ", lambda r: fmt.num(r["tau"]), True),
    ], caption="Best K: " + "; ".join(sorted(set(best["method"]))) if len(best) else "")
    return Section("headline", "Headline: best K per model and setting", [t, settings_table(data)],
                   empty="No paired AR/MTP runs completed, so no speedup can be stated.")


def settings_table(data: Loaded) -> Table:
    """What each setting label means, so a speedup is never quoted without its sampling settings."""
    s = tables.sampling(data.runs)
    return build(s, [
        ("Source", col("source"), False), ("Model", col("model"), False), ("Setting", col("setting"), False),
        ("temperature", lambda r: fmt.param(r["temperature"]), True), ("top_p", lambda r: fmt.param(r["top_p"]), True),
        ("top_k", lambda r: fmt.integer(r["top_k"]), True), ("min_p", lambda r: fmt.param(r["min_p"]), True),
        ("draft temperature", lambda r: fmt.param(r["draft_temperature"]), True),
        ("max tokens", lambda r: fmt.integer(r["max_tokens"]), True), ("thinking", col("thinking"), False),
        ("prompt sets", col("prompt_sets"), False), ("prompts", lambda r: fmt.integer(r["prompts"]), True),
        ("repetitions", lambda r: fmt.integer(r["repetitions"]), True),
    ], caption="Sampling settings")


def throughput_section(data: Loaded, keys: list[str]) -> Section:
    modes = tables.mode_table(data.runs)
    t = build(modes, key_columns(keys) + [
        ("Mode", mode_label, False),
        ("Decode tok/s", lambda r: fmt.tok_s(r["tok_s"]), True),
        ("± std", lambda r: fmt.tok_s(r["tok_s_std"]), True),
        ("Runs", lambda r: fmt.integer(r["runs"]), True),
        ("Speedup [95% CI]", mode_speedup_cell, True),
        ("Weight GB/s", lambda r: fmt.num(r["weight_gb_s"], 2), True),
        ("Share of machine", lambda r: fmt.percent(r["bandwidth_share"]), True),
        ("Peak memory", lambda r: fmt.memory(r["peak_memory_bytes"]), True),
        ("Prefill s", lambda r: fmt.num(r["prefill_s"], 3), True),
    ])
    return Section("throughput", "Decode throughput: AR vs MTP by K", [t], _svg(plots.throughput(modes)),
                   empty="No completed runs.")


def acceptance_section(data: Loaded, keys: list[str]) -> Section:
    acc = tables.acceptance(data.runs)
    t = build(acc, key_columns(keys) + [
        ("K", lambda r: str(int(r["k"])), True), ("Depth", lambda r: str(int(r["depth"])), True),
        ("Reached", lambda r: fmt.integer(r["reached"]), True),
        ("Accepted", lambda r: fmt.integer(r["accepted"]), True),
        ("Acceptance [95% CI]", acceptance_cell, True), ("Survival [95% CI]", survival_cell, True),
    ])
    return Section("acceptance", "Acceptance by depth and survival", [t], _svg(plots.acceptance(acc)),
                   empty="No completed MTP runs.")


def position_section(data: Loaded, keys: list[str]) -> Section:
    pos = tables.position(data.runs, data.steps)
    t = build(pos, key_columns(keys) + [
        ("K", lambda r: str(int(r["k"])), True),
        ("Verify steps", lambda r: f"{int(r['step_lo'])}–{int(r['step_hi'])}", True),
        ("Depth-1 drafts", lambda r: fmt.integer(r["n"]), True),
        ("Acceptance [95% CI]", acceptance_cell, True),
    ])
    return Section("position", "Acceptance against position in the sequence", [t], _svg(plots.position(pos)),
                   empty="No per-step records (the `steps` table is empty): these runs were recorded without "
                         "step events, so acceptance cannot be resolved by position.")


def tau_section(data: Loaded, keys: list[str]) -> Section:
    tau = tables.tau_table(data.runs)
    t = build(tau, key_columns(keys) + [
        ("K", lambda r: str(int(r["k"])), True),
        ("a (depth-1 acceptance)", lambda r: fmt.rate(r["a1"]), True),
        ("τ measured", lambda r: fmt.num(r["tau"], 3), True),
        ("τ i.i.d. prediction", lambda r: fmt.num(r["tau_iid"], 3), True),
        ("measured / predicted", lambda r: fmt.rate(r["tau_ratio"]), True),
    ])
    return Section("tau", "Mean acceptance length τ vs the i.i.d. prediction", [t], _svg(plots.tau(tau)),
                   empty="No completed MTP runs.")


def efficiency_section(data: Loaded, keys: list[str]) -> Section:
    eff = tables.efficiency(data.runs)
    shares = draft_shares(data.costs)
    columns = key_columns(keys) + [
        ("K", lambda r: str(int(r["k"])), True),
        ("AR ms/token", lambda r: fmt.num(1000 * r["ar_s_per_token"], 2), True),
        ("MTP ms/step", lambda r: fmt.num(1000 * r["mtp_s_per_step"], 2), True),
        ("cost ratio c", lambda r: fmt.num(r["cost_ratio"], 3), True),
        ("τ", lambda r: fmt.num(r["tau"], 3), True),
        ("predicted τ/c", lambda r: fmt.ratio(r["predicted"]), True),
        ("realized [95% CI]", speedup_cell, True),
        ("efficiency", lambda r: fmt.rate(r["efficiency"]), True),
    ]
    if shares:  # a bench kept with the results gives the draft's share of weight bytes
        eff = tables.with_bandwidth_projection(eff, data.runs, shares)
        columns.append(("bandwidth-bound projection (not measured)", lambda r: fmt.ratio(r["projected_bw"]), True))
    t = build(eff, columns, caption="Bandwidth-bound projection: what the same τ gives where a (K+1)-token verify "
              "costs one decode step and a draft step its share of weight bytes (Apple silicon, GPUs at batch 1): "
              "τ / (1 + K × share), share from the weight bytes kept with the results; a projection, not a measurement"
              if shares else "")
    return Section("efficiency", "Predicted vs realized speedup", [t], _svg(plots.efficiency(eff)),
                   empty="Needs completed AR and MTP runs in the same cell.")


CONTEXT_SPLIT = ("The cost model predicts speedup = τ / c, with c = (MTP seconds per verify step) / (AR seconds per "
                 "token). Between a context and the shortest one measured for the same cell and K, the speedup "
                 "ratio splits as S / S₀ = (τ / τ₀) × (c₀ / c) × residual: the acceptance factor τ / τ₀ is below 1 "
                 "when acceptance fell, the cost factor c₀ / c is below 1 when a verify step (and the K drafts) got "
                 "dearer relative to an AR token, and the residual is what neither explains (the realized "
                 "efficiency changing). TTFT is the prefill time (the MTP column includes the head's prefill over "
                 "every prompt position); peak memory is the largest over the runs. KV bytes per step: the KV-cache "
                 "bytes one step reads, attention layers × 2 (key, value) × KV heads × head dim × bytes per element "
                 "× context, plus K draft steps over the MTP head's own cache, at the run's mean cache length "
                 "(prompt tokens + half the generated ones).")


def _depths(r: pd.Series) -> str:
    values = r.get("acceptance_by_depth")
    if not isinstance(values, (list, tuple)) or not len(values):
        return fmt.DASH
    return " / ".join(fmt.rate(v) for v in values)


def context_section(data: Loaded, keys: list[str]) -> Section | None:
    """Acceptance, τ, speedup, TTFT and peak memory against context, with the acceptance/cost split."""
    if not tables.has_context(data.runs):
        return None
    ctx = tables.context_table(data.runs)
    shown = [k for k in keys if k != "context"]
    t = build(ctx, key_columns(shown) + [
        ("K", lambda r: str(int(r["k"])), True), ("Context", KEY_FORMATS["context"], False),
        ("Prompt tokens", lambda r: fmt.integer(r.get("ar_prompt_tokens")), True),
        ("Acceptance by depth", _depths, True),
        ("τ", lambda r: fmt.num(r["tau"], 3), True),
        ("Speedup [95% CI]", speedup_cell, True),
        ("cost ratio c", lambda r: fmt.num(r["cost_ratio"], 3), True),
        ("TTFT AR s", lambda r: fmt.num(r.get("ar_ttft_s"), 3), True),
        ("TTFT MTP s", lambda r: fmt.num(r.get("mtp_ttft_s"), 3), True),
        ("Peak memory AR", lambda r: fmt.memory(r.get("ar_peak_memory_bytes")), True),
        ("Peak memory MTP", lambda r: fmt.memory(r.get("mtp_peak_memory_bytes")), True),
        ("KV MB/step AR", lambda r: fmt.num(r.get("ar_kv_bytes_per_step", float("nan")) / 1e6, 2), True),
        ("KV MB/step MTP", lambda r: fmt.num(r.get("mtp_kv_bytes_per_step", float("nan")) / 1e6, 2), True),
        ("S / S₀", lambda r: fmt.ratio(r["speedup_change"]), True),
        ("acceptance τ/τ₀", lambda r: fmt.ratio(r["acceptance_factor"]), True),
        ("cost c₀/c", lambda r: fmt.ratio(r["cost_factor"]), True),
        ("residual", lambda r: fmt.ratio(r["residual"]), True),
    ])
    return Section("context", "Against context: acceptance, τ, speedup, TTFT and memory", [t],
                   _svg(plots.context(ctx)), empty="Needs completed AR and MTP runs in the same cell.",
                   extra={"note": CONTEXT_SPLIT})


def categories_section(data: Loaded, keys: list[str]) -> Section:
    cat = tables.categories(data.runs)
    t = build(cat, key_columns(keys) + [
        ("K", lambda r: str(int(r["k"])), True), ("Category", col("category"), False),
        ("Prompts", lambda r: fmt.integer(r["n_prompts"]), True),
        ("Speedup [95% CI]", speedup_cell, True),
        ("Depth-1 acceptance [95% CI]",
         lambda r: fmt.with_ci(r.get("acceptance"), r.get("acceptance_lo"), r.get("acceptance_hi")), True),
    ])
    return Section("categories", "By prompt category", [t], _svg(plots.categories(cat, tables.headline(data.runs))),
                   empty="No paired AR/MTP prompts.")


def comparison_sections(data: Loaded, keys: list[str]) -> list[Section]:
    """One section per compared axis (policy, KV-cache bits, ...) that takes several values: the same cells side
    by side, with each value's paired tok/s ratio over the first."""
    out = []
    for column in tables.compared_columns(data.runs):
        cmp = tables.comparison(data.runs, column)
        shown = [k for k in ("model", "backend", "setting") if k in keys and k != column]
        others = [k for k in keys if k not in (*shown, column, "source")]
        name = KEY_HEADERS.get(column, column)
        t = build(cmp, key_columns(shown + others) + [
            ("Mode", mode_label, False), (name, col(column), False), ("Source", col("source"), False),
            ("Decode tok/s", lambda r: fmt.tok_s(r["tok_s"]), True),
            (f"× first {name} (paired) [95% CI]", lambda r: fmt.with_ci(r.get("ratio"), r.get("ratio_lo"),
                                                                         r.get("ratio_hi"), fmt.ratio), True),
            ("Speedup over AR [95% CI]", mode_speedup_cell, True),
            ("Depth-1 acceptance [95% CI]", lambda r: fmt.DASH if r["mode"] == "ar" else acceptance_cell(r), True),
            ("Peak memory", lambda r: fmt.memory(r["peak_memory_bytes"]), True),
        ])
        out.append(Section(f"compare-{column}", f"Compared: {name}", [t], _svg(plots.compared(cmp, column)),
                           empty="No completed runs.", extra={"column": name}))
    return out


def backends_section(data: Loaded, keys: list[str]) -> Section | None:
    if backends.n_backends(data.runs) < 2:
        return None
    t = backends.comparison_table(backends.comparison(data.runs), keys)
    s = backends.survival_table(backends.survival(data.runs))
    return Section("backends", "Backends side by side", [t, s], empty="No completed runs.",
                   extra={"no_survival": s.empty})


def runtimes_section(data: Loaded) -> Section | None:
    """The runtime table, wherever a server endpoint was measured (backends.runtimes)."""
    if not backends.has_server(data.runs):
        return None
    t = backends.runtime_table(backends.runtimes(data.runs, data.verdicts, data.steps))
    return Section("runtimes", "Runtimes", [t], empty="No completed runs at concurrency 1.")


def _family(r) -> str:
    fam = r.get("family")
    return fam if isinstance(fam, str) and fam else "preservation"  # rows written before families: preservation


def _verdict_word(r) -> str:
    """Only the preservation family rejects; acceptance (below sum(alpha)) and diagnostics only differ."""
    if r["p_value"] != r["p_value"]:
        return "n/a"
    if not bool(r["rejected"]):
        return "not rejected"
    return "rejected" if _family(r) == "preservation" else "differs (decides nothing)"


def _cell_verdict_word(r) -> str:
    if r["rejected"]:
        return f"rejected by {r['rejected']} of {r['tests']}"
    return "not rejected, but could not see rule errors (too few accepted drafts)" if r.get("blind") else \
        "not rejected"


def _sweep_statement(verdicts) -> str:
    """The sweep-wide error statement (stats/fdr.py) over the cells shown, as the cell table's caption lead."""
    cells = tables.cell_verdicts(verdicts)
    return "" if cells.empty else sweep_errors(cells["min_p_holm"], cells["rejected"] > 0).statement() + ". "


def verdicts_section(data: Loaded, keys: list[str]) -> Section:
    v = tables.verdict_rows(data.verdicts)
    t = build(v, key_columns([k for k in keys if k != "setting"]) + [
        ("Setting", col("setting"), False), ("K", lambda r: fmt.integer(r["k"]), True),
        ("Control", lambda r: fmt.text(r["control"]) if r["is_control"] else "—", False),
        ("Test", col("test"), False), ("n", lambda r: fmt.integer(r["n"]), True),
        ("Statistic", lambda r: fmt.stat(r["statistic"]), True), ("p", lambda r: fmt.pvalue(r["p_value"]), True),
        ("p (Holm)", lambda r: fmt.pvalue(r["p_holm"]), True),
        ("Detectable deviation", lambda r: f"{fmt.stat(r['detectable'])} {fmt.text(r['detectable_unit'])}", True),
        ("Family", lambda r: _family(r), False),
        ("Verdict", _verdict_word, False),
        ("Note", lambda r: fmt.text(r.get("note") or ""), False),
    ])
    cells = build(tables.cell_verdicts(data.verdicts), key_columns(keys) + [
        ("K", lambda r: fmt.integer(r["k"]), True), ("Tests", col("names"), False),
        ("Largest n", lambda r: fmt.integer(r["max_n"]), True),
        ("Smallest p (Holm)", lambda r: fmt.pvalue(r["min_p_holm"]), True),
        ("q (FDR across cells)", lambda r: fmt.pvalue(r.get("q_fdr", float("nan"))), True),
        ("Drift (mean TV, decoder vs fresh rows)", lambda r: fmt.stat(r.get("drift_tv", float("nan"))), True),
        ("Verdict", _cell_verdict_word, False),
        ("Server audit", lambda r: fmt.text(r.get("audit") or "—"), False),
        ("Instrument", lambda r: fmt.text(r.get("instrument") or "—"), False),
    ], caption=_sweep_statement(data.verdicts) +
               "Per tested cell (controls excluded): the preservation family decides (support, PIT and score "
               "against a fresh teacher-forced target, PIT by token source, acceptance above its bound); "
               "near-zero drift with a rejection points at the rule, large drift at the state. An audited "
               "server's cells (rescored with a local checkpoint) sit beside the reference's: support, PIT and "
               "score only, under the sampling profile named in the Server audit column, and valid only if the "
               "server serves that checkpoint's weights (the user's assertion)")
    t.caption = "Every test row"
    untested = tables.untested_cells(data.runs, data.verdicts)
    u = build(untested, key_columns(keys) + [("K", lambda r: str(int(r["k"])), True)],
              caption="Benchmarked MTP cells with no preservation test (nothing is claimed for them)")
    return Section("verdicts", "Distribution preservation", [cells, t],
                   extra={"untested": u, "hint": VERIFY_HINT, "tested": not t.empty},
                   empty=f"No preservation test was run for these results; run `{VERIFY_HINT}`.")


def provenance_section(data: Loaded) -> Section:
    sources = []
    for source, rows in tables.provenance(data).items():
        manifest = data.manifests[source]
        t = build(pd.DataFrame(rows), [("Field", col("field"), False), ("Manifest", col("manifest"), False),
                                       ("Runs", col("runs"), False)])
        sources.append({"name": source, "dir": str(data.dirs[source]), "table": t,
                        "created_at": fmt.text(manifest.get("created_at")),
                        "schema_version": fmt.text(manifest.get("schema_version")),
                        # redacted again when shown: a manifest written before commands were stored redacted
                        "command": redact_urls(fmt.text(manifest.get("command"))),
                        "spec": redact_urls(json.dumps(manifest.get("spec", {}), indent=2, sort_keys=True,
                                                       default=str))})
    return Section("provenance", "Provenance and how to reproduce", extra={"sources": sources})


def failed_table(data: Loaded, keys: list[str]) -> Table:
    bad = tables.failed(data.runs)
    return build(bad, key_columns(keys) + [
        ("Mode", lambda r: mode_label(r) if pd.notna(r["k"]) else fmt.text(r["mode"]), False),
        ("Prompt", col("prompt_id"), False), ("Status", col("status"), False),
        ("Error", lambda r: fmt.text(r["error"])[:200], False),
    ])


def performance_section(data: Loaded) -> Section | None:
    """`mtpbench bench` results stored with the sweep (sweep --bench): cost terms, parity, efficiency, roofline."""
    if not data.benches:
        return None
    from .bench_section import render_benches_html

    return Section("performance", "Where the time goes (mtpbench bench)",
                   extra={"html": Markup(render_benches_html(data.benches))})  # our own template output


def sections(data: Loaded) -> list[Section]:
    keys = shown_keys(data.runs)
    out = [headline_section(data, keys), throughput_section(data, keys), acceptance_section(data, keys),
           position_section(data, keys), tau_section(data, keys), efficiency_section(data, keys),
           context_section(data, keys),
           categories_section(data, keys), *comparison_sections(data, keys), backends_section(data, keys), runtimes_section(data),
           verdicts_section(data, keys), performance_section(data),
           provenance_section(data)]
    return [s for s in out if s is not None]


def _environment() -> Environment:
    return Environment(loader=PackageLoader("mtpbench.report", "templates"),
                       autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)


def render_html(data: Loaded, title: str | None = None) -> str:
    """The report as a string (render_report writes it)."""
    names = list(data.manifests)
    title = title or "mtpbench report: " + ", ".join(names)
    runs = data.runs
    summary_rows = [{"name": s, "dir": str(data.dirs[s]),
                     "runs": int((runs["source"] == s).sum()) if not runs.empty else 0,
                     "failed": int(((runs["source"] == s) & (runs["status"] != "ok")).sum()) if not runs.empty else 0}
                    for s in names]
    keys = shown_keys(runs)
    by = [c for c in GROUP_KEYS if c in runs]
    machine = [f"{group_title(sel, runs)}: {msg}" for sel, msg in machine_warnings(runs, by)]
    return _environment().get_template("report.html.j2").render(
        title=title, sources=summary_rows, failed=failed_table(data, keys),
        n_failed=sum(r["failed"] for r in summary_rows), sections=sections(data), damaged=data.damaged,
        machine=machine)


def render_report(results_dirs: list[Path], out: Path, title: str | None = None, say=None) -> Path:
    """Read the results directories, write one self-contained HTML file to `out` (atomically: a write that fails
    is one UserError line), and return its path; `say` gets a warning line per damaged part left out."""
    from ..atomic import write_text

    out = Path(out)
    html = render_html(load(results_dirs, say), title)
    write_text(out, html)
    return out
