"""Timed decode runs side by side: one greedy run per arm, alternating (ABBA) so drift hits both sides, and the
paired ratios and medians every section reports (shared/DESIGN.md, timing protocol)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..decode import DecodeResult, generate_ar, generate_mtp
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from .settings import GREEDY




def decode(bundle: Bundle, prompt: list[int], k: int, max_tokens: int, records: bool = False,
           cfg: SamplingConfig = GREEDY) -> DecodeResult:
    """One run of AR (k = 0) or MTP at depth k (greedy unless `cfg` says otherwise), EOS ignored so every run
    decodes the same length."""
    if k == 0:
        return generate_ar(bundle, prompt, cfg, max_tokens, records=records, ignore_eos=True)
    return generate_mtp(bundle, prompt, cfg, k, max_tokens, records=records, ignore_eos=True)


def abba(arms: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[list[Any]]:
    """Run every arm `warmup + repeats` times, reversing the order on every other round; keep the timed rounds."""
    out: list[list[Any]] = [[] for _ in arms]
    for r in range(warmup + repeats):
        order = list(range(len(arms))) if r % 2 == 0 else list(range(len(arms)))[::-1]
        for i in order:
            value = arms[i]()
            if r >= warmup:
                out[i].append(value)
    return out


def geomean_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Geometric mean of the paired (same round) ratios num/den."""
    logs = [math.log(a / b) for a, b in zip(num, den) if a > 0 and b > 0 and math.isfinite(a / b)]
    return math.exp(float(np.mean(logs))) if logs else float("nan")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
