"""What every CLI module shares: one-line errors instead of tracebacks, and the comma-list parsers."""

from __future__ import annotations

import sys
from functools import wraps

import click

from ..errors import UserError


def _friendly(fn):
    """Turn a UserError into one line on stderr and a non-zero exit, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def int_list(text, option: str, minimum: int | None = None) -> tuple[int, ...]:
    """`--option 0,8,4` (or a list from a sweep file) as integers, each at least `minimum` when given."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = tuple(int(x) for x in items if str(x).strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: expected integers separated by commas") from None
    if minimum is not None and (not values or min(values) < minimum):
        raise UserError(f"{option} {text!r}: expected integers of at least {minimum}")
    return values
