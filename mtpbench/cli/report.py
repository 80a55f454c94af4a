"""`mtpbench report` (one self-contained HTML page) and `mtpbench card` (model-card tables)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import friendly


@click.command("report")
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", default=None, help="HTML file (default: reports/<first results dir>.html).")
@click.option("--title", default=None)
@friendly
def report_cmd(results_dirs, out, title):
    """Render one self-contained HTML report from one or more results dirs (they merge into one comparison)."""
    from ..report import render_report

    dirs = [Path(d) for d in results_dirs]
    path = render_report(dirs, Path(out) if out else Path("reports") / f"{dirs[0].name}.html", title=title,
                         say=lambda line: click.echo(line, err=True))
    click.echo(str(path))


@click.command("card")
@click.argument("results_dir", type=click.Path())
@click.option("--model", "-m", default=None, help="Model name in the results (needed when there are several).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("-o", "--out", default=None, help="Write to a file instead of stdout.")
@friendly
def card_cmd(results_dir, model, fmt, out):
    """Model-card tables (Mode | tok/s | speedup, acceptance by depth, verdict, formats), ready to paste."""
    from ..atomic import write_text
    from ..report import render_card

    text = render_card(Path(results_dir), model=model, fmt=fmt, say=lambda line: click.echo(line, err=True))
    if out:
        write_text(Path(out), text)
        click.echo(out)
    else:
        click.echo(text)
