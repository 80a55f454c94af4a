"""`mtpbench bench`'s figures as plain lines for the terminal (the HTML page, report/bench_section.py, has them
all). Pure: it reads the bench.json dict."""

from __future__ import annotations

import math
from typing import Any


def _alpha(x: float) -> str:
    return "never" if math.isnan(x) else f"{x:.3f}"  # NaN: slower than AR even at acceptance 1


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def summary_lines(bench: dict[str, Any]) -> list[str]:
    """The figures a reader wants first, as plain lines (the HTML page has them all)."""
    c, p, roof = bench["costs"], bench["ar_parity"], bench["roofline"]
    m = bench["model"]
    lines = [
        (f"model {m['name']}: {m['trunk_params'] / 1e6:.1f}M trunk params, BLAS {bench['blas']}, "
         f"{bench['provenance'].get('device', '?')}"),
        (f"AR parity: ours {p['ours_median']:.1f} tok/s vs mlx_lm {p['mlx_lm_median']:.1f} tok/s, "
         f"ratio {p['ratio']:.3f}"),
        (f"costs at {c['context_tokens']} tokens of context: AR step {1e3 * c['ar_step_s']:.3f} ms, "
         f"draft step {1e3 * c['draft_step_s']:.3f} ms ({c['draft_over_ar_step']:.2f}x AR)"),
    ]
    lines += [f"  {d['k']} chained drafts: {1e3 * d['seconds']:.3f} ms" for d in c.get("draft_chain_s", []) if d["k"] > 1]
    lines += [f"  verify K={v['k']}: {1e3 * v['seconds']:.3f} ms ({v['over_ar_step']:.2f}x AR) keeping every "
              f"GDN state; {1e3 * v['plain_seconds']:.3f} ms plain" for v in c["verify_s"]]
    lines.append("  rollback by accepted prefix j, capture (commit): "
                 + ", ".join(f"j={j} {1e3 * s:.3f} ms" for j, s in enumerate(c["rollback_by_j_s"])))
    lines.append("  rollback by accepted prefix j, snapshot + re-forward: "
                 + ", ".join(f"j={j} {1e3 * s:.3f} ms" for j, s in enumerate(c["reforward_by_j_s"])))
    lines.append("K  tau    predicted  realized  efficiency  break-even α  step overhead")
    lines += [f"{e['k']:<2} {e['tau']:.2f}   {e['predicted_speedup']:.3f}x     {e['realized_speedup']:.3f}x    "
              f"{e['efficiency']:.3f}       {_alpha(e['break_even_acceptance'])}         {e['step_overhead']:.2f}x"
              for e in bench["mtp"]]
    cm = bench.get("cost_model")
    if cm:
        lines.append(f"cost model, each setting priced with its own terms (target: within "
                     f"{100 * cm['target_error']:.0f}%): setting  K  predicted  realized  error")
        lines += [f"  {e['setting']:<28} {e['k']}  {e['predicted_speedup']:.3f}x    {e['realized_speedup']:.3f}x   "
                  f"{_pct(e['error'])}" for e in cm["settings"]]
    lines.append("records overhead (rich p/q/alpha/PIT records vs none): "
                 + ", ".join(f"{'AR' if r['k'] == 0 else 'K=' + str(r['k'])} {_pct(r['overhead'])}"
                             for r in bench["records_overhead"]))
    lines.append(f"roofline: machine copy bandwidth {roof['machine_gb_s']:.1f} GB/s; weights "
                 f"{roof['trunk_bytes'] / 1e6:.1f} MB trunk, {roof['draft_step_bytes'] / 1e6:.1f} MB per draft step")
    lines += [f"  {'AR ' if r['k'] == 0 else 'K=' + str(r['k'])}: {r['tok_s']:.1f} tok/s -> "
              f"{r['achieved_gb_s']:.2f} GB/s ({100 * r['share']:.1f}% of machine)" for r in roof["modes"]]
    bl = bench.get("blas_vs_reference")
    if bl and bl.get("available"):
        lines.append(f"BLAS: {bench['blas']} vs mlx's bundled reference: AR {bl['openblas']['ar_tok_s']:.1f} vs "
                     f"{bl['reference']['ar_tok_s']:.1f} tok/s ({bl['ar_tok_s_ratio']:.2f}x); verify time reference/"
                     f"openblas " + ", ".join(f"K={k} {r:.2f}x" for k, r in bl["verify_ratio"].items()))
    elif bl:
        lines.append(f"BLAS comparison: {bl.get('note')}")
    lines.append("context scaling (decode tok/s): prompt  AR  " + "  ".join(f"K={k}" for k in bench["settings"]["ks"]))
    for row in bench["context_scaling"]:
        cells = "  ".join(f"{r['tok_s']:.1f} ({r['speedup']:.2f}x)" for r in row["mtp"])
        lines.append(f"  {row['prompt_tokens']:>6}{' (capped)' if row['capped'] else ''}  {row['ar_tok_s']:.1f}  {cells}")
    return lines
