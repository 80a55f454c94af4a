"""The `mtpbench bench` results as HTML: a self-contained fragment (tables + one inline SVG) and a standalone page.

Reads only bench.json (never mlx or the decoder), like the rest of `report`; no external URL, font or script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .. import fmt
from .plots import figure, legend, styled, to_svg
from .present import Table


def _mode(k: int) -> str:
    return "AR" if int(k) == 0 else f"K={int(k)}"


def _ms(seconds: float) -> str:
    return fmt.num(1e3 * seconds, 3)


def _break_even(x: float) -> str:
    return "never" if fmt._bad(x) else fmt.rate(x)


def _pct(x: float) -> str:
    return fmt.DASH if fmt._bad(x) else f"{100 * float(x):+.1f}%"


def parity_table(b: dict[str, Any]) -> Table:
    p = b["ar_parity"]
    return Table(["ours tok/s (median)", "mlx_lm tok/s (median)", "ratio ours / mlx_lm", "repeats", "max tokens"],
                 [[fmt.tok_s(p["ours_median"]), fmt.tok_s(p["mlx_lm_median"]), fmt.num(p["ratio"], 3),
                   fmt.integer(p["repeats"]), fmt.integer(p["max_tokens"])]], [True] * 5,
                 "AR decode parity with mlx_lm.stream_generate (greedy, same checkpoint and prompt, ABBA)")


def costs_table(b: dict[str, Any]) -> Table:
    c = b["costs"]
    rows = [["AR step (1 token + host argmax)", _ms(c["ar_step_s"]), "1.00"],
            ["MTP draft step", _ms(c["draft_step_s"]), fmt.num(c["draft_over_ar_step"], 2)]]
    rows += [[f"{d['k']} chained drafts, one sync", _ms(d["seconds"]), fmt.num(d["seconds"] / c["ar_step_s"], 2)]
             for d in c.get("draft_chain_s", []) if d["k"] > 1]
    rows += [[f"first draft fed {r} positions (after {r - 1} accepted), extra over 1", _ms(x),
              fmt.num(x / c["ar_step_s"], 2)] for r, x in enumerate(c.get("catch_up_by_rows_s", []), 1) if r > 1]
    rows += [[f"verify K={v['k']} ({v['k'] + 1} tokens), keeping every GDN state", _ms(v["seconds"]),
              fmt.num(v["over_ar_step"], 2)] for v in c["verify_s"]]
    rows += [[f"rollback j={j}: commit the captured state", _ms(s), fmt.num(s / c["ar_step_s"], 2)]
             for j, s in enumerate(c["rollback_by_j_s"])]
    rows += [[f"fallback: verify K={v['k']}, plain forward", _ms(v["plain_seconds"]),
              fmt.num(v["plain_seconds"] / c["ar_step_s"], 2)] for v in c["verify_s"] if "plain_seconds" in v]
    rows += [[f"fallback: rollback j={j}, restore + re-forward {j + 1} token{'s' if j else ''}", _ms(s),
              fmt.num(s / c["ar_step_s"], 2)] for j, s in enumerate(c.get("reforward_by_j_s", []))]
    return Table(["operation", "ms (median)", "× AR step"], rows, [False, True, True],
                 f"Cost terms at {c['context_tokens']} tokens of context, {c['repeats']} timed repeats each. The "
                 f"decoder captures per-position GatedDeltaNet states and commits the accepted one; snapshot + "
                 f"re-forward is its verified fallback (`rollback='reforward'`)")


def efficiency_table(b: dict[str, Any]) -> Table:
    rows = [[str(e["k"]), " / ".join(fmt.rate(s) for s in e["survival"]), fmt.num(e["tau"], 3),
             fmt.tok_s(e["ar_tok_s"]), fmt.tok_s(e["mtp_tok_s"]), fmt.ratio(e["predicted_speedup"]),
             fmt.ratio(e["realized_speedup"]), fmt.rate(e["efficiency"]), _break_even(e["break_even_acceptance"]),
             fmt.num(e["step_overhead"], 2), fmt.num(e["ar_overhead"], 2)] for e in b["mtp"]]
    return Table(["K", "survival by depth", "τ", "AR tok/s", "MTP tok/s", "predicted", "realized", "efficiency",
                  "break-even α", "MTP step time / model", "AR loop token time / isolated AR step"], rows,
                 [True, False] + [True] * 9, "Predicted (cost model) vs realized speedup, greedy")


def cost_model_table(b: dict[str, Any]) -> Table:
    """Predicted vs realized per setting, each priced with its own terms (bench.json's `cost_model`; absent from
    older files)."""
    cm = b.get("cost_model") or {"settings": [], "target_error": float("nan")}
    rows = [[e["setting"], str(e["k"]), fmt.num(e["tau"], 2), _ms(e["drafts_s"]), _ms(e["verify_s"]),
             _ms(e["model_step_s"]), _ms(e["measured_step_s"]), _ms(e["measured_ar_step_s"]),
             fmt.ratio(e["predicted_speedup"]), fmt.ratio(e["realized_speedup"]), _pct(e["error"]),
             f"{_pct(min(e['error_rounds']))} to {_pct(max(e['error_rounds']))}" if e.get("error_rounds") else fmt.DASH]
            for e in cm["settings"] if "verify_s" in e]
    return Table(["setting", "K", "τ", "drafts (ms)", "verify + rule (ms)", "modelled step (ms)", "measured step (ms)",
                  "AR loop per token (ms)", "predicted", "realized", "error", "error by round"], rows,
                 [False] + [True] * 11,
                 f"The cost model per setting: each setting's own drafts and verify (sampled: a host row and a sample "
                 f"per draft, K+1 rows and the rule), the AR loop's own time per token, timed in the same rounds as "
                 f"the runs; stated error {_pct(cm['target_error']).lstrip('+')}")


def records_table(b: dict[str, Any]) -> Table:
    rows = [[_mode(r["k"]), fmt.tok_s(r["no_records_tok_s"]), fmt.tok_s(r["records_tok_s"]), _pct(r["overhead"])]
            for r in b["records_overhead"]]
    return Table(["mode", "tok/s without records", "tok/s with records", "overhead"], rows,
                 [False, True, True, True], "Cost of the rich records (p, q, alpha, PIT)")


def sampling_table(b: dict[str, Any]) -> Table:
    """Sampled vs greedy (bench.json's `sampling` section; absent from older files)."""
    s = b.get("sampling") or {"rows": [], "decode": []}
    rows = [[f"host work per row, {r['setting']}, V={fmt.integer(r['vocab'])} (support {fmt.num(r['support_size'], 0)})",
             fmt.num(r["host_ms"], 3), fmt.num(r["device_ms"], 3) if "device_ms" in r else fmt.DASH,
             fmt.num(r["dense_oracle_ms"], 3) if "dense_oracle_ms" in r else fmt.DASH] for r in s["rows"]]
    rows += [[f"{_mode(d['k'])} time per {d['unit']}, greedy / {d['setting']} (ms); ratio, share beyond greedy",
              _ms(d["greedy_s"]), _ms(d["sampled_s"]), f"{fmt.num(d['ratio'], 3)}, {_pct(d['extra_share'])}"]
             for d in s["decode"]]
    rows += [[f"{_mode(d['k'])} bytes read back per {d['unit']}, greedy / sampled",
              fmt.integer(d["read_back_bytes_greedy"]), fmt.integer(d["read_back_bytes_sampled"]), fmt.DASH]
             for d in s["decode"]]
    return Table(["", "host (ms) · greedy", "device selection (ms) · sampled", "dense float64 oracle (ms) · ratio"],
                 rows, [False, True, True, True],
                 "Sampled decoding: selection work per row (host numpy, the decoder's choice; mlx on the device; the "
                 "old dense transform), and sampled vs greedy decode time (ABBA medians, records on)")


def roofline_table(b: dict[str, Any]) -> Table:
    r = b["roofline"]
    rows = [[_mode(m["k"]), fmt.tok_s(m["tok_s"]), fmt.num(m["bytes_per_token"] / 1e6, 2),
             fmt.num(m["achieved_gb_s"], 2), fmt.percent(m["share"])] for m in r["modes"]]
    return Table(["mode", "tok/s", "MB of weights per token", "achieved GB/s", "share of machine"], rows,
                 [False] + [True] * 4,
                 f"Weight-bandwidth roofline (machine: {r['machine_gb_s']:.1f} GB/s, numpy copy of "
                 f"{r['copy_mb']} MB, read + write)")


def context_table(b: dict[str, Any]) -> Table:
    ks = [m["k"] for m in b["context_scaling"][0]["mtp"]] if b["context_scaling"] else []
    rows = [[fmt.integer(c["prompt_tokens"]) + (" (capped)" if c["capped"] else ""), fmt.tok_s(c["prefill_tok_s"]),
             fmt.tok_s(c["ar_tok_s"])]
            + [f"{fmt.tok_s(m['tok_s'])} ({fmt.ratio(m['speedup'])}, τ {fmt.num(m['tau'], 2)})" for m in c["mtp"]]
            for c in b["context_scaling"]]
    return Table(["prompt tokens", "prefill tok/s", "AR tok/s"] + [f"K={k} tok/s (speedup, τ)" for k in ks], rows,
                 [True] * (3 + len(ks)), "Decode throughput against context length (τ: tokens per verify step, so "
                 "a speedup can be told apart from the checkpoint's acceptance at that length)")


def blas_table(b: dict[str, Any]) -> Table:
    bl = b.get("blas_vs_reference") or {}
    if not bl.get("available"):
        return Table(["BLAS comparison"], [[fmt.text(bl.get("note"))]] if bl else [], [False], "BLAS")
    o, r = bl["openblas"], bl["reference"]
    rows = [["AR decode tok/s", fmt.tok_s(o["ar_tok_s"]), fmt.tok_s(r["ar_tok_s"]), fmt.num(bl["ar_tok_s_ratio"], 2)],
            ["AR step (ms)", _ms(o["costs"]["ar_step_s"]), _ms(r["costs"]["ar_step_s"]), fmt.num(bl["ar_step_ratio"], 2)]]
    rows += [[f"verify K={k} (ms)", _ms(v["seconds"]), _ms(w["seconds"]), fmt.num(w["seconds"] / v["seconds"], 2)]
             for k, v, w in ((v["k"], v, w) for v, w in zip(o["costs"]["verify_s"], r["costs"]["verify_s"]))]
    return Table(["", f"{b['blas']} (this run)", "mlx's bundled reference BLAS", "gain"], rows,
                 [False, True, True, True], "The same terms with the BLAS mlx's Linux CPU wheel ships (measured in a "
                 "child process without the OpenBLAS preload, same checkpoint and prompt)")


@styled
def speedup_plot(b: dict[str, Any]) -> str | None:
    """Predicted and realized speedup side by side per K, with the no-speedup line."""
    eff = b["mtp"]
    if not eff:
        return None
    fig, ax = figure(5.6, 3.2)
    x = np.arange(len(eff))
    ax.bar(x - 0.18, [e["predicted_speedup"] for e in eff], width=0.36, label="predicted (measured costs)")
    ax.bar(x + 0.18, [e["realized_speedup"] for e in eff], width=0.36, label="realized (decoder)")
    ax.axhline(1.0, color="grey", lw=0.8, label="AR")
    ax.set_xticks(x, [f"K={e['k']}" for e in eff])
    ax.set_ylabel("speedup over AR")
    legend(ax)
    return to_svg(fig, "bench-speedup")


def _inline(svg: str | None) -> Markup | None:
    """Inline SVG needs no namespace declarations inside HTML: drop them, so the page names no URL at all."""
    if not svg:
        return None
    return Markup(re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg))  # our own matplotlib output, not user text


