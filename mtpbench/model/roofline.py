"""The physical limit next to a decode tok/s: weight bytes read per token, and the machine's memory bandwidth.

Decoding one token reads every trunk weight once (AR); an MTP step reads the trunk once plus K draft steps of the
head and the lm head (drafts use the trunk's), and emits tau tokens. Weight bytes per token x tok/s is the achieved
weight bandwidth; over the machine's copy bandwidth it says how close a figure is to what memory allows.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import Bundle


def nbytes(module) -> int:
    """Bytes of every parameter of a module, quantized weights' scales and biases included."""
    return int(sum(v.nbytes for _, v in tree_flatten(module.parameters())))


def weight_bytes(bundle: Bundle) -> int:
    """Trunk weight bytes (the whole mlx_lm model: embedding, layers, norms, lm head)."""
    return nbytes(bundle.model)


def draft_step_bytes(bundle: Bundle) -> int:
    """One draft step: the MTP head plus the lm head it shares with the trunk (the embedding table when tied)."""
    lm = bundle.trunk.lm
    lm_head = lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head
    return nbytes(bundle.require_mtp()) + nbytes(lm_head) if bundle.mtp is not None else 0


def bytes_per_token(trunk_bytes: int, draft_bytes: int, k: int, tau: float) -> float:
    """Weight bytes read per emitted token: AR (k = 0) reads the trunk; MTP reads trunk + k drafts per tau tokens."""
    if k == 0:
        return float(trunk_bytes)
    return (trunk_bytes + k * draft_bytes) / tau if tau and math.isfinite(tau) else float("nan")


@lru_cache(maxsize=4)
def copy_bandwidth(mb: int = 256, best_of: int = 5) -> float:
    """Machine memory bandwidth in GB/s: the best large numpy copy, read + write bytes counted (once per process)."""
    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(best_of):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9
