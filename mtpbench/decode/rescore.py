"""Rescoring against a fresh target: the independent truth the preservation tests need (shared/STATS.md, 5).

A test computed from the decoder's own target rows cannot see a bug that corrupts those rows (a rollback that keeps
a rejected draft's state, a GatedDeltaNet state left behind): the rows and the samples are wrong together and look
perfectly calibrated. After a sampled run, one teacher-forced forward of the trunk over prompt + output, with a
fresh cache and mlx_lm's own model call (not the decoder's compiled layers, captured states or caches), gives the
target row at every emitted position; the run's sampling transform (`sampling.support`, the one transform, sparse) turns
it into the row the token should have followed. Per token it records the fresh log p, a fresh PIT value (its own
uniform stream), whether the token is in the fresh filtered support, the score test's moments under the fresh
row, and the drift between the decoder's row and the fresh one (|delta log p| of the token, total variation of the
two rows where the decoder's row was kept).

The fresh row itself is checked against an independent oracle (mtpbench/oracle.py: mlx_lm's sampler written out in
numpy, sharing no code with sampling.py) on every row at small vocabularies, a sample of rows at large ones: a
disagreement is an instrument fault, reported apart from the decoder's verdict. Support is judged tie-inclusive: a
token tied at the k-th logit but outside the profile's exactly-k choice (a server whose partition breaks the tie
another way) is scored under the tie-inclusive row, so no correct server is rejected for a tie.

Near-zero drift with a rejected test points at the rule; large drift points at the state. Rescoring runs after the
decode and is excluded from its timing; its own cost is returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

from ..model.checkpoint import Bundle
from ..model.kvcache import FULL_KV, KVCacheSpec
from ..sampling import SamplingConfig, Support, support
from ..oracle import checked_rows, oracle_row, total_variation
from ..sampling import relative_top2_gap
from .common import pit, support_moments
from .records import DecodeResult

CHUNK = 512  # positions per forward chunk (bounds the (L, V) logits held at once on large vocabularies)


@dataclass(frozen=True)
class FreshRecord:
    """One emitted token scored against the fresh target (columns of the tokens table)."""

    fresh_logprob: float  # log p(token) under the fresh row after the sampling transform (-inf: outside support)
    fresh_pit_u: float  # randomized PIT under the fresh row: Uniform(0, 1) when the decode is exact
    in_fresh_support: bool  # the token has non-zero probability under the fresh filtered target
    fresh_logprob_mean: float  # E_f[log f(X)] of the fresh row (score test)
    fresh_logprob_var: float  # Var_f[log f(X)]
    fresh_logprob_m3: float  # E_f[(log f(X) - mean)^3]
    drift_logprob: float  # |log p_decoder(token) - log p_fresh(token)| (inf when exactly one of them is -inf);
    # for a server, |reported log p - fresh untransformed log p| (NaN where it reports none)
    drift_tv: float  # total variation between the decoder's row and the fresh one (NaN: decoder row not kept)
    oracle_tv: float = float("nan")  # TV between the fresh row and the independent oracle's (mtpbench/oracle.py);
    # NaN where the row was not checked (a sample of rows at large vocabularies; profiles without an oracle)


@dataclass(frozen=True)
class Rescoring:
    records: list[FreshRecord]
    seconds: float
    tokens: list[int] = field(default_factory=list)  # the tokens scored (a HIDDEN one as its imputed id)


@dataclass(frozen=True)
class Prefix:
    """mlx_lm's trunk cache after a fresh forward over a prompt's first P-1 tokens, kept once per prompt so every
    run rescored after that prompt (each K of a cell) forwards only its own output: the prompt is most of the
    forward (measured on the demo's stdlib set: 240 prompt tokens against 128 generated). Exact-size copies of the
    KV arrays and the GatedDeltaNet state lists, restored into a fresh cache with mlx_lm's own fields: a restored
    cache reallocates at its first write, so no rescoring writes into another's prefix, and none of the decoder's
    cache code (whose bugs the fresh target must see) is used."""

    ids: tuple[int, ...]  # the prompt's first P-1 tokens
    layers: tuple  # per layer: ("kv", keys, values) or ("arrays", state list)


def fresh_prefix(bundle: Bundle, prompt: list[int], kv: KVCacheSpec = FULL_KV) -> Prefix | None:
    """The `Prefix` of `prompt` (None where it cannot be kept: a one-token prompt or a quantized KV cache, whose
    runs are then rescored with a whole fresh forward each)."""
    cache = bundle.trunk.make_cache(kv)
    if len(prompt) < 2 or not all(type(c) in (KVCache, ArraysCache) for c in cache):
        return None
    _forward_rows(bundle, cache, prompt[:-1], len(prompt))  # no rows kept: only the state
    layers = tuple(("arrays", list(c.cache)) if isinstance(c, ArraysCache)
                   else ("kv", c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache)
    mx.eval([a for layer in layers for a in (layer[1] if layer[0] == "arrays" else layer[1:]) if a is not None])
    return Prefix(tuple(prompt[:-1]), layers)


def _restored(bundle: Bundle, prefix: Prefix, kv: KVCacheSpec) -> list:
    cache = bundle.trunk.make_cache(kv)
    for c, layer in zip(cache, prefix.layers):
        if layer[0] == "arrays":
            c.cache = list(layer[1])
        else:
            c.keys, c.values, c.offset = layer[1], layer[2], layer[1].shape[2]
    return cache


def _forward_rows(bundle: Bundle, cache: list, ids: list[int], start: int) -> list[np.ndarray]:
    """mlx_lm's model call over `ids` in chunks of CHUNK positions; float32 logits of rows >= start (relative to
    `ids`)."""
    out = []
    for lo in range(0, len(ids), CHUNK):
        chunk = ids[lo: lo + CHUNK]
        logits = bundle.trunk.model(mx.array(chunk)[None], cache=cache)[0]
        keep = max(start - lo, 0)
        if keep < len(chunk):
            out.append(np.asarray(logits[keep:].astype(mx.float32)))
        else:
            mx.eval(logits)
    return out


def fresh_logits(bundle: Bundle, ids: list[int], start: int, kv: KVCacheSpec = FULL_KV,
                 prefix: Prefix | None = None) -> np.ndarray:
    """Float32 logits of rows start..len(ids)-1 of one teacher-forced forward over `ids` with a fresh cache, through
    mlx_lm's model call in chunks of CHUNK positions (row i predicts token i+1); with `prefix` (of the same
    leading tokens, ending at or before `start`) the forward continues from its restored state."""
    n = len(prefix.ids) if prefix is not None else 0
    if prefix is not None and not (n <= start and tuple(ids[:n]) == prefix.ids):
        raise ValueError("the prefix is not a prefix of these ids")
    cache = _restored(bundle, prefix, kv) if prefix is not None else bundle.trunk.make_cache(kv)
    out = _forward_rows(bundle, cache, ids[n:], start - n)
    return np.concatenate(out) if out else np.zeros((0, bundle.trunk.lm.args.vocab_size), np.float32)


def _drift(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 0.0
    return abs(a - b)


def _tv(row: Support | None, f: Support) -> float:
    """Total variation between the decoder's row (None: not kept) and the fresh one, over their supports' union."""
    if row is None:
        return float("nan")
    ids = np.union1d(row.ids, f.ids)
    return 0.5 * float(np.abs(f.on(ids) - row.on(ids)).sum())


def rescore(bundle: Bundle, prompt: list[int], result: DecodeResult, cfg: SamplingConfig,
            kv: KVCacheSpec = FULL_KV, prefix: Prefix | None = None) -> Rescoring:
    """Score every emitted token of a sampled run of the reference decoder against a fresh teacher-forced target
    (see the module doc); drift is against the decoder's own rows."""
    recs = result.token_records
    return rescore_tokens(bundle, prompt, list(result.tokens), cfg, kv,
                          [r.target_logprob for r in recs] if recs else None, result.target_rows, prefix=prefix)


