"""What every CLI module shares: one-line errors instead of tracebacks."""

from __future__ import annotations

import sys
from functools import wraps

import click

from .errors import UserError


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
