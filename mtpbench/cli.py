"""The `mtpbench` command line: parse, validate, call one library function, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path

import click

from .blas import reexec_with_openblas
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


def parse_k(text: str) -> list[int]:
    """'1..4' -> [1, 2, 3, 4]; '1,2,4'; '3'."""
    from .decode import MAX_K

    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split("..", 1))
            if hi < lo:
                raise UserError(f"--k {text}: empty range (write low..high, e.g. 1..4)")
            ks = list(range(lo, hi + 1))
        else:
            ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--k {text!r}: expected a depth like 3, a list like 1,2,4 or a range like 1..4") from None
    if not ks:
        raise UserError("--k: no depth given")
    bad = [k for k in ks if not 1 <= k <= MAX_K]
    if bad:
        raise UserError(f"--k: depth {bad[0]} is out of range (1..{MAX_K})")
    return sorted(set(ks))


def sampling_options(fn):
    for opt in reversed([
        click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass (1 disables)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k (0 disables)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min-p (0 disables)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
    ]):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--blas", type=click.Choice(["openblas", "reference"]), default="openblas", show_default=True,
              help="Linux CPU only: preload OpenBLAS under mlx (fast, same results) or keep mlx's bundled reference BLAS.")
@click.version_option(package_name="mtpbench")
def main(blas: str) -> None:
    """Benchmark and verify native MTP speculative decoding for Qwen3.5/3.6 checkpoints on MLX.

    With no --model, commands use the embedded default: a small Qwen3.5-style model with an MTP head trained on
    the Python standard library, so every command runs offline on a fresh machine.
    """
    # The choice is acted on in `entry()`, before anything loads mlx; here it only documents the option.


def entry() -> None:
    """Console-script entry: preload OpenBLAS (re-executing once) unless `--blas reference`, then run the CLI."""
    argv = sys.argv[1:]
    choice = "openblas"
    for i, a in enumerate(argv):
        if a == "--blas" and i + 1 < len(argv):
            choice = argv[i + 1]
        elif a.startswith("--blas="):
            choice = a.split("=", 1)[1]
    reexec_with_openblas(choice)
    main()


@main.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True, help="Trunk layers (every 2nd is attention).")
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--vocab", type=int, default=320, show_default=True, help="Tokenizer size (byte-level BPE, >= 261).")
@click.option("--no-mtp", is_flag=True, help="Write no MTP head (like conversions that strip mtp.*).")
@click.option("--mtp-layout", type=click.Choice(["inline", "sidecar"]), default="inline", show_default=True)
@click.option("--mtp-prefix", default="mtp.", show_default=True,
              help="mtp. | model.mtp. | language_model.mtp. | model.language_model.mtp.")
@click.option("--hf-norms", is_flag=True, help="Raw Hugging Face layout: norms as offsets, HF key names and conv layout.")
@click.option("--shards", type=int, default=1, show_default=True, help="Split the weights into N shards with an index.")
@_friendly
def make_tiny_cmd(out, seed, layers, hidden, vocab, no_mtp, mtp_layout, mtp_prefix, hf_norms, shards):
    """Write a tiny random Qwen3.5 checkpoint with an MTP head to OUT (for tests and experiments)."""
    from .tiny import TinySpec, make_tiny

    try:
        spec = TinySpec(seed=seed, layers=layers, hidden=hidden, vocab=vocab, mtp=not no_mtp, mtp_layout=mtp_layout,
                        mtp_prefix=mtp_prefix, hf_norms=hf_norms, shards=shards)
        path = make_tiny(out, spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(str(path))


@main.command("inspect")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def inspect_cmd(model, as_json):
    """Describe MODEL (a directory or a cached hub repo id; default: the embedded demo checkpoint)."""
    from .checkpoint import load
    from .defaults import default_model
    from .describe import describe, describe_text

    info = describe(load(model or default_model()))
    click.echo(json.dumps(info, indent=2) if as_json else describe_text(info))


@main.command("generate")
@click.option("--model", "-m", help="Checkpoint directory or cached repo id (default: embedded demo).")
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--ar", "ar_mode", is_flag=True, help="Autoregressive baseline (the default when --k is not given).")
@click.option("--k", type=int, default=None, help="MTP draft depth; speculative decoding when given.")
@click.option("--draft-temp", type=float, default=None, help="Draft temperature (default: same as --temp).")
@sampling_options
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--num-samples", type=int, default=1, show_default=True, help="Independent samples (seeds seed..seed+N-1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample.")
@_friendly
def generate_cmd(model, prompt, chat, ar_mode, k, draft_temp, temperature, top_p, top_k, min_p, seed, max_tokens,
                 num_samples, as_json):
    """Generate from one prompt with the AR baseline or the reference MTP decoder."""
    from .checkpoint import load
    from .defaults import default_model
    from .generation import generate_samples

    if ar_mode and k is not None:
        raise UserError("--ar and --k are exclusive")
    if max_tokens < 1 or num_samples < 1:
        raise UserError("--max-tokens and --num-samples must be >= 1")
    from .sampling import SamplingConfig

    cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    if k is not None:
        from .decode import MAX_K

        if not 1 <= k <= MAX_K:
            raise UserError(f"--k must be between 1 and {MAX_K}, got {k}")
    if draft_temp is not None and draft_temp < 0:
        raise UserError(f"--draft-temp must be >= 0, got {draft_temp}")
    bundle = load(model or default_model(), require_mtp=k is not None)
    for sample in generate_samples(bundle, prompt, cfg, k, max_tokens, num_samples, draft_temp, chat):
        if as_json:
            click.echo(json.dumps(sample))
        else:
            click.echo(sample["text"])


if __name__ == "__main__":
    entry()
