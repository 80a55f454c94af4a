"""The reference MTP speculative decoder: draft K with the MTP head, verify with one trunk forward, accept by
the one rule, roll the caches back. Small enough to read in one sitting; see shared/MTP.md for the positions.

Cache invariants at the top of every step:
- the trunk cache holds every committed token except `last`, the newest one, which has not been forwarded;
- the MTP cache holds one entry per committed trunk position before the pending ones; `pending_h` / `pending_tok`
  are the true (trunk hidden at i, token at i+1) pairs still to be fed to it. Feeding them and drafting the first
  token is one MTP call; deeper drafts chain the head on its own output.

The head's feeding conventions (`model.conventions`: the chained hidden, and the history its cache holds) change
what it drafts, never what the decode emits. Under `committed` history the MTP cache persists across steps as
above; under `cycle` and `window:N` each step drafts from a fresh cache fed the newest true pair, or the last N.

Near the end of the budget a step drafts only as deep as tokens are left (min(K, left)), so the drafted and
accepted counts describe work that could be emitted.

Rollback after j < K accepted drafts: `capture` (default) keeps every verify position's GatedDeltaNet state and
commits position j (see `model.capture`); `reforward` restores a snapshot and forwards the j+1 accepted tokens
again. Both are exact against a fresh prefill (tested); the second costs about one decode step per rejection.

Greedy (target and draft at temperature 0, the exact rule) runs a fast path: drafts, verify and the target
argmaxes stay on the device and the step reads 2K+1 integers in one host synchronisation, instead of K+1 rows
of vocabulary size. Its acceptance is `apply_rule_greedy`, the exact rule on point masses.

Decode-sized forwards of trunk and head run compiled layers (`model.compiled`), which is most of what makes a
step cheap on a small model; the AR baseline runs the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache

from ..model.checkpoint import Bundle
from ..model.conventions import COMMITTED, CYCLE, DEFAULT_HISTORY, NORMED, History, chain as parse_chain
from ..errors import UserError
from ..model.kvcache import FULL_KV, KVCacheSpec
from ..model.trunk import PREFILL_STEP
from ..sampling import SamplingConfig, Support, alpha
from .cache import require_exact_rollback, restore, snapshot
from .counts import check_counts, step_counts
from .common import (choose, host_supports, now, peak, pit, point_mass_record, reset_peak, rngs, sparse_row,
                     token_record)
from .records import DecodeResult, StepRecord, TokenRecord
from .limits import MAX_K, ROLLBACKS
from .rule import EXACT, Rule, Verdict, apply_rule, apply_rule_greedy, conditional_law


def _raw_target(cfg: SamplingConfig) -> SamplingConfig:
    """The untransformed target (plain softmax at T=1), used only by the `target_transform='raw'` control."""
    return SamplingConfig(temperature=0.0 if cfg.greedy else 1.0, seed=cfg.seed)


@dataclass
class _State:
    """What a decode carries from step to step (mutable on purpose: it is the loop's state)."""

    tokens: list[int]
    last: int
    pending_h: mx.array
    pending_tok: list[int]
    accepted_at: list[int]
    drafted_at: list[int]
    reached_at: list[int]
    window_h: mx.array | None = None  # `window:N` history: the last true pairs fed to the head (hidden, token)
    window_tok: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    bonus_tokens: int = 0  # steps whose residual/bonus token was emitted
    # Records are built after the timed loop (`_records`): the loop keeps what they need, in order (the PIT stream
    # is drawn in the same order), so PIT, moments and alpha are records work the decode does not pay for.
    deferred: list[Callable[[], TokenRecord]] = field(default_factory=list)
    deferred_steps: list[Callable[[], StepRecord]] = field(default_factory=list)
    step_recs: list[StepRecord] = field(default_factory=list)
    token_recs: list[TokenRecord] = field(default_factory=list)
    target_rows: list = field(default_factory=list)
    # (token record index, p, q, draft, source) of sampled tokens whose conditional PIT is computed after the
    # timed loop (`_conditional_pits`): records work the decode need not pay for
    laws: list = field(default_factory=list)


@dataclass(frozen=True)
class _Run:
    """What stays fixed for one decode."""

    bundle: Bundle
    cache: list
    mtp_cache: list
    k: int
    cfg: SamplingConfig
    dcfg: SamplingConfig
    rule: Rule
    rng: np.random.Generator
    pit_rng: np.random.Generator | None  # None: no records
    max_tokens: int
    eos: frozenset[int]
    rollback: str
    chain: str = NORMED
    history: History = DEFAULT_HISTORY


def verify_forward(trunk, cache: list, x: mx.array, rollback: str, causal: bool = True):
    """One trunk forward over [last, d1..dK]; returns the output and a function that rolls back to j accepted.
    (`causal=False`: the no-causal-mask control only.)"""
    if rollback == "capture":
        out, captured = trunk.forward_capturing(x, cache, causal=causal)
        return out, lambda j: captured.commit(cache, j)
    snap = snapshot(cache)
    out = trunk(x, cache, causal=causal)

    def reforward(j: int) -> None:
        restore(cache, snap)
        trunk(x[:, : j + 1], cache, causal=causal)
    return out, reforward


def _emit(r: _Run, st: _State, verdict: Verdict, drafts: list[int],
          record: Callable[[int, int, int, str], TokenRecord] | None) -> tuple[int, int]:
    """Append the accepted drafts and the residual/bonus token, stopping at EOS or max_tokens inside the run; count
    what was emitted (`counts.step_counts`). Returns (accepted drafts emitted, drafts reached)."""
    j = verdict.accepted
    new = drafts[:j] + [verdict.token]
    emitted = 0
    for i, (tok, src) in enumerate(zip(new, ["accepted"] * j + [verdict.source])):
        if len(st.tokens) >= r.max_tokens:
            break
        if record:
            index = len(st.tokens)
            st.deferred.append(lambda i=i, index=index, tok=tok, src=src: record(i, index, tok, src))
        st.tokens.append(tok)
        st.last = tok
        emitted += 1
        if tok in r.eos:
            break
    used, reached = step_counts(emitted, j, len(drafts))
    st.accepted_per_step.append(used)
    st.bonus_tokens += emitted - used
    for i in range(used):
        st.accepted_at[i] += 1
    for i in range(reached):
        st.reached_at[i] += 1
    st.pending_tok = new
    return used, reached


def prefill(bundle: Bundle, prompt: list[int], cache: list, mtp_cache: list, history: History = DEFAULT_HISTORY,
            step: int = PREFILL_STEP):
    """The prompt's forward: the trunk over the prompt in chunks (`Trunk.prefill`: last-position logits), and the
    head's history of true pairs by the convention, fed chunk by chunk and evaluated here, so its cost is prefill
    (TTFT), never the first decode step's.

    Returns (trunk output at the last position, window hiddens, window tokens); the window is kept only under
    `window:N` (the prompt's last N pairs). `bench` primes its caches with this same function.
    """
    trunk, head = bundle.trunk, bundle.draft_head
    pairs = len(prompt) - 1  # (h[i], x[i+1]) for i = 0..P-2
    keep = history.window if history.kind not in (COMMITTED, CYCLE) else 0
    window: list[mx.array] = []

    def feed(hidden: mx.array, start: int) -> None:
        n = min(hidden.shape[1], pairs - start)
        if n <= 0:
            return
        if history.kind == COMMITTED:  # MTP entries for positions 0..P-2
            head(hidden[:, :n], head.embed(mx.array([prompt[start + 1: start + 1 + n]])), mtp_cache)
            mx.eval([c.state for c in mtp_cache])
        elif keep:  # window:N keeps the prompt's last N true pairs
            kept = hidden[:, :n] if not window else mx.concatenate([window[0], hidden[:, :n]], axis=1)
            window[:] = [kept[:, -keep:]]
            mx.eval(window[0])

    out = trunk.prefill(prompt, cache, step, feed)
    return out, (window[0] if window else None), (prompt[1:][-keep:] if keep and pairs > 0 else [])


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
    kv: KVCacheSpec = FULL_KV,
    rollback: str = "capture",
    greedy_fast_path: bool = True,
    chain: str = NORMED,
    history: History | str = DEFAULT_HISTORY,
) -> DecodeResult:
    """Speculatively decode up to `max_tokens` tokens at draft depth `k`.

    `rollback` and `greedy_fast_path` change how, never what: tests hold every combination to the same tokens and
    records, and `mtpbench bench` reports what each costs. `chain` and `history` are the head's feeding
    conventions (`model.conventions`): they change acceptance, never the tokens of a greedy decode. The trunk
    hidden fed to the head is the bundle's (`Bundle.with_hidden_variant`).
    """
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
    if draft_temperature is not None and draft_temperature < 0:
        raise UserError(f"draft temperature must be >= 0, got {draft_temperature}")
    if rollback not in ROLLBACKS:
        raise UserError(f"rollback must be one of {', '.join(ROLLBACKS)}, got {rollback!r}")
    chain = parse_chain(chain, "chain")
    history = history if isinstance(history, History) else History.parse(history, "history")
    head = bundle.draft_head
    trunk, eos = bundle.trunk, frozenset() if ignore_eos else bundle.eos_ids
    dcfg = cfg if draft_temperature is None else replace(cfg, temperature=draft_temperature)
    rng, pit_rng = rngs(cfg.seed)
    cache, mtp_cache = trunk.make_cache(kv), head.make_cache()
    require_exact_rollback(cache)
    reset_peak()

    t0 = now()
    out, window_h, window_tok = prefill(bundle, prompt, cache, mtp_cache, history)  # the head's pass included
    mx.eval(out.hidden)
    p = host_supports(out.logits[0, -1:], cfg)[0]
    last = choose(p, cfg, rng)
    t1 = now()

    st = _State(tokens=[last], last=last, pending_h=out.hidden[:, -1:], pending_tok=[last], accepted_at=[0] * k,
                drafted_at=[0] * k, reached_at=[0] * k, window_h=window_h, window_tok=window_tok)
    run = _Run(bundle, cache, mtp_cache, k, cfg, dcfg, rule, rng, pit_rng if records else None, max_tokens, eos,
               rollback, chain, history)
    step = _greedy_step if greedy_fast_path and cfg.greedy and dcfg.greedy and rule == EXACT else _sampled_step
    while len(st.tokens) < max_tokens and st.last not in eos:
        step(run, st)
    t2 = now()
    if records:
        _records(st, p, pit_rng, cfg)
        _conditional_pits(st, rule, cfg.seed)
    result = DecodeResult(
        tokens=st.tokens, prompt_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1, k=k,
        verify_steps=len(st.accepted_per_step), drafted_at_depth=st.drafted_at, accepted_at_depth=st.accepted_at,
        reached_at_depth=st.reached_at, bonus_tokens=st.bonus_tokens, accepted_per_step=st.accepted_per_step,
        steps=st.step_recs, token_records=st.token_recs, target_rows=st.target_rows,
        finished_by="eos" if st.tokens[-1] in bundle.eos_ids else "length", peak_memory_bytes=peak(),
    )
    check_counts(result)
    return result


