"""`mtpbench generate` (one prompt, AR or MTP, with counters) and `mtpbench acceptance` (teacher-forced scan)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .common import friendly, sampling_options


@click.command("generate")
@click.option("--model", "-m", help="Checkpoint directory or cached repo id (default: embedded demo).")
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--ar", "ar_mode", is_flag=True, help="Autoregressive baseline (the default when --k is not given).")
@click.option("--k", default=None, help="MTP draft depth; speculative decoding when given.")
@click.option("--draft-temp", default=None, help="Draft temperature (default: same as --temp).")
@click.option("--mtp-from", default=None, metavar="DIR", help="Draft with the MTP head of this directory or cached "
              "repo (a checkpoint or a qwen3_5_mtp head repo), checked compatible; nothing is copied.")
@sampling_options
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--num-samples", type=int, default=1, show_default=True, help="Independent samples (seeds seed..seed+N-1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample.")
@friendly
def generate_cmd(model, prompt, chat, ar_mode, k, draft_temp, mtp_from, temperature, top_p, top_k, min_p, seed,
                 max_tokens, num_samples, as_json):
    """Generate from one prompt with the AR baseline or the reference MTP decoder."""
    from ..defaults import default_model
    from ..orchestrate.generation import generate_samples
    from ..model.checkpoint import load
    from ..sweep.axes import draft_temps, k_values
    from ..sweep.spec import Setting

    if ar_mode and k is not None:
        raise UserError("--ar and --k are exclusive")
    if max_tokens < 1 or num_samples < 1:
        raise UserError("--max-tokens and --num-samples must be >= 1")
    depth = None
    if k is not None:
        (depth, *more) = k_values(k)
        if more:
            raise UserError(f"--k {k}: generate takes one depth")
    draft = draft_temps(draft_temp, "--draft-temp")[0] if draft_temp is not None else None
    setting = Setting(temperature, top_p, top_k, min_p, draft)
    bundle = load(model or default_model(), require_mtp=depth is not None, mtp_from=mtp_from)
    for sample in generate_samples(bundle, prompt, setting.config(seed), depth, max_tokens, num_samples,
                                   setting.draft_temperature, chat):
        click.echo(json.dumps(sample) if as_json else sample["text"])


@click.command("acceptance")
@click.option("--model", "-m", help="Checkpoint dir or cached repo id (default: embedded demo).")
@click.option("--prompts", default=None, help="Prompt sets (names or .jsonl paths) whose text is scanned.")
@click.option("--text", "text_file", default=None, type=click.Path(), help="A text file to scan instead.")
@sampling_options
@friendly
def acceptance_cmd(model, prompts, text_file, temperature, top_p, top_k, min_p, seed):
    """Teacher-forced depth-1 acceptance scan: one trunk and one MTP pass per text, no decoding.

    Prints, per category, the greedy draft-match rate and the mean alpha = sum min(p, q) at the given sampling
    settings: the acceptance a decoder would see at depth 1 on such text, orders of magnitude faster.
    """
    from ..decode.scan import scan_texts
    from ..defaults import DEMO_PROMPT_SET, default_model, is_default_model
    from ..model.checkpoint import load
    from ..stats.summary import scan_table
    from ..sweep.axes import words
    from ..sweep.prompts import encode, load_sets
    from ..sweep.spec import Setting

    cfg = Setting(temperature, top_p, top_k, min_p).config(seed)
    model = model or default_model()
    bundle = load(model, require_mtp=True)
    if text_file:
        try:
            texts = [("text", list(bundle.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"))))]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--text {text_file}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    else:
        names = words(prompts or "", "--prompts") or ((DEMO_PROMPT_SET,) if is_default_model(model) else ("code", "chat"))
        texts = [(p.category, encode(bundle.tokenizer, p, None)) for p in load_sets(list(names))]
    rows = scan_texts(bundle, texts, cfg)
    if not rows:
        raise UserError("no text long enough to scan (3 tokens or more)")
    click.echo(f"depth-1 teacher-forced acceptance of {bundle.name} ({cfg.label()} for alpha)")
    click.echo(scan_table(rows).to_string())
