"""`mtpbench bench`: a thin click wrapper over mtpbench.bench, printing a readable summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from .common import friendly
from ..errors import UserError


def _contexts(text: str, ints) -> tuple[int, ...]:
    values = ints(text, "--contexts")
    if not values or min(values) < 1:
        raise UserError(f"--contexts {text!r}: expected integers of at least 1")
    return values


def default_out(model: str) -> Path:
    """reports/bench-<model name>."""
    from ..bench import safe_name

    return Path("reports") / f"bench-{safe_name(model)}"


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


@click.command("bench")
@click.option("--model", "models", multiple=True,
              help="Checkpoint directory or cached hub repo id; repeat for several (default: the embedded demo).")
@click.option("--large", is_flag=True, help="Also bench a generated ~118M-parameter checkpoint (random weights, "
              "head built to agree; built and cached on first use), where a verify costs little more than one step.")
@click.option("--k", "k_text", default="1..3", show_default=True, help="Draft depths: 3, 1,2,4 or 1..4.")
@click.option("--max-tokens", type=int, default=None, help="Tokens per decode run [default: 128; --quick 12].")
@click.option("--repeats", type=int, default=None, help="Timed repetitions per measurement [default: 5; --quick 2].")
@click.option("--contexts", default=None, help="Prompt lengths for context scaling [default: 512,2048,8192].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: reports/bench-<model>, or reports/bench with several].")
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test of the plumbing, not a measurement.")
@friendly
def bench_cmd(models: tuple[str, ...], large: bool, k_text: str, max_tokens: int | None, repeats: int | None,
              contexts: str | None, out_dir: Path | None, quick: bool) -> None:
    """Measure the cost terms of MTP decoding (both rollbacks), AR parity with mlx_lm, predicted vs realized
    speedup, records overhead, a bandwidth roofline and context scaling; write bench.json and one bench.html."""
    from ..bench import bench_targets, run_bench, safe_name
    from ..sweep.axes import ints, k_values
    from ..defaults import default_model
    from ..report.bench_section import render_bench_page

    ks = k_values(k_text)
    overrides = {"max_tokens": max_tokens, "repeats": repeats,
                 "contexts": _contexts(contexts, ints) if contexts else None}
    targets = bench_targets(models or (default_model(),), ks, large, quick,
                            **{k: v for k, v in overrides.items() if v is not None})
    single = len(targets) == 1
    out = out_dir or (default_out(targets[0][0]) if single else Path("reports") / "bench")
    written = []
    for model, settings in targets:
        where = out if single else out / safe_name(model)
        bench = run_bench(model, where, ks, settings, log=lambda msg: click.echo(f"... {msg}", err=True))
        for line in summary_lines(bench):
            click.echo(line)
        written.append(where / "bench.json")
        click.echo(f"wrote {written[-1]}")
    page = render_bench_page(written, out / "bench.html")
    click.echo(f"wrote {page}")
