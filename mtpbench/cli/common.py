"""What every CLI module shares: one-line errors instead of tracebacks, the sampling options, a progress bar."""

from __future__ import annotations

import sys
from functools import wraps

import click

from ..errors import UserError


def friendly(fn):
    """Turn a UserError into one line on stderr and a non-zero exit, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def sampling_options(fn):
    """--temp/--top-p/--top-k/--min-p/--seed for commands that decode one setting (generate, acceptance)."""
    for opt in reversed([
        click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass (1 disables)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k (0 disables)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min-p (0 disables)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
    ]):
        fn = opt(fn)
    return fn


class Progress:
    """A click progress bar on stderr that appears with the first event (silent when `quiet`)."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet, self.bar = label, quiet, None

    def __call__(self, ev) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=ev.total, label=self.label, show_eta=True, show_pos=True,
                                         item_show_func=lambda s: s, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(1, f"{ev.label}: {ev.tok_s:.1f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
