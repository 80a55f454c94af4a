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
