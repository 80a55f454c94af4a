"""Predicted vs realized speedup per K: the cost model fed with the measured terms and the runs' own acceptance,
against the paired MTP/AR tok/s ratio of the same runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any


from ..decode import DecodeResult
from ..model.checkpoint import Bundle
from ..stats.acceptance import break_even_acceptance, expected_tokens, predicted_speedup
from .costs import MeasuredCosts
from .runs import abba, decode, geomean_ratio, median




def _survival(runs: Sequence[DecodeResult], k: int) -> list[float]:
    """Survival to depth d = steps whose first d drafts were all accepted / verify steps, pooled over runs."""
    steps = sum(r.verify_steps for r in runs)
    return [sum(r.accepted_at_depth[d] for r in runs) / steps if steps else 0.0 for d in range(k)]


def _rejected_js(runs: Sequence[DecodeResult], k: int) -> list[int]:
    return [j for r in runs for j in r.accepted_per_step if j < k]


def _catch_up_rows(runs: Sequence[DecodeResult]) -> list[int]:
    """Positions the head is fed at each step's first draft: 1 after the prompt, then the previous step's j + 1."""
    return [rows for r in runs for rows in [1, *(j + 1 for j in r.accepted_per_step[:-1])]]


def _k_efficiency(k: int, ar: list[DecodeResult], mtp: list[DecodeResult], costs: MeasuredCosts) -> dict[str, Any]:
    """Predicted speedup = tau x (AR seconds per token) / (modelled MTP step), realized = paired tok/s ratio.

    The AR term is the AR loop's own seconds per token in these very runs (it keeps one forward in flight, so it
    beats an isolated step that ends in a sync): the prediction is then "what the checkpoint allows over the AR
    baseline it is compared with", and efficiency below 1 is time the MTP loop spends beyond its measured terms.
    """
    survival = _survival(mtp, k)
    rejected, rows = _rejected_js(mtp, k), _catch_up_rows(mtp)
    real_ar = sum(r.decode_s for r in ar) / sum(r.generated_tokens - 1 for r in ar)
    ck = replace(costs.for_k(k, rejected, catch_up_rows=rows), ar_step=real_ar)
    predicted = predicted_speedup(survival, ck)
    predicted_reforward = predicted_speedup(survival, replace(
        costs.for_k(k, rejected, rollback="reforward", catch_up_rows=rows), ar_step=real_ar))
    realized = geomean_ratio([r.decode_tok_s for r in mtp], [r.decode_tok_s for r in ar])
    p_reject = 1.0 - (survival[-1] if survival else 0.0)
    model_step = ck.drafts(k) + ck.verify[k] + p_reject * ck.rollback
    steps = sum(r.verify_steps for r in mtp)
    real_step = sum(r.decode_s for r in mtp) / steps if steps else float("nan")
    return {
        "k": k, "survival": survival, "tau": expected_tokens(survival), "rollback_s": ck.rollback,
        "drafts_s": ck.drafts(k), "catch_up_s": ck.drafts(k) - costs.draft_chain.get(k, ck.drafts(k)),
        "ar_tok_s": median([r.decode_tok_s for r in ar]), "mtp_tok_s": median([r.decode_tok_s for r in mtp]),
        "predicted_speedup": predicted, "predicted_speedup_reforward": predicted_reforward,
        "realized_speedup": realized, "efficiency": realized / predicted,
        "break_even_acceptance": break_even_acceptance(k, ck),
        "model_step_s": model_step, "measured_step_s": real_step, "step_overhead": real_step / model_step,
        "model_ar_step_s": costs.ar_step, "measured_ar_step_s": real_ar, "ar_overhead": real_ar / costs.ar_step,
        "verify_steps": steps, "no_draft_accepted": sum(r.accepted_tokens for r in mtp) == 0,
    }


def mtp_efficiency(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
                   costs: MeasuredCosts) -> list[dict[str, Any]]:
    """Per K: realized speedup (MTP vs AR, side by side) over the speedup the measured costs predict."""
    modes = [0, *ks]
    arms = [lambda m=m: decode(bundle, prompt_ids, m, max_tokens) for m in modes]
    runs = dict(zip(modes, abba(arms, repeats)))
    return [_k_efficiency(k, runs[0], runs[k], costs) for k in ks]
