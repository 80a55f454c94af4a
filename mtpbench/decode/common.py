"""Pieces both decoders share: target rows on the host, token choice, token records, the clock."""

from __future__ import annotations

import math
import time

import mlx.core as mx
import numpy as np

from ..sampling import SamplingConfig, sample, sampling_probs
from .records import TokenRecord


def host_probs(logits: mx.array, cfg: SamplingConfig) -> np.ndarray:
    """(n, V) device logits -> (n, V) float64 probabilities on the host.

    Greedy moves only the argmax ids off the device and builds the point masses here (cheap for any vocab).
    """
    if cfg.greedy:
        ids = np.asarray(mx.argmax(logits, axis=-1))
        out = np.zeros((logits.shape[0], logits.shape[-1]))
        out[np.arange(len(ids)), ids] = 1.0
        return out
    return sampling_probs(np.asarray(logits.astype(mx.float32)), cfg)


def choose(probs: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    return int(np.argmax(probs)) if cfg.greedy else sample(probs, rng)


def token_record(index: int, token: int, source: str, p: np.ndarray, pit_rng: np.random.Generator | None,
                 cond: np.ndarray | None = None) -> TokenRecord:
    """Target log-prob and randomized PIT u = F(x-) + U p(x) of `token` under target row `p`; with `cond` (the law
    of the token given its source, `rule.conditional_law`), also its PIT under that law, from the same U."""
    pt = float(p[token])
    w = pit_rng.random() if pit_rng is not None else float("nan")
    u = float(p[:token].sum() + w * pt)
    cond_u = float(cond[:token].sum() + w * cond[token]) if cond is not None else float("nan")
    support = p[p > 0]
    logs = np.log(support)
    mean = float(support @ logs)
    centred = logs - mean
    var = float(support @ (centred * centred))
    m3 = float(support @ (centred * centred * centred))
    return TokenRecord(index, token, source, math.log(pt) if pt > 0 else float("-inf"), u, mean, var, m3, cond_u)


SPARSE_ROW_MAX = 4096  # support size up to which a decoder row is kept for rescoring's total variation


def sparse_row(p: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, probs) of a row's support, kept for the fresh-target drift; None when the support is too wide to keep."""
    ids = np.flatnonzero(p > 0)
    return (ids.astype(np.int32), p[ids].astype(np.float64)) if len(ids) <= SPARSE_ROW_MAX else None


def point_mass_record(index: int, token: int, source: str, pit_rng: np.random.Generator | None) -> TokenRecord:
    """`token_record` of a greedy token (p = onehot(token)) without building a vocabulary-sized row."""
    u = float(pit_rng.random()) if pit_rng is not None else float("nan")
    return TokenRecord(index, token, source, 0.0, u, 0.0, 0.0, 0.0, u)  # every conditional law is the point mass


def rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The sampling stream and a separate PIT stream, so recording never changes what is sampled."""
    return np.random.default_rng(seed), np.random.default_rng([seed, 0x9E3779B9])


def reset_peak() -> None:
    mx.reset_peak_memory()


def peak() -> int:
    return int(mx.get_peak_memory())


now = time.perf_counter
