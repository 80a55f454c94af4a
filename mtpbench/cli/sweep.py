"""`mtpbench sweep`: its options are built from the table of axes and options (`sweep.axes`), so every axis has
one flag, one sweep-file key and one parser; values merge (command line over sweep file over defaults) and are
validated by the library before any model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import UserError
from ..secrets import redact_command
from ..sweep.axes import AXES, OPTIONS, Option, read_sweep_file
from .common import Progress, friendly


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: invalid TOML ({str(e).splitlines()[0]})") from None


def _click_option(opt: Option):
    if opt.kind is bool:
        return click.option(*opt.flags, opt.name, is_flag=True, default=None, help=opt.help)
    kind = {int: int, float: float}.get(opt.kind, str)
    typ = click.Choice(opt.choices) if opt.choices else kind
    shown = f" [default: {','.join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default}]" \
        if opt.default not in (None, (), "") and not opt.repeatable else ""
    return click.option(*opt.flags, opt.name, type=typ, default=None, multiple=opt.repeatable,
                        metavar=opt.metavar, help=opt.help + shown)


def table_options(fn):
    """One click option per axis and per scalar option of the sweep tables (default None: "not given")."""
    for axis in reversed(AXES):
        default = "" if not axis.default else " [default: " + ",".join(
            "same" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in axis.default) + "]"
        fn = click.option(*axis.flags, axis.name, default=None, multiple=axis.repeatable, metavar=axis.metavar,
                          help=axis.help + default)(fn)
    for opt in reversed(OPTIONS):
        fn = _click_option(opt)(fn)
    return fn


@click.command("sweep")
@table_options
@click.option("--config", "config_file", default=None, help="TOML sweep file (same keys as the options, with _ "
              "for -); command-line values override it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary (for scripts).")
@click.option("--no-report", is_flag=True, help="Do not render the HTML report at the end.")
@click.option("--bench", "bench_models", is_flag=True,
              help="Also run `mtpbench bench` on each checkpoint (cost terms, AR parity with mlx_lm, predicted vs "
                   "realized speedup, roofline, context scaling) into <out>/bench/; the report shows it.")
@click.option("--no-cost-model", is_flag=True,
              help="Do not time each checkpoint's step costs after the sweep (seconds each; they give the summary's "
                   "predicted and bandwidth-bound projected speedups). Skipped anyway with --quiet --no-report.")
@click.option("--bench-large", is_flag=True,
              help="With --bench: also bench a generated ~118M-parameter checkpoint, where verify is cheap.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where cells run: in this process, or one Ray task per (model, policy) group (needs the ray extra).")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="With --executor ray: the cluster's head (e.g. HEAD:6379); default: a local Ray instance.")
@click.pass_context
@friendly
def sweep_cmd(ctx, config_file, quiet, no_report, bench_models, no_cost_model, bench_large, executor, ray_address,
              **given):
    """Sweep checkpoints x K x sampling settings x prompt sets: AR and MTP side by side, into parquet.

    Rerunning the same command resumes: only missing cells run. Results land in results/<name>/ as parquet
    tables (runs, steps, tokens, verdicts) with a manifest; an HTML report is rendered at the end. Servers
    (--endpoint) are measured with the same prompts and settings, next to or instead of the reference decoder.
    """
    from ..perf.bench import bench_into, cost_models_into
    from ..report.console import summary_of
    from ..report.html import render_report
    from ..orchestrate.sweep import run_sweep
    from ..sweep.spec import default_out, spec_from_values

    values = read_sweep_file(_read_toml(config_file), config_file).given if config_file else {}
    values.update({k: v for k, v in given.items() if v is not None and v != ()})
    typed = ctx.get_parameter_source("max_tokens") == ParameterSource.COMMANDLINE and given["max_tokens"] is not None
    spec = spec_from_values(values, max_tokens_wins=typed or "max_tokens" in values)
    out = Path(values["out"]) if values.get("out") else default_out(spec)
    command = redact_command(sys.argv[1:]) if Path(sys.argv[0]).name in ("mtpbench", "__main__.py") \
        else "mtpbench sweep"
    progress = Progress("sweep", quiet)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    for axis, value in spec.declared:
        say(f"{axis.replace('_', '-')}: {value}, as the checkpoints' MTPLX contract declares (pass "
            f"--{axis.replace('_', '-')} to choose)")
    try:
        outcome = run_sweep(spec, out, command, progress, executor=executor, ray_address=ray_address, say=say)
    finally:
        progress.close()
    log = None if quiet else (lambda m: click.echo(f"bench: {m}", err=True))
    if bench_models and spec.models:  # before the summary, which sets the bench's predictions beside the speedups
        bench_into(out, list(spec.models), spec.ks, bench_large, log)
    elif spec.models and not no_cost_model and not (quiet and no_report):
        cost_models_into(out, list(spec.models), spec.ks, log, [st.config(0) for st in spec.settings])
    if not quiet:
        if outcome.cells_skipped:
            click.echo(f"resumed: {outcome.cells_skipped} of {outcome.cells_total} cells were already done")
        click.echo(summary_of(out))
    click.echo(f"results: {out}")
    if not no_report:
        try:
            click.echo(f"report: {render_report([out], Path('reports') / f'{out.name}.html', say=say)}")
        except UserError as e:  # the results are written; only the page is missing
            click.echo(f"warning: no report written ({e}); render it elsewhere with `mtpbench report {out} -o FILE`",
                       err=True)
    if outcome.failed_runs:
        click.echo(f"{len(outcome.failed_runs)} run(s) failed, e.g. {outcome.failed_runs[0]}", err=True)
        sys.exit(1)



