"""Teacher-forced passes: the exact target distribution of short continuations, and top-2 logit gaps.

These give the statistical tests their ground truth without sampling: the target's joint distribution over the
first n tokens is a product of conditionals that one trunk forward per prefix computes exactly. The prefixes of one
length go through mlx_lm's own model call as one batch (BATCH rows at a time), so the 4^4 prefixes of a 5-token
enumeration at top_k 4 cost a few forwards, not 341.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from .common import host_supports
from .rescore import greedy_gaps

BATCH = 256  # prefixes per batched forward of the enumeration


def top2_gaps(bundle: Bundle, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Relative top-2 logit gap at each generated position (`rescore.greedy_gaps`, the one the verdicts use)."""
    return np.asarray(greedy_gaps(bundle, prompt, tokens))


def _last_rows(bundle: Bundle, prefixes: list[list[int]]) -> np.ndarray:
    """Float32 logits of the last position of each prefix (all of one length), batched through mlx_lm's model
    call with a fresh cache per batch (none of the decoder's compiled layers or caches)."""
    out = []
    for lo in range(0, len(prefixes), BATCH):
        ids = mx.array(prefixes[lo: lo + BATCH])
        logits = bundle.trunk.model(ids, cache=bundle.trunk.make_cache())[:, -1]
        out.append(np.asarray(logits.astype(mx.float32)))
    return np.concatenate(out)


def enumerate_target(bundle: Bundle, prompt: list[int], cfg: SamplingConfig, n: int,
                     max_sequences: int = 20000) -> dict[tuple[int, ...], float]:
    """Exact probability of every n-token continuation with non-zero mass under `cfg` (EOS ends a sequence)."""
    eos = bundle.eos_ids
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    done: dict[tuple[int, ...], float] = {}
    for _ in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        seqs = list(frontier)
        rows = host_supports(mx.array(_last_rows(bundle, [prompt + list(seq) for seq in seqs])), cfg) if seqs else []
        for seq, p in zip(seqs, rows):
            mass = frontier[seq]
            for tok, pt in zip(p.ids.tolist(), p.probs.tolist()):
                if pt > 0:
                    (done if tok in eos else nxt)[seq + (tok,)] = mass * pt
        if len(nxt) + len(done) > max_sequences:
            raise ValueError(f"target support exceeds {max_sequences} sequences: use top_k or fewer tokens")
        frontier = nxt
    return {**done, **frontier}


ALPHA_CHUNK = 256  # head positions per lm_head call (bounds the (L, V) logits held at once)


def head_alphas(bundle: Bundle, prompt: list[int], tokens: list[int], cfg: SamplingConfig) -> np.ndarray:
    """alpha = sum_v min(p_v, q_v) at every generated position a speculative runtime could have drafted at depth 1
    (tokens 1..n-1; token 0 follows the prompt's forward), teacher-forced over prompt + tokens: p from one fresh
    trunk forward, q from the checkpoint's MTP head fed the true (hidden at i, token i+1) pairs, as the decoder's
    committed history feeds it, both under `cfg`'s transform. The acceptance an exact optimal rule expects there.
    """
    from ..sampling import alpha, support

    ids = prompt + tokens[:-1]
    if len(tokens) < 2 or len(prompt) < 1:
        return np.zeros(0)
    trunk, head = bundle.trunk, bundle.draft_head
    x = mx.array(ids)[None]
    out = trunk(x, trunk.make_cache())
    start = len(prompt) - 1  # pair i = (hidden i, token i+1) drafts token i+2; the first drafted token is index 1
    z = head(out.hidden[:, start:-1], head.embed(x[:, start + 1:]), head.make_cache()) if len(prompt) == 1 else \
        _head_after_prefix(bundle, out.hidden, x, start)
    res = []
    for lo in range(0, z.shape[1], ALPHA_CHUNK):
        q_rows = np.asarray(head.lm_head(z[:, lo:lo + ALPHA_CHUNK])[0].astype(mx.float32))
        p_rows = np.asarray(out.logits[0, start + 1 + lo:start + 1 + lo + q_rows.shape[0]].astype(mx.float32))
        res += [alpha(support(p, cfg), support(q, cfg)) for p, q in zip(p_rows, q_rows)]
    return np.asarray(res)


def _head_after_prefix(bundle: Bundle, hidden: mx.array, x: mx.array, start: int) -> mx.array:
    """The head's normed outputs for pairs start.. (each drafting the token two ahead), its cache first fed the
    prompt's earlier true pairs, as `speculative.prefill` feeds them."""
    head, trunk = bundle.draft_head, bundle.trunk
    cache = head.make_cache()
    head(hidden[:, :start], head.embed(x[:, 1:start + 1]), cache)
    return head(hidden[:, start:-1], head.embed(x[:, start + 1:]), cache)