def _environment() -> Environment:
    return Environment(loader=PackageLoader("mtpbench.report", "templates"),
                       autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)


def overview_table(benches: list[dict[str, Any]]) -> Table:
    """One line per benched checkpoint: the figures to compare across sizes."""
    rows = []
    for b in benches:
        best = max(b["mtp"], key=lambda e: e["realized_speedup"]) if b.get("mtp") else None
        rows.append([b["model"]["name"], fmt.integer(b["model"]["trunk_params"]), fmt.tok_s(b["ar_parity"]["ours_median"]),
                     fmt.num(b["ar_parity"]["ratio"], 3),
                     fmt.num(b["costs"]["verify_s"][0]["over_ar_step"], 2) if b["costs"]["verify_s"] else fmt.DASH,
                     f"K={best['k']}: {fmt.ratio(best['realized_speedup'])}" if best else fmt.DASH,
                     " / ".join(fmt.rate(e["efficiency"]) for e in b.get("mtp", []))])
    return Table(["checkpoint", "trunk params", "AR tok/s", "AR parity (ours / mlx_lm)", "verify K=1 / AR step",
                  "best realized speedup", "efficiency by K"], rows, [False, True, True, True, True, False, False],
                 "Benched checkpoints side by side (same machine, same settings unless stated in each section)")


