"""Teacher-forced passes: the exact target distribution of short continuations, and top-2 logit gaps.

These give the statistical tests their ground truth without sampling: the target's joint distribution over the
first n tokens is a product of conditionals that one trunk forward per prefix computes exactly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from .common import host_supports


def forward_logits(bundle: Bundle, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), V) of one fresh trunk forward over `ids` (row i predicts token i+1)."""
    out = bundle.trunk(mx.array(ids)[None], bundle.trunk.make_cache())
    return np.asarray(out.logits[0].astype(mx.float32))


def top2_gaps(bundle: Bundle, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Relative top-2 logit gap at each generated position: (l1 - l2) / max(|l1|, 1)."""
    logits = forward_logits(bundle, prompt + tokens[:-1])[len(prompt) - 1 :]
    top = -np.sort(-logits, axis=-1)[:, :2]
    return (top[:, 0] - top[:, 1]) / np.maximum(np.abs(top[:, 0]), 1.0)


def enumerate_target(bundle: Bundle, prompt: list[int], cfg: SamplingConfig, n: int,
                     max_sequences: int = 20000) -> dict[tuple[int, ...], float]:
    """Exact probability of every n-token continuation with non-zero mass under `cfg` (EOS ends a sequence)."""
    eos = bundle.eos_ids
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    done: dict[tuple[int, ...], float] = {}
    for _ in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, mass in frontier.items():
            p = host_supports(mx.array(forward_logits(bundle, prompt + list(seq))[-1:]), cfg)[0]
            for tok, pt in zip(p.ids.tolist(), p.probs.tolist()):
                if pt > 0:
                    (done if tok in eos else nxt)[seq + (tok,)] = mass * pt
        if len(nxt) + len(done) > max_sequences:
            raise ValueError(f"target support exceeds {max_sequences} sequences: use top_k or fewer tokens")
        frontier = nxt
    return {**done, **frontier}
