"""What the rich records (p, q, alpha, PIT) cost the decode: tok/s with and without them, per mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model.checkpoint import Bundle
from .runs import abba, decode, geomean_ratio, median


def records_overhead(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int,
                     repeats: int) -> list[dict[str, Any]]:
    """What the rich records (p, q, alpha, PIT) cost: decode tok/s with and without them, per mode (K = 0 is AR)."""
    out = []
    for m in [0, *ks]:
        arms = [lambda m=m, r=r: decode(bundle, prompt_ids, m, max_tokens, records=r).decode_tok_s
                for r in (False, True)]
        lean, rich = abba(arms, repeats)
        ratio = geomean_ratio(rich, lean)
        out.append({"k": m, "records_tok_s": median(rich), "no_records_tok_s": median(lean),
                    "ratio": ratio, "overhead": 1.0 - ratio})
    return out
