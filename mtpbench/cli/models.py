"""Checkpoint commands: `inspect`, `make-tiny`, `make-demo`, `policies`, `quantize`, `graft`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .common import friendly


@click.command("policies")
@friendly
def policies_cmd() -> None:
    """List the built-in quantization policies (TRUNK[+MTP])."""
    from ..builders.policies import policy_lines

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
@friendly
def quantize_cmd(model: str, out: Path, policy: str, group_size: int, lm_head_bits: int | None,
                 mtp_layout: str) -> None:
    """Quantize MODEL (trunk and MTP head) by a policy and write an MLX checkpoint to OUT."""
    from ..builders.quantize import quantize_checkpoint, summary

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
@friendly
def graft_cmd(trunk: str, mtp_from: str, out: Path, mtp_policy: str | None) -> None:
    """Copy the MTP head of --mtp-from next to TRUNK's weights (e.g. a conversion that stripped it) into OUT."""
    from ..builders.quantize import graft, summary

    path = graft(trunk, mtp_from, out, mtp_policy=mtp_policy)
    click.echo(str(path))
    click.echo(summary(path))


@click.command("make-demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Checkpoint dir to write [default: a new dir, results/demo-rebuild]; the shipped one is never "
                   "overwritten unless named.")
@click.option("--prompts-out", type=click.Path(dir_okay=False), default=None,
              help="Where the held-out prompt set goes [default: next to the checkpoint, stdlib.jsonl].")
@click.option("--phase1-steps", type=int, default=None, help="Joint trunk + MTP steps [default: the recipe's].")
@click.option("--phase2-steps", type=int, default=None, help="Head distillation steps [default: the recipe's].")
@click.option("--batch", type=int, default=None, help="Sequences per step [default: the recipe's].")
@friendly
def make_demo_cmd(out, prompts_out, phase1_steps, phase2_steps, batch):
    """Rebuild the embedded default with its recipe (under an hour on 2 CPU cores, progress shown).

    Runs under the same BLAS set-up as every mtpbench command (OpenBLAS preloaded, one thread on Linux), which
    makes the run deterministic; recipe.json records it. Compare with the shipped one:
    `mtpbench acceptance -m OUT --prompts stdlib` or `mtpbench sweep -m OUT --temp 0`.
    """
    from dataclasses import replace

    from ..builders.demo import Recipe, train

    dest = Path(out) if out else Path("results") / "demo-rebuild"
    steps = {"phase1_steps": phase1_steps, "phase2_steps": phase2_steps, "batch": batch}
    r = replace(Recipe(), **{k: v for k, v in steps.items() if v})
    train(dest, r, Path(prompts_out) if prompts_out else dest.parent / f"{dest.name}-stdlib.jsonl")
    click.echo(str(dest))


@click.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True, help="Trunk layers (every 2nd is attention).")
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--vocab", type=int, default=320, show_default=True, help="Tokenizer size (byte-level BPE, >= 261).")
@click.option("--vocab-size", type=int, default=0,
              help="Model vocabulary (embedding and lm-head rows), wider than the tokenizer, e.g. Qwen's 248320; ids "
                   "past the tokenizer decode to <|pad_ID|> [default: --vocab].")
@click.option("--tie-embeddings", is_flag=True, help="Tie the lm head to the embedding (as Qwen3.5-0.8B does).")
@click.option("--no-mtp", is_flag=True, help="Write no MTP head (like conversions that strip mtp.*).")
@click.option("--mtp-layout", type=click.Choice(["inline", "sidecar"]), default="inline", show_default=True)
@click.option("--mtp-prefix", default="mtp.", show_default=True,
              help="mtp. | model.mtp. | language_model.mtp. | model.language_model.mtp.")
@click.option("--layout", type=click.Choice(["hf", "mlx"]), default="hf", show_default=True,
              help="hf: as Qwen publishes Qwen3.5 (HF key names, conv1d (C, 1, K), norms as offsets); mlx: as "
                   "mlx_lm.convert writes (its key names and conv order, norms already shifted).")
@click.option("--shards", type=int, default=1, show_default=True, help="Split the weights into N shards with an index.")
@click.option("--moe", is_flag=True, help="A qwen3_5_moe checkpoint: sparse MoE MLPs with a gated shared expert, "
              "in the head too.")
@click.option("--experts", type=int, default=4, show_default=True, help="Experts per MoE layer (with --moe).")
@click.option("--experts-per-token", type=int, default=2, show_default=True, help="Experts routed per token.")
@click.option("--mtp-experts", type=click.Choice(["per-expert", "fused", "switch"]), default="per-expert",
              show_default=True, help="How the head's experts are stored: one tensor per expert (Qwen3.5), fused "
              "gate_up_proj (Qwen3.6) or MLX switch layers.")
@click.option("--force", is_flag=True, help="Overwrite a checkpoint already at OUT (default: refuse).")
@friendly
def make_tiny_cmd(out, seed, layers, hidden, vocab, vocab_size, tie_embeddings, no_mtp, mtp_layout, mtp_prefix,
                  layout, shards, moe, experts, experts_per_token, mtp_experts, force):
    """Write a tiny random Qwen3.5 checkpoint with an MTP head to OUT (for tests and experiments)."""
    from ..builders.tiny import TinySpec, make_tiny

    try:
        spec = TinySpec(seed=seed, layers=layers, hidden=hidden, vocab=vocab, vocab_size=vocab_size,
                        tie_embeddings=tie_embeddings, mtp=not no_mtp, mtp_layout=mtp_layout, mtp_prefix=mtp_prefix,
                        layout=layout, shards=shards, moe=moe, experts=experts,
                        experts_per_token=experts_per_token, mtp_experts=mtp_experts)
        path = make_tiny(out, spec, force=force)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(str(path))


@click.command("inspect")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--mtp-from", default=None, metavar="DIR", help="Describe MODEL drafting with the MTP head of DIR (a "
              "checkpoint or a qwen3_5_mtp head repo).")
@friendly
def inspect_cmd(model, as_json, mtp_from):
    """Describe MODEL (a directory or a cached hub repo id; default: the embedded demo checkpoint): its layers,
    formats, MTP head (where it was read, each norm family's convention, each quantized module's mode) and every
    convention its MTPLX contract declares, with the file and key it came from."""
    from ..model.checkpoint import load
    from ..defaults import default_model
    from ..model.describe import describe, describe_text

    info = describe(load(model or default_model(), mtp_from=mtp_from))
    click.echo(json.dumps(info, indent=2) if as_json else describe_text(info))
