"""The `mtpbench` command group and the console-script entry; each command lives in its group's module."""

from __future__ import annotations

import sys

import click

from ..model.blas import reexec_with_openblas
from .bench import bench_cmd
from .doctor import doctor_cmd
from .generate import acceptance_cmd, generate_cmd
from .models import graft_cmd, inspect_cmd, make_demo_cmd, make_tiny_cmd, policies_cmd, quantize_cmd
from .report import card_cmd, report_cmd
from .sweep import sweep_cmd
from .verify import verify_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--blas", type=click.Choice(["openblas", "reference"]), default="openblas", show_default=True,
              help="Linux CPU only: preload an OpenBLAS under mlx (fast, same results; each library is first checked "
                   "in a child process, once per machine, and one that fails is never preloaded) or keep mlx's "
                   "bundled reference BLAS.")
@click.version_option(package_name="mtpbench")
def main(blas: str) -> None:
    """Benchmark and verify native MTP speculative decoding for Qwen3.5/3.6 checkpoints on MLX.

    With no --model, commands use the embedded default: a small Qwen3.5-style model with an MTP head trained on
    the Python standard library, so every command runs offline on a fresh machine.
    """
    # The choice is acted on in `entry()`, before anything loads mlx; here it only documents the option.


for command in (sweep_cmd, verify_cmd, report_cmd, card_cmd, generate_cmd, acceptance_cmd, inspect_cmd, bench_cmd,
                policies_cmd, quantize_cmd, graft_cmd, make_tiny_cmd, make_demo_cmd, doctor_cmd):
    main.add_command(command)


def entry() -> None:
    """Console-script entry: preload an OpenBLAS that passes its probe (re-executing once) unless `--blas
    reference`, then run the CLI (on mlx's bundled BLAS, said on stderr, when no OpenBLAS passes)."""
    argv = sys.argv[1:]
    choice = "openblas"
    for i, a in enumerate(argv):
        if a == "--blas" and i + 1 < len(argv):
            choice = argv[i + 1]
        elif a.startswith("--blas="):
            choice = a.split("=", 1)[1]
    reexec_with_openblas(choice)
    main()