def _records(st: _State, first: Support, pit_rng: np.random.Generator, cfg: SamplingConfig) -> None:
    """The token and step records, built after the timed loop from what it kept, in emission order (so the PIT
    stream draws as it would have inside the loop)."""
    st.token_recs.append(token_record(0, st.tokens[0], "ar", first, pit_rng, first))
    st.target_rows.append(sparse_row(first) if not cfg.greedy else None)
    for make in st.deferred:
        st.token_recs.append(make())
    st.step_recs += [make() for make in st.deferred_steps]
    st.deferred.clear()
    st.deferred_steps.clear()


def _depth(r: _Run, st: _State) -> int:
    """The step's draft depth: K, or the tokens left when fewer (a deeper draft could never be emitted)."""
    return min(r.k, r.max_tokens - len(st.tokens))


def _head_feed(r: _Run, st: _State) -> tuple[mx.array, list[int], list]:
    """The true (hidden, next token) pairs to feed the head this step and the cache to feed them into, by the
    history convention; `window:N` keeps its last N pairs in the state."""
    if r.history.kind == COMMITTED:
        return st.pending_h, st.pending_tok, r.mtp_cache
    fresh = r.bundle.draft_head.make_cache()
    if r.history.kind == CYCLE:  # the newest true pair only: what window:1 holds too
        return st.pending_h[:, -1:], st.pending_tok[-1:], fresh
    n = r.history.window
    h = st.pending_h if st.window_h is None else mx.concatenate([st.window_h, st.pending_h], axis=1)
    st.window_h, st.window_tok = h[:, -n:], (st.window_tok + st.pending_tok)[-n:]
    return st.window_h, st.window_tok, fresh


