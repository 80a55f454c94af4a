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
    all n rows) and the selection runs in numpy. Chosen by measurement (`sampling_cost.row_costs`, reported by
    `mtpbench bench`): at V = 248,320, T=0.6/top_p=0.95/top_k=20 on the 2-core CPU, the whole host row took
    0.41 ms against 12.8 ms for mlx's argpartition + logsumexp on the device returning only k values (the
    float32 transfer itself costs ~0.03 ms). On Metal or CUDA the device may win; measure there before moving it.
    """
    if cfg.greedy:
        return [Support.point(int(i)) for i in np.asarray(mx.argmax(logits, axis=-1)).reshape(-1)]
    rows = np.asarray(logits.astype(mx.float32))
    return [support(row, cfg) for row in rows.reshape(-1, rows.shape[-1])]


def choose(p: Support, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    return p.argmax() if cfg.greedy else sample(p, rng)


def token_record(index: int, token: int, source: str, p: Support, pit_rng: np.random.Generator | None) -> TokenRecord:
    """Target log-prob and randomized PIT u = F(x-) + U p(x) of `token` under target row `p` (its support in
    ascending id order, so F(x-) is the mass of the smaller ids, as on the dense row)."""
    pt = p.prob(token)
    u = float(p.probs[p.ids < token].sum() + pit_rng.random() * pt) if pit_rng is not None else float("nan")
    mass = p.probs[p.probs > 0]
    logs = np.log(mass)
    mean = float(mass @ logs)
    centred = logs - mean
    var = float(mass @ (centred * centred))
    m3 = float(mass @ (centred * centred * centred))
    return TokenRecord(index, token, source, math.log(pt) if pt > 0 else float("-inf"), u, mean, var, m3)


def point_mass_record(index: int, token: int, source: str, pit_rng: np.random.Generator | None) -> TokenRecord:
    """`token_record` of a greedy token (p = onehot(token)) without building a vocabulary-sized row."""
    u = float(pit_rng.random()) if pit_rng is not None else float("nan")
    return TokenRecord(index, token, source, 0.0, u, 0.0, 0.0, 0.0)


def rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The sampling stream and a separate PIT stream, so recording never changes what is sampled."""
    return np.random.default_rng(seed), np.random.default_rng([seed, 0x9E3779B9])


def reset_peak() -> None:
    mx.reset_peak_memory()


def peak() -> int:
    return int(mx.get_peak_memory())


now = time.perf_counter
