"""An independent oracle for the fresh target: the filtered distribution, computed a second way.

Every preservation test compares emitted tokens with the fresh target, and both the decoder and the fresh target
go through `sampling.support`: a bug in that one transform would be invisible to all of them. This module shares
no code with sampling.py. It is a dense float64 numpy transcription of mlx_lm's sampler as published
(mlx_lm.sample_utils, 0.32: `make_sampler` chains `apply_top_p`, `apply_min_p`, `apply_top_k` on the
log-probabilities `logits - logsumexp(logits)` that `generate_step` passes it, then `categorical_sampling` draws
from `logprobs / temp`):
- top-p: sort ascending; mass_above = the mass of the strictly larger entries; num_dropped = #(mass_above >=
  top_p x total); every log-prob below sorted[num_dropped] is masked (ties at the threshold kept);
- min-p: mask log-probs below max + log(min_p);
- top-k: keep `argpartition(-logprobs, k - 1)[:k]`: exactly k ids; mlx's partition puts tied values in ascending id
  order, so a tie at the k-th value keeps its lowest ids;
- then softmax(logprobs / temp) over what is left.
tests/test_fresh_target.py holds it equal to mlx_lm's own functions on random rows. The rescoring
(decode/rescore.py) checks its rows against it; a disagreeing row is an instrument fault (the transform), never
a decoder verdict. Only the mlx profile (the reference's) has an oracle; other profiles are reported unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROFILE = "mlx"  # the one profile written out here
TOLERANCE = 1e-4  # total variation above which a row disagrees (float32 rows against float64: ~1e-7)


def mlx_lm_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0, min_p: float = 0.0,
                 top_k: int = 0) -> np.ndarray:
    """The distribution mlx_lm's sampler draws from, for one row of logits (float64, sums to 1)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    logprobs = x - (m + np.log(np.exp(x - m).sum()))
    if temperature == 0:
        out = np.zeros_like(logprobs)
        out[int(np.argmax(logprobs))] = 1.0
        return out
    if 0 < top_p < 1:
        srt = np.sort(logprobs)
        probs = np.exp(srt)
        mass_above = probs[::-1].cumsum()[::-1] - probs
        num_dropped = int(np.sum(mass_above >= top_p * (mass_above[0] + probs[0])))
        logprobs = np.where(logprobs < srt[min(num_dropped, len(srt) - 1)], -np.inf, logprobs)
    if min_p != 0:
        logprobs = np.where(logprobs < logprobs.max() + np.log(min_p), -np.inf, logprobs)
    if 0 < top_k < len(logprobs):
        order = np.argsort(-logprobs, kind="stable")  # ascending ids within a tie, as mlx's argpartition
        logprobs = logprobs.copy()
        logprobs[order[top_k:]] = -np.inf
    z = logprobs / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def oracle_row(logits: np.ndarray, cfg) -> np.ndarray | None:
    """The oracle's row for a sampling config (any object with temperature, top_p, min_p, top_k and order), None
    for a profile it does not cover."""
    if getattr(cfg, "order", PROFILE) != PROFILE:
        return None
    return mlx_lm_probs(logits, cfg.temperature, cfg.top_p, cfg.min_p, cfg.top_k)


def total_variation(ids: Sequence[int], probs: Sequence[float], dense: np.ndarray) -> float:
    """TV between a sparse row (ids, probs) and a dense one: half the L1 distance over the whole vocabulary."""
    ids, probs = np.asarray(ids, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    on = dense[ids]
    return 0.5 * float(np.abs(on - probs).sum() + max(0.0, 1.0 - on.sum()))


def checked_rows(n: int, vocab: int, every_below: int = 1 << 16, sample: int = 16) -> list[int]:
    """Which of a run's n rows the oracle checks: all of them at small vocabularies, else `sample` evenly spaced
    (a dense float64 row of 248,320 ids costs ~20 ms)."""
    if vocab < every_below or n <= sample:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, sample).round().astype(int).tolist()))