def _sampled_step(r: _Run, st: _State) -> None:
    """One step with host-side sparse rows (`Support`): any temperature, draft temperature and rule (controls
    included)."""
    trunk, head, k, rng, rule = r.bundle.trunk, r.bundle.draft_head, _depth(r, st), r.rng, r.rule
    # 1. Draft: catch the MTP cache up on the true pairs and draft d1 in one call, then chain.
    fed_h, fed_tok, mtp_cache = _head_feed(r, st)
    z, normed = head.chained(fed_h, head.embed(mx.array([fed_tok])), mtp_cache, r.chain)
    z, normed = z[:, -1:], normed[:, -1:]
    committed = mtp_cache[0].offset
    drafts: list[int] = []
    q: list[Support] = []  # sparse rows: at top-k a few ids each, whatever the vocabulary
    draft_logits = []
    for i in range(k):
        if i:
            z, normed = head.chained(z, head.embed(mx.array([[drafts[-1]]])), mtp_cache, r.chain)
        draft_logits.append(head.lm_head(normed)[0])
        q.append(host_supports(draft_logits[-1], r.dcfg)[0])
        drawn_from = q[i] if rule.draft_temperature_scale == 1 else host_supports(  # control: draws at another T
            draft_logits[-1], replace(r.dcfg, temperature=r.dcfg.temperature * rule.draft_temperature_scale))[0]
        drafts.append(choose(drawn_from, r.dcfg, rng))

    # 2. Verify all K drafts with one trunk forward over K+1 positions, and accept by the rule.
    verify, roll_back = verify_forward(trunk, r.cache, mx.array([[st.last] + drafts]), r.rollback, rule.causal_mask)
    p = host_supports(verify.logits[0], r.cfg)  # the K+1 rows come to the host once, as float32
    rule_p = p if rule.target_transform == "same" else host_supports(verify.logits[0], _raw_target(r.cfg))
    verdict = apply_rule(rule_p, q, drafts, rng, rule, *_filter_control_rows(r, verify.logits[0], draft_logits, p, q))

    # 3.-4. Roll back, record, emit.
    def token_rec(i: int, index: int, tok: int, src: str) -> TokenRecord:
        st.target_rows.append(sparse_row(p[i]))
        if r.cfg.greedy and r.dcfg.greedy:  # point masses: every conditional law is p itself (as the fast path's)
            return token_record(index, tok, src, p[i], r.pit_rng, p[i])
        st.laws.append((len(st.token_recs), p[i], q[i] if i < k else None, drafts[i] if i < k else -1, src))
        return token_record(index, tok, src, p[i], r.pit_rng)

    _finish(r, st, verdict, drafts, _control_rollback(rule, r.cache, roll_back), mtp_cache, committed, verify.hidden,
            lambda step, i, j: StepRecord(step, i + 1, drafts[i], i < j, p[i].prob(drafts[i]), q[i].prob(drafts[i]),
                                          alpha(p[i], q[i])),
            token_rec)


