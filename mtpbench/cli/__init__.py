"""The `mtpbench` command line: one module per command group, each only parsing, validating through the library,
calling one function and printing. `entry` is the console script."""

from .main import entry, main

__all__ = ["entry", "main"]
