"""`mtpbench policies | quantize | graft`: thin click wrappers over mtpbench.quantize.

Plain commands (not attached to a group here); mtpbench.cli registers them with `main.add_command(...)`.
"""

from __future__ import annotations

from pathlib import Path

import click

from .common import _friendly


@click.command("policies")
@_friendly
def policies_cmd() -> None:
    """List the built-in quantization policies (TRUNK[+MTP])."""
    from ..build.quantize import policy_lines

    for line in policy_lines():
        click.echo(line)


@click.command("quantize")
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--policy", required=True, help="TRUNK[+MTP], e.g. q4+mtp-int4 (see `mtpbench policies`).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Affine quantization group size.")
@click.option("--lm-head-bits", type=int, default=None,
              help="Bits for lm_head and embedding (16 = leave unquantized); default: the policy's.")
@click.option("--mtp-layout", type=click.Choice(["inline", "sidecar"]), default="inline", show_default=True,
              help="MTP tensors inline under `mtp.` or in a mtp.safetensors sidecar.")
@_friendly
def quantize_cmd(model: str, out: Path, policy: str, group_size: int, lm_head_bits: int | None,
                 mtp_layout: str) -> None:
    """Quantize MODEL (trunk and MTP head) by a policy and write an MLX checkpoint to OUT."""
    from ..build.quantize import quantize_checkpoint, summary

    path = quantize_checkpoint(model, out, policy, group_size=group_size, lm_head_bits=lm_head_bits,
                               mtp_layout=mtp_layout)
    click.echo(str(path))
    click.echo(summary(path))


@click.command("graft")
@click.argument("trunk")
@click.option("--mtp-from", "mtp_from", required=True, help="Checkpoint whose MTP head to copy.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--mtp-policy", type=click.Choice(["mtp-int4", "mtp-q8"]), default=None,
              help="Quantize the grafted head's attention/MLP linears (default: copy as is).")
@_friendly
def graft_cmd(trunk: str, mtp_from: str, out: Path, mtp_policy: str | None) -> None:
    """Copy the MTP head of --mtp-from next to TRUNK's weights (e.g. a conversion that stripped it) into OUT."""
    from ..build.quantize import graft, summary

    path = graft(trunk, mtp_from, out, mtp_policy=mtp_policy)
    click.echo(str(path))
    click.echo(summary(path))