def _conditional_pits(st: _State, rule: Rule, seed: int) -> None:
    """Each sampled token's PIT under its law given its source (`rule.conditional_law`), after the timed loop, with
    its own uniform stream (a randomized PIT needs a uniform independent of the token, not the PIT's own)."""
    if not st.laws:
        return
    rng = np.random.default_rng([seed, 0xC0D])
    for j, p, q, draft, source in st.laws:
        rec = st.token_recs[j]
        st.token_recs[j] = replace(rec, cond_pit_u=pit(conditional_law(rule, p, q, draft, source), rec.token_id,
                                                       rng.random()))


def _filter_control_rows(r: _Run, logits: mx.array, draft_logits: list[mx.array], p: list[Support],
                         q: list[Support]):
    """(accept_rows, residual_rows) for `apply_rule`: both None under every rule but the two filter controls, which
    build one part of the rule from rows without top-p/top-k/min-p (temperature kept), and `ratio-at-t1`, whose
    acceptance test takes p and q at temperature 1 (filters kept)."""
    if r.rule.ratio_temperature == "one":
        at_one = (host_supports(logits, replace(r.cfg, temperature=1.0)),
                  host_supports(mx.concatenate(draft_logits), replace(r.dcfg, temperature=1.0)))
        return at_one, (p, q)
    if r.rule.filters == "both":
        return None, None
    unfiltered = replace(r.cfg, top_p=1.0, top_k=0, min_p=0.0)
    raw = (host_supports(logits, unfiltered),
           host_supports(mx.concatenate(draft_logits), replace(unfiltered, temperature=r.dcfg.temperature)))
    return (None, raw) if r.rule.filters == "accept_only" else (raw, (p, q))


