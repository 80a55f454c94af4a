"""Pieces both decoders share: target rows on the host, token choice, token records, the clock."""

from __future__ import annotations

import math
import time

import mlx.core as mx
import numpy as np

from ..sampling import SamplingConfig, Support, sample, support
from .records import TokenRecord


def host_supports(logits: mx.array, cfg: SamplingConfig) -> list[Support]:
    """(n, V) device logits -> one `Support` per row, on the host.

    Greedy moves only the argmax ids off the device. Sampled rows come over once as float32 (one evaluation for
    all n rows) and the selection runs in numpy. Chosen by measurement (`perf.sampling_cost.row_costs`, reported by
    `mtpbench bench`): at V = 248,320, T=0.6/top_p=0.95/top_k=20 on a 2-core x86 VM, the whole host row took
    0.4-0.6 ms (with `sampling._largest`; 1.7 ms with a full partition) against 6.7-12.8 ms for mlx's argpartition +
    logsumexp on the device returning only k values (the float32 transfer itself costs ~0.03 ms). On Metal or CUDA
    the device may win; measure there before moving it.
    """
    if cfg.greedy:
        return [Support.point(int(i)) for i in np.asarray(mx.argmax(logits, axis=-1)).reshape(-1)]
    rows = np.asarray(logits.astype(mx.float32))
    return [support(row, cfg) for row in rows.reshape(-1, rows.shape[-1])]


def choose(p: Support, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    return p.argmax() if cfg.greedy else sample(p, rng)


def support_moments(p: Support) -> tuple[float, float, float]:
    """E[log p(X)], Var[log p(X)] and the third central moment under X ~ p (the score test's moments)."""
    mass = p.probs[p.probs > 0]
    logs = np.log(mass)
    mean = float(mass @ logs)
    centred = logs - mean
    return mean, float(mass @ (centred * centred)), float(mass @ (centred * centred * centred))


def pit(p: Support, token: int, w: float) -> float:
    """Randomized PIT u = F(x-) + w p(x) (its support is in ascending id order, so F(x-) is the mass of the smaller
    ids, as on the dense row)."""
    return float(p.probs[p.ids < token].sum() + w * p.prob(token))


def token_record(index: int, token: int, source: str, p: Support, pit_rng: np.random.Generator | None,
                 cond: Support | None = None) -> TokenRecord:
    """Target log-prob and randomized PIT of `token` under target row `p`; with `cond` (the law of the token given
    its source, `rule.conditional_law`), also its PIT under that law, from the same uniform."""
    pt = p.prob(token)
    w = pit_rng.random() if pit_rng is not None else float("nan")
    cond_u = pit(cond, token, w) if cond is not None else float("nan")
    return TokenRecord(index, token, source, math.log(pt) if pt > 0 else float("-inf"), pit(p, token, w),
                       *support_moments(p), cond_u)


SPARSE_ROW_MAX = 4096  # support size up to which a decoder row is kept for rescoring's total variation


def sparse_row(p: Support) -> Support | None:
    """A row kept for the fresh-target drift; None when its support is too wide to keep for every token."""
    return p if len(p.ids) <= SPARSE_ROW_MAX else None


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
