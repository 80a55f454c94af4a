"""Teacher-forced acceptance scan: one trunk forward and one MTP pass per text, no decoding.

At every position t the head, fed the true (hidden[t], x[t+1]), drafts x[t+2]; comparing with the trunk's own
distribution at t+1 gives the greedy draft match and alpha = sum min(p, q) at depth 1. Orders of magnitude faster
than decoding, so policies and long contexts compare cheaply. Because decode-time MTP caches hold exactly these
true pairs, walking the match array the way a K=1 greedy decode steps reproduces its acceptance (a sharp check of
the MTP cache handling). Chained depths (>1) need the head's own outputs and are left to the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig, alpha as support_alpha
from .common import host_supports


@dataclass(frozen=True)
class Scan:
    match: np.ndarray  # (T-2,) bool: greedy draft at MTP position t equals the trunk argmax at t+1
    alpha: np.ndarray  # (T-2,) sum_v min(p, q) under the sampling config


def scan(bundle: Bundle, ids: list[int], cfg: SamplingConfig = SamplingConfig()) -> Scan:
    bundle.require_mtp()
    head, trunk = bundle.draft_head, bundle.trunk  # the head embeds and scores with its own tables if it has them
    x = mx.array(ids)[None]
    out = trunk(x, trunk.make_cache())
    z = head(out.hidden[:, :-1], head.embed(x[:, 1:]), head.make_cache())  # position t drafts x[t+2]
    q_logits = head.lm_head(z)[0, :-1]
    p_logits = out.logits[0, 1:-1]  # the trunk's distribution for x[t+2]
    match = np.asarray(mx.argmax(q_logits, -1) == mx.argmax(p_logits, -1))
    if cfg.greedy:
        alpha = match.astype(float)
    else:
        p, q = host_supports(p_logits, cfg), host_supports(q_logits, cfg)
        alpha = np.array([support_alpha(pi, qi) for pi, qi in zip(p, q)])
    return Scan(match=match, alpha=alpha)


def greedy_k1_walk(match: np.ndarray, prompt_len: int, generated: int) -> tuple[int, int]:
    """(accepted, verify steps) of a K=1 greedy decode whose output is the scanned text after the prompt."""
    t, n_tok, steps, accepted = prompt_len - 1, 1, 0, 0
    while n_tok < generated and t < len(match):
        steps += 1
        if match[t]:
            accepted += 1
            n_tok, t = n_tok + 2, t + 2
        else:
            n_tok, t = n_tok + 1, t + 1
    return accepted, steps


def scan_texts(bundle: Bundle, texts: list[tuple[str, list[int]]], cfg: SamplingConfig) -> list[dict]:
    """`scan` over (category, ids) texts of 3 tokens or more: one plain record per text."""
    rows = []
    for category, ids in texts:
        if len(ids) < 3:
            continue
        s = scan(bundle, ids, cfg)
        rows.append({"category": category, "positions": len(s.match), "matches": int(s.match.sum()),
                     "alpha": float(s.alpha.mean())})
    return rows
