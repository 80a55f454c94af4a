"""The reference MTP speculative decoder: draft K with the MTP head, verify with one trunk forward, accept by
the one rule, roll the caches back. Small enough to read in one sitting; see shared/MTP.md for the positions.

Cache invariants at the top of every step:
- the trunk cache holds every committed token except `last`, the newest one, which has not been forwarded;
- the MTP cache holds one entry per committed trunk position before the pending ones; `pending_h` / `pending_tok`
  are the true (trunk hidden at i, token at i+1) pairs still to be fed to it. Feeding them and drafting the first
  token is one MTP call; deeper drafts chain the head on its own output.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..checkpoint import Bundle
from ..errors import UserError
from ..sampling import SamplingConfig
from .cache import restore, snapshot
from .common import choose, host_probs, now, peak, reset_peak, rngs, token_record
from .records import DecodeResult, StepRecord, TokenRecord
from .rule import EXACT, Rule, apply_rule

MAX_K = 16


def _raw_target(cfg: SamplingConfig) -> SamplingConfig:
    """The untransformed target (plain softmax at T=1), used only by the `target_transform='raw'` control."""
    return SamplingConfig(temperature=0.0 if cfg.greedy else 1.0, seed=cfg.seed)


def generate_mtp(
    bundle: Bundle,
    prompt: list[int],
    cfg: SamplingConfig,
    k: int,
    max_tokens: int,
    draft_temperature: float | None = None,
    rule: Rule = EXACT,
    records: bool = True,
    ignore_eos: bool = False,
) -> DecodeResult:
    """Speculatively decode up to `max_tokens` tokens at draft depth `k`."""
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
    if draft_temperature is not None and draft_temperature < 0:
        raise UserError(f"draft temperature must be >= 0, got {draft_temperature}")
    head = bundle.require_mtp()
    trunk, eos = bundle.trunk, frozenset() if ignore_eos else bundle.eos_ids
    dcfg = cfg if draft_temperature is None else replace(cfg, temperature=draft_temperature)
    rule_cfg = cfg if rule.target_transform == "same" else _raw_target(cfg)
    rng, pit_rng = rngs(cfg.seed)
    cache, mtp_cache = trunk.make_cache(), head.make_cache()
    reset_peak()

    t0 = now()
    x = mx.array(prompt)[None]
    out = trunk(x, cache)
    if len(prompt) > 1:  # MTP entries for positions 0..P-2: (h[i], x[i+1])
        head(out.hidden[:, :-1], trunk.embed(x[:, 1:]), mtp_cache)
    p = host_probs(out.logits[0, -1:], cfg)[0]
    last = choose(p, cfg, rng)
    t1 = now()

    tokens = [last]
    token_recs: list[TokenRecord] = [token_record(0, last, "ar", p, pit_rng)] if records else []
    step_recs: list[StepRecord] = []
    accepted_at = [0] * k
    accepted_per_step: list[int] = []
    pending_h, pending_tok = out.hidden[:, -1:], [last]

    while len(tokens) < max_tokens and last not in eos:
        # 1. Draft: catch the MTP cache up on the true pairs and draft d1 in one call, then chain.
        z = head(pending_h, trunk.embed(mx.array([pending_tok])), mtp_cache)[:, -1:]
        committed = mtp_cache[0].offset
        drafts: list[int] = []
        q = np.empty((k, trunk.lm.args.vocab_size))
        for i in range(k):
            if i:
                z = head(z, trunk.embed(mx.array([[drafts[-1]]])), mtp_cache)
            q[i] = host_probs(trunk.lm_head(z)[0], dcfg)[0]
            drafts.append(choose(q[i], dcfg, rng))

        # 2. Verify all K drafts with one trunk forward over K+1 positions.
        snap = snapshot(cache)
        verify = trunk(mx.array([[last] + drafts]), cache)
        p = host_probs(verify.logits[0], cfg)
        verdict = apply_rule(p if rule_cfg is cfg else host_probs(verify.logits[0], rule_cfg), q, drafts, rng, rule)
        j = verdict.accepted

        # 3. Roll back: the trunk to `last` + accepted drafts, the MTP cache to its committed entries.
        if j < k:
            restore(cache, snap)
            trunk(mx.array([[last] + drafts[:j]]), cache)
        for c in mtp_cache:
            c.trim(c.offset - committed)

        # 4. Emit, stopping at EOS or max_tokens even inside an accepted run.
        step = len(accepted_per_step)
        accepted_per_step.append(j)
        for i in range(j):
            accepted_at[i] += 1
        new = drafts[:j] + [verdict.token]
        sources = ["accepted"] * j + [verdict.source]
        if records:
            for i in range(min(j + 1, k)):
                d = drafts[i]
                step_recs.append(StepRecord(step, i + 1, d, i < j, float(p[i, d]), float(q[i, d]),
                                            float(np.minimum(p[i], q[i]).sum())))
        for i, (tok, src) in enumerate(zip(new, sources)):
            if len(tokens) >= max_tokens:
                break
            if records:
                token_recs.append(token_record(len(tokens), tok, src, p[i], pit_rng))
            tokens.append(tok)
            last = tok
            if tok in eos:
                break
        pending_h, pending_tok = verify.hidden[:, : j + 1], new
    t2 = now()
    steps = len(accepted_per_step)
    return DecodeResult(
        tokens=tokens, prompt_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1, k=k, verify_steps=steps,
        drafted_at_depth=[steps] * k, accepted_at_depth=accepted_at, accepted_per_step=accepted_per_step,
        steps=step_recs, token_records=token_recs, finished_by="eos" if tokens[-1] in bundle.eos_ids else "length",
        peak_memory_bytes=peak(),
    )