def _control_rollback(rule: Rule, cache: list, roll_back: Callable[[int], None]) -> Callable[[int], None]:
    """The rollback a state-bug control runs instead of the exact one (the exact one otherwise)."""
    if rule.rollback == "commit_next":  # keeps the first rejected draft's state
        return lambda j: roll_back(j + 1)
    if rule.rollback == "keep_gdn":  # trims the KV caches, leaves GatedDeltaNet states after all K+1 tokens
        def keep_gdn(j: int) -> None:
            after_verify = [list(c.cache) if isinstance(c, ArraysCache) else None for c in cache]
            roll_back(j)
            for c, arrays in zip(cache, after_verify):
                if arrays is not None:
                    c.cache = arrays
        return keep_gdn
    return roll_back


def _greedy_drafts(r: _Run, st: _State, k: int) -> tuple[mx.array, list, int]:
    """Feed the head the true (hidden, next token) pairs and chain k greedy drafts, all on the device; returns the
    draft ids, the MTP cache they were drafted in, and its offset after the true pairs (what a rollback trims
    back to)."""
    fed_h, fed_tok, mtp_cache = _head_feed(r, st)
    committed = mtp_cache[0].offset + len(fed_tok)
    ids = r.bundle.draft_head.greedy_chain(fed_h, mx.array([fed_tok]), mtp_cache, k, r.chain)
    return ids, mtp_cache, committed


def _greedy_step(r: _Run, st: _State) -> None:
    """The same step for greedy target and draft, with one host synchronisation and no vocabulary-sized rows.

    No drafting ahead of the verify: on the CPU the device is the same cores, so drafts queued for a step that
    turns out rejected cost their full time (measured on the demo: a loss even at K=1, 75% of steps all-accepted).
    """
    draft_ids, mtp_cache, committed = _greedy_drafts(r, st, _depth(r, st))
    mx.async_eval(draft_ids)  # the device drafts while the host builds the verify graph
    verify, roll_back = verify_forward(r.bundle.trunk, r.cache, mx.concatenate([mx.array([st.last]), draft_ids])[None],
                                r.rollback)
    target_ids = mx.argmax(verify.logits[0], axis=-1)
    drafts, targets = draft_ids.tolist(), target_ids.tolist()  # the step's one host synchronisation
    verdict = apply_rule_greedy(drafts, targets)
    _finish(r, st, verdict, drafts, roll_back, mtp_cache, committed, verify.hidden,
            lambda step, i, j: StepRecord(step, i + 1, drafts[i], i < j, float(drafts[i] == targets[i]), 1.0,
                                          float(drafts[i] == targets[i])),
            lambda i, index, tok, src: point_mass_record(index, tok, src, r.pit_rng))


def _finish(r: _Run, st: _State, verdict: Verdict, drafts: list[int], roll_back: Callable[[int], None],
            mtp_cache: list, committed: int, hidden: mx.array, step_record: Callable[[int, int, int], StepRecord],
            token_rec: Callable[[int, int, int, str], TokenRecord]) -> None:
    """The tail both steps share: roll the trunk back to the accepted prefix and the MTP cache to its committed
    entries, count and record (when asked), emit, and keep the true hiddens still to be fed to the head. The
    step's depth is len(drafts)."""
    j, depth = verdict.accepted, len(drafts)
    if j < depth:
        roll_back(j)
    for c in mtp_cache:
        c.trim(c.offset - committed)
    for i in range(depth):
        st.drafted_at[i] += 1
    records = r.pit_rng is not None
    step = len(st.accepted_per_step)
    _, reached = _emit(r, st, verdict, drafts, token_rec if records else None)
    if records:
        st.deferred_steps += [lambda i=i: step_record(step, i, j) for i in range(reached)]
    st.pending_h = hidden[:, : j + 1]