def _render(bench: dict[str, Any], sid: str = "bench") -> str:
    tables = [parity_table(bench), costs_table(bench), efficiency_table(bench), cost_model_table(bench),
              records_table(bench),
              roofline_table(bench), context_table(bench), blas_table(bench)]
    if bench.get("sampling"):
        tables.insert(5, sampling_table(bench))
    prov = sorted((k, str(v)) for k, v in bench.get("provenance", {}).items())
    return _environment().get_template("bench.html.j2").render(
        sid=sid, b=bench, model=bench["model"], tables=tables, svg=_inline(speedup_plot(bench)), provenance=prov,
        settings=json.dumps(bench.get("settings", {}), sort_keys=True))


def render_bench_html(bench: dict[str, Any], sid: str = "bench") -> str:
    """A <section> fragment for embedding in another page."""
    return _render(bench, sid)


def render_benches_html(benches: list[dict[str, Any]]) -> str:
    """The fragments of several benches, one section each."""
    return "\n".join(_render(b, f"bench-{i}" if len(benches) > 1 else "bench") for i, b in enumerate(benches))


def render_bench_page(bench_json: Path | list[Path], out: Path) -> Path:
    """Read one or more bench.json files and write one standalone, self-contained HTML page to `out`."""
    paths = bench_json if isinstance(bench_json, list) else [bench_json]
    benches = [json.loads(Path(p).read_text()) for p in paths]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = _environment().get_template("bench_page.html.j2").render(
        names=", ".join(b["model"]["name"] for b in benches), body=Markup(render_benches_html(benches)),
        overview=overview_table(benches) if len(benches) > 1 else None)
    out.write_text(page, encoding="utf-8")
    return out
