"""The cost model against what runs: predicted vs realized speedup per setting and K.

Each setting is priced with its own terms: greedy with the greedy step's (drafts on the device, one sync), a
sampled setting with `costs.SampledTerms` (a host row and a sample per draft, K+1 host rows and the rule at verify);
the AR term is the AR loop's own seconds per token at that setting in the same runs, and the acceptance is the runs'
own. `error` = predicted / realized - 1 says how far the model is from the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any


from ..decode import DecodeResult
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from ..stats.acceptance import StepCosts, break_even_acceptance, expected_tokens, predicted_speedup
from .costs import MeasuredCosts, SampledTerms, measure_sampled_terms
from .runs import abba, decode, geomean_ratio, median
from .settings import GREEDY

TARGET_ERROR = 0.10  # the model's stated error: |predicted / realized - 1| within it on a quiet machine




def _survival(runs: Sequence[DecodeResult], k: int) -> list[float]:
    """Survival to depth d = steps whose first d drafts were all accepted / verify steps, pooled over runs."""
    steps = sum(r.verify_steps for r in runs)
    return [sum(r.accepted_at_depth[d] for r in runs) / steps if steps else 0.0 for d in range(k)]


def _rejected_js(runs: Sequence[DecodeResult], k: int) -> list[int]:
    return [j for r in runs for j in r.accepted_per_step if j < k]


def _catch_up_rows(runs: Sequence[DecodeResult]) -> list[int]:
    """Positions the head is fed at each step's first draft: 1 after the prompt, then the previous step's j + 1."""
    return [rows for r in runs for rows in [1, *(j + 1 for j in r.accepted_per_step[:-1])]]


def _k_efficiency(k: int, ar: list[DecodeResult], mtp: list[DecodeResult], costs: MeasuredCosts,
                  sampled: SampledTerms | None = None) -> dict[str, Any]:
    """Predicted speedup = tau x (AR seconds per token) / (modelled MTP step), realized = paired tok/s ratio.

    The AR term is the AR loop's own seconds per token in these very runs (it keeps one forward in flight, so it
    beats an isolated step that ends in a sync): the prediction is then "what the checkpoint allows over the AR
    baseline it is compared with", and efficiency below 1 is time the MTP loop spends beyond its measured terms.
    """
    survival = _survival(mtp, k)
    rejected, rows = _rejected_js(mtp, k), _catch_up_rows(mtp)
    real_ar = sum(r.decode_s for r in ar) / sum(r.generated_tokens - 1 for r in ar)
    ck = _terms(costs.for_k(k, rejected, catch_up_rows=rows), costs, k, real_ar, sampled)
    predicted = predicted_speedup(survival, ck)
    predicted_reforward = predicted_speedup(survival, _terms(
        costs.for_k(k, rejected, rollback="reforward", catch_up_rows=rows), costs, k, real_ar, sampled))
    realized = geomean_ratio([r.decode_tok_s for r in mtp], [r.decode_tok_s for r in ar])
    p_reject = 1.0 - (survival[-1] if survival else 0.0)
    model_step = ck.drafts(k) + ck.verify[k] + p_reject * ck.rollback
    steps = sum(r.verify_steps for r in mtp)
    real_step = sum(r.decode_s for r in mtp) / steps if steps else float("nan")
    return {
        "setting": sampled.setting if sampled else "greedy", "k": k, "survival": survival, "tau": expected_tokens(survival), "rollback_s": ck.rollback,
        "drafts_s": ck.drafts(k), "catch_up_s": ck.drafts(k) - costs.draft_chain.get(k, ck.drafts(k)),
        "ar_tok_s": median([r.decode_tok_s for r in ar]), "mtp_tok_s": median([r.decode_tok_s for r in mtp]),
        "predicted_speedup": predicted, "predicted_speedup_reforward": predicted_reforward,
        "realized_speedup": realized, "efficiency": realized / predicted, "error": predicted / realized - 1,
        "break_even_acceptance": break_even_acceptance(k, ck),
        "model_step_s": model_step, "measured_step_s": real_step, "step_overhead": real_step / model_step,
        "model_ar_step_s": costs.ar_step, "measured_ar_step_s": real_ar, "ar_overhead": real_ar / costs.ar_step,
        "verify_steps": steps, "no_draft_accepted": sum(r.accepted_tokens for r in mtp) == 0,
    }


def _terms(base: StepCosts, costs: MeasuredCosts, k: int, ar_step: float, sampled: SampledTerms | None) -> StepCosts:
    """The step's terms at one setting: the greedy ones, or the sampled drafts and verify in their place (the
    head's catch-up on accepted positions and the rollback are the same work at every setting)."""
    if sampled is None:
        return replace(base, ar_step=ar_step)
    catch_up = base.drafts(k) - costs.draft_chain.get(k, base.drafts(k))
    return replace(base, ar_step=ar_step, draft_chain={k: sampled.drafts[k] + catch_up},
                   verify={k: sampled.verify[k]})


def mtp_efficiency(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
                   costs: MeasuredCosts, cfg: SamplingConfig = GREEDY,
                   sampled: SampledTerms | None = None) -> list[dict[str, Any]]:
    """Per K: realized speedup (MTP vs AR at `cfg`, side by side) over the speedup the setting's terms predict."""
    modes = [0, *ks]
    arms = [lambda m=m: decode(bundle, prompt_ids, m, max_tokens, cfg=cfg) for m in modes]
    runs = dict(zip(modes, abba(arms, repeats)))
    return [_k_efficiency(k, runs[0], runs[k], costs, None if cfg.greedy else sampled) for k in ks]


def cost_model(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
               costs: MeasuredCosts, greedy: list[dict[str, Any]], sampled_cfg: SamplingConfig,
               warmup: int = 1) -> dict[str, Any]:
    """`bench`'s cost-model section: predicted vs realized per setting (greedy: the `mtp` rows already measured;
    `sampled_cfg`: its own terms and runs)."""
    terms = measure_sampled_terms(bundle, prompt_ids, ks, sampled_cfg, repeats, warmup)
    rows = greedy + mtp_efficiency(bundle, prompt_ids, ks, max_tokens, repeats, costs, sampled_cfg, terms)
    return {"settings": rows, "sampled_terms": terms.to_dict(), "target_error": TARGET_ERROR}