HIDDEN = -1  # a last token the sampler counted but did not show, known only to be one of `impute`'s ids


def impute(f: Support, ids: frozenset[int], rng: np.random.Generator) -> int:
    """One of `ids` drawn from the fresh row `f` restricted to them: under the null the hidden token has exactly
    this law, so its PIT and log p stay exact (the lowest id, scored outside the support, when none is possible)."""
    cands = sorted(ids)
    probs = np.array([f.prob(t) for t in cands])
    return cands[int(rng.choice(len(cands), p=probs / probs.sum()))] if probs.sum() > 0 else cands[0]


def rescore_tokens(bundle: Bundle, prompt: list[int], tokens: list[int], cfg: SamplingConfig,
                   kv: KVCacheSpec = FULL_KV, compare: Sequence[float] | None = None,
                   rows: Sequence[Support | None] | None = None, compare_raw: bool = False,
                   prefix: Prefix | None = None, hidden_among: frozenset[int] = frozenset()) -> Rescoring:
    """Score `tokens` (generated after `prompt` by any sampler: the reference decoder or a server) against a fresh
    teacher-forced target under `cfg`'s transform.

    `compare`: the log p per token the sampler itself reported, for the drift (NaN where unknown); taken under the
    transform (the decoder's rows), or, with `compare_raw`, as the model's untransformed log-softmax (what
    mlx_lm.server and vLLM report by default). `rows`: the sampler's own rows where kept, for the TV drift.
    `prefix`: the prompt's `fresh_prefix`, shared by the runs rescored after one prompt. A last token `HIDDEN` (an
    EOS a server counted but did not show, the checkpoint having several) is imputed from `hidden_among`."""
    t0 = time.perf_counter()
    tokens = list(tokens)
    logits = fresh_logits(bundle, prompt + tokens[:-1], len(prompt) - 1, kv, prefix)
    rng = np.random.default_rng([cfg.seed, 0x5C0DE])  # its own stream: never the decoder's or its PIT's
    rows = rows or []
    out = []
    checked = set(checked_rows(len(tokens), logits.shape[-1]))
    for i, tok in enumerate(tokens):
        f = support(logits[i], cfg)  # the run's transform, sparse: a few ids per row at top-k
        if tok == HIDDEN:
            tok = tokens[i] = impute(support(logits[i], cfg, ties=True), hidden_among, rng)
        oracle = oracle_row(logits[i], cfg) if i in checked else None
        oracle_tv = total_variation(f.ids, f.probs, oracle) if oracle is not None else float("nan")
        if f.prob(tok) == 0 and cfg.top_k:
            tied = support(logits[i], cfg, ties=True)  # the audit's support is tie-inclusive
            f = tied if tied.prob(tok) > 0 else f
        ft = f.prob(tok)
        lp = math.log(ft) if ft > 0 else float("-inf")
        ref = float(compare[i]) if compare is not None and i < len(compare) else float("nan")
        fresh_ref = _raw_logprob(logits[i], tok) if compare_raw else lp
        out.append(FreshRecord(lp, pit(f, tok, rng.random()), ft > 0, *support_moments(f), _drift(ref, fresh_ref),
                               _tv(rows[i] if i < len(rows) else None, f), oracle_tv))
    return Rescoring(out, time.perf_counter() - t0, tokens)


def greedy_gaps(bundle: Bundle, prompt: list[int], tokens: list[int], kv: KVCacheSpec = FULL_KV,
                prefix: Prefix | None = None) -> list[float]:
    """The relative top-2 logit gap at each position of a greedy run, from a fresh teacher-forced forward: what
    the one greedy-identity verdict (`preservation.greedy_identity`) excuses a divergence on. Stored with the AR
    run's tokens (`top2_gap`), so the sweep excuses near-ties exactly as `verify` does."""
    return relative_top2_gap(fresh_logits(bundle, prompt + tokens[:-1], len(prompt) - 1, kv, prefix)).tolist()


def _raw_logprob(row: np.ndarray, token: int) -> float:
    """log softmax(row)[token] at T=1 with no filter: the model's own log p, as servers report it."""
    x = row.astype(np.float64)
    m = float(x.max())
    return float(x[token] - m - math.log(np.exp(x - m).sum()))
