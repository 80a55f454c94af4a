"""`mtpbench doctor`: a thin click wrapper over mtpbench.perf.doctor (one verdict line per check)."""

from __future__ import annotations

import sys

import click

from .common import friendly


@click.command("doctor")
@click.option("--model", "-m", default=None, help="Checkpoint directory or cached repo id (default: embedded demo).")
@friendly
def doctor_cmd(model: str | None) -> None:
    """Check the instrument on this machine and checkpoint: the BLAS, greedy AR against mlx_lm, greedy MTP against
    AR, the counter invariants, the prefill/decode split, the cost model, a quiet machine. Exit 0 when all hold."""
    from ..defaults import default_model
    from ..perf.doctor import run_doctor

    checks = run_doctor(model or default_model(), say=click.echo)
    sys.exit(0 if all(c.ok for c in checks) else 1)
