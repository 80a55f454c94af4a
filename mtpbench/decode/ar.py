"""The autoregressive baseline: one trunk forward per token, timed like the speculative decoder.

Greedy decoding pipelines like mlx_lm's `generate_step`: the next forward and its argmax are queued
(`mx.async_eval`) before the host reads the current token, so the device never waits on the host. Sampled
decoding draws on the host with the one sampling transform (`sampling.support`, a sparse row: see
`common.host_supports`), so each token waits for its row.
"""

from __future__ import annotations

import mlx.core as mx

from ..model.checkpoint import Bundle
from ..model.kvcache import FULL_KV, KVCacheSpec
from ..sampling import SamplingConfig
from .common import choose, host_supports, now, peak, point_mass_record, reset_peak, rngs, token_record
from .counts import check_counts
from .records import DecodeResult


def generate_ar(bundle: Bundle, prompt: list[int], cfg: SamplingConfig, max_tokens: int, records: bool = True,
                ignore_eos: bool = False, kv: KVCacheSpec = FULL_KV) -> DecodeResult:
    """Decode up to `max_tokens` tokens (stopping at EOS unless `ignore_eos`); prefill and decode are timed apart,
    and the records (when asked) are built after the decode clock stops, as the speculative decoder's are."""
    trunk, eos = bundle.trunk, frozenset() if ignore_eos else bundle.eos_ids
    rng, pit_rng = rngs(cfg.seed)
    cache = trunk.make_cache(kv)
    reset_peak()
    t0 = now()
    logits = trunk.prefill(prompt, cache).logits[0, -1:]
    p = host_supports(logits, cfg)[0]
    token = choose(p, cfg, rng)
    t1 = now()
    tokens = [token]
    rows = [p]  # sampled: each token's row, kept for its record after the timed loop
    if cfg.greedy:
        _greedy_loop(bundle, cache, tokens, max_tokens, eos)
    else:
        while len(tokens) < max_tokens and token not in eos:
            p = host_supports(trunk(mx.array([[token]]), cache).logits[0, -1:], cfg)[0]
            token = choose(p, cfg, rng)
            tokens.append(token)
            if records:
                rows.append(p)
    t2 = now()
    recs = _records(tokens, rows, cfg, pit_rng) if records else []
    result = DecodeResult(
        tokens=tokens, prompt_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1, token_records=recs,
        finished_by="eos" if tokens[-1] in bundle.eos_ids else "length", peak_memory_bytes=peak(),
    )
    check_counts(result)
    return result


def _records(tokens: list[int], rows: list, cfg: SamplingConfig, pit_rng) -> list:
    """Token records (log p, PIT, moments), built after the timed loop: greedy tokens are point masses."""
    recs = [token_record(0, tokens[0], "ar", rows[0], pit_rng)]
    if cfg.greedy:
        return recs + [point_mass_record(i, t, "ar", pit_rng) for i, t in enumerate(tokens[1:], 1)]
    return recs + [token_record(i, t, "ar", p, pit_rng) for i, (t, p) in enumerate(zip(tokens[1:], rows[1:]), 1)]


def _greedy_loop(bundle: Bundle, cache: list, tokens: list[int], max_tokens: int, eos: frozenset[int]) -> None:
    """Append greedy tokens to `tokens`, keeping one forward in flight ahead of the host."""
    trunk = bundle.trunk

    def forward(y: mx.array) -> mx.array:
        return mx.argmax(trunk(y[None], cache).logits[0, -1], keepdims=True)

    if len(tokens) >= max_tokens or tokens[-1] in eos:
        return
    pending = forward(mx.array(tokens[-1:]))
    mx.async_eval(pending)
    while True:
        current = pending
        if len(tokens) + 1 < max_tokens:  # queue the next forward before reading this token
            pending = forward(current)
            mx.async_eval(pending)
        token = current.item()
        tokens.append(token)
        if token in eos or len(tokens) >= max_tokens:
            return
