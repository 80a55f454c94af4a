"""The autoregressive baseline: one trunk forward per token, timed like the speculative decoder."""

from __future__ import annotations

import mlx.core as mx

from ..checkpoint import Bundle
from ..sampling import SamplingConfig
from .common import choose, host_probs, now, peak, reset_peak, rngs, token_record
from .records import DecodeResult


def generate_ar(bundle: Bundle, prompt: list[int], cfg: SamplingConfig, max_tokens: int, records: bool = True,
                ignore_eos: bool = False) -> DecodeResult:
    """Decode up to `max_tokens` tokens (stopping at EOS unless `ignore_eos`); prefill and decode are timed apart."""
    trunk, eos = bundle.trunk, frozenset() if ignore_eos else bundle.eos_ids
    rng, pit_rng = rngs(cfg.seed)
    cache = trunk.make_cache()
    reset_peak()
    t0 = now()
    logits = trunk(mx.array(prompt)[None], cache).logits[0, -1:]
    p = host_probs(logits, cfg)[0]
    token = choose(p, cfg, rng)
    t1 = now()
    tokens = [token]
    recs = [token_record(0, token, "ar", p, pit_rng)] if records else []
    while len(tokens) < max_tokens and token not in eos:
        p = host_probs(trunk(mx.array([[token]]), cache).logits[0, -1:], cfg)[0]
        token = choose(p, cfg, rng)
        if records:
            recs.append(token_record(len(tokens), token, "ar", p, pit_rng))
        tokens.append(token)
    t2 = now()
    return DecodeResult(
        tokens=tokens, prompt_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1, token_records=recs,
        finished_by="eos" if tokens[-1] in bundle.eos_ids else "length", peak_memory_bytes=peak(),
    )
