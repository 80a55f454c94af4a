"""`mtpbench generate` as a library call: encode a prompt, decode N samples, describe each as a dict."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..model.checkpoint import Bundle
from ..decode import DecodeResult, generate_ar, generate_mtp
from ..sweep.prompts import Prompt, encode
from ..sampling import SamplingConfig


def encode_prompt(bundle: Bundle, text: str, chat: bool = False, thinking: bool | None = None) -> list[int]:
    """One prompt text as ids: raw, or through the chat template (the same encoding the sweep uses)."""
    prompt = Prompt(set_name="cli", id="prompt", category="cli", text=text, messages=None, max_tokens=None,
                    completion=not chat)
    return encode(bundle.tokenizer, prompt, thinking)


def result_dict(bundle: Bundle, r: DecodeResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokens": r.tokens,
        "text": bundle.tokenizer.decode(r.tokens),
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": r.generated_tokens,
        "prefill_s": r.prefill_s,
        "decode_s": r.decode_s,
        "decode_tok_s": r.decode_tok_s,
        "finished_by": r.finished_by,
    }
    if r.k:
        out.update(k=r.k, verify_steps=r.verify_steps, drafted_tokens=r.drafted_tokens,
                   accepted_tokens=r.accepted_tokens, accepted_per_step=r.accepted_per_step,
                   accepted_at_depth=r.accepted_at_depth, drafted_at_depth=r.drafted_at_depth,
                   reached_at_depth=r.reached_at_depth,
                   mean_acceptance_length=r.mean_acceptance_length)
    return out


def generate_samples(bundle: Bundle, prompt: str, cfg: SamplingConfig, k: int | None, max_tokens: int,
                     num_samples: int = 1, draft_temperature: float | None = None,
                     chat: bool = False) -> Iterator[dict[str, Any]]:
    """Decode `num_samples` samples; AR and MTP run with the same records setting (records on when sampling: the
    MTP rescoring reads them), and both decoders build records after their decode clock, so they are timed alike."""
    ids = encode_prompt(bundle, prompt, chat)
    for i in range(num_samples):
        c = replace(cfg, seed=cfg.seed + i)
        if k is None:
            r = generate_ar(bundle, ids, c, max_tokens, records=not c.greedy)
            yield {"seed": c.seed, **result_dict(bundle, r)}
            continue
        r = generate_mtp(bundle, ids, c, k, max_tokens, draft_temperature=draft_temperature, records=not c.greedy)
        fresh = {} if c.greedy else {"rescoring": rescoring(bundle, ids, r, c)}
        yield {"seed": c.seed, **result_dict(bundle, r), **fresh}


def rescoring(bundle: Bundle, ids: list[int], r: DecodeResult, cfg: SamplingConfig) -> dict[str, Any]:
    """A sampled MTP run against a fresh teacher-forced target (decode/rescore.py), in brief."""
    import math

    from ..decode.rescore import rescore

    fresh = rescore(bundle, ids, r, cfg)
    tv = [f.drift_tv for f in fresh.records if not math.isnan(f.drift_tv)]
    finite = [f.drift_logprob for f in fresh.records if math.isfinite(f.drift_logprob)]
    return {"seconds": fresh.seconds,  # not in prefill_s / decode_s
            "outside_fresh_support": sum(not f.in_fresh_support for f in fresh.records),
            "possible_under_one_row_only": sum(math.isinf(f.drift_logprob) for f in fresh.records),
            "max_finite_drift_logprob": max(finite, default=0.0),
            "mean_drift_tv": sum(tv) / len(tv) if tv else None}
