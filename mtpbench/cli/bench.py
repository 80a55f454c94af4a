"""`mtpbench bench`: a thin click wrapper over mtpbench.perf.bench, printing perf.summary's lines."""

from __future__ import annotations

from pathlib import Path

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
    from ..perf.bench import safe_name

    return Path("reports") / f"bench-{safe_name(model)}"


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
    from ..perf.bench import run_bench, safe_name
    from ..perf.large import bench_targets
    from ..perf.summary import summary_lines
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
