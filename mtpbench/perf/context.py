"""Decode speed against context: AR and MTP(K) tok/s at prompts of growing length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..model.checkpoint import Bundle
from .runs import abba, decode, geomean_ratio, median
from .settings import context_cap, pattern_prompt


def context_scaling(bundle: Bundle, lengths: Sequence[int] = (512, 2048, 8192), ks: Sequence[int] = (1, 2, 3),
                    max_tokens: int = 64, repeats: int = 1) -> list[dict[str, Any]]:
    """AR and MTP(K) decode tok/s at prompts of about each length (capped at the model's position budget)."""
    cap = context_cap(bundle, max_tokens, ks)
    out = []
    for target in lengths:
        prompt = pattern_prompt(bundle, min(target, cap))
        modes = [0, *ks]
        arms = [lambda m=m, p=prompt: decode(bundle, p, m, max_tokens) for m in modes]
        runs = dict(zip(modes, abba(arms, repeats, warmup=0)))
        ar = median([r.decode_tok_s for r in runs[0]])
        out.append({
            "target_tokens": target, "prompt_tokens": len(prompt), "capped": target > cap,
            "prefill_tok_s": median([len(prompt) / r.prefill_s for r in runs[0]]), "ar_tok_s": ar,
            "mtp": [{"k": k, "tok_s": median([r.decode_tok_s for r in runs[k]]),
                     "speedup": geomean_ratio([r.decode_tok_s for r in runs[k]], [r.decode_tok_s for r in runs[0]]),
                     "tau": float(np.mean([r.mean_acceptance_length for r in runs[k]]))} for k in ks],
        })
    return out
