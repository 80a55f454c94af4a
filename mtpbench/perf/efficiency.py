"""The cost model against what runs: predicted vs realized speedup per setting and K.

Each setting is priced with its own terms: greedy with the greedy step's (drafts on the device, one sync), a
sampled setting with `costs.SampledTerms` (a host row and a sample per draft, K+1 host rows and the rule at verify);
the AR term is the AR loop's own seconds per token at that setting in the same runs, and the acceptance is the runs'
own. `error` = predicted / realized - 1 says how far the model is from the clock.

Terms and runs are timed in the same rounds: each round times every term once (`measure_costs`, and the sampled
terms at a sampled setting) and runs AR and MTP at every K once, in ABBA order across rounds. On a shared or
throttling machine the speed drifts by tens of percent within a minute (measured on a 2-core VM: the isolated terms
of one process varied 1.0-1.6 ms for the same draft chain); terms timed in a block before the runs then disagree
with the runs by that drift, not by a missing term. The per-round errors (`error_rounds`) show the spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..decode import DecodeResult
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from ..stats.acceptance import StepCosts, break_even_acceptance, expected_tokens, predicted_speedup
from .costs import MeasuredCosts, SampledTerms, measure_costs, measure_sampled_terms, median_terms
from .runs import abba, decode, geomean_ratio, median
from .settings import GREEDY

TARGET_ERROR = 0.10  # the model's stated error: |predicted / realized - 1| within it on a quiet machine
TERM_REPEATS = 3  # timed calls of each term per round (after one untimed), medians within the round


@dataclass(frozen=True)
class Rounds:
    """One setting measured in rounds: each round's terms, and every mode's runs (0 = AR, else K), in round order."""

    cfg: SamplingConfig
    costs: list[MeasuredCosts]
    sampled: list[SampledTerms]  # empty for greedy
    runs: dict[int, list[DecodeResult]]

    def terms(self) -> tuple[MeasuredCosts, SampledTerms | None]:
        """The setting's terms: the median over rounds, term by term."""
        return median_terms(self.costs), (median_terms(self.sampled) if self.sampled else None)


def measure_rounds(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
                   cfg: SamplingConfig = GREEDY, warmup: int = 1) -> Rounds:
    """`warmup + repeats` rounds at `cfg` (`runs.abba`): each times the terms and runs AR and MTP at every K once,
    the order reversed every other round. The warmup rounds are dropped."""
    modes = [0, *ks]

    def terms() -> tuple[MeasuredCosts, SampledTerms | None]:
        return (measure_costs(bundle, prompt_ids, ks, TERM_REPEATS, 1),
                None if cfg.greedy else measure_sampled_terms(bundle, prompt_ids, ks, cfg, TERM_REPEATS, 1))

    timed, *runs = abba([terms, *(lambda m=m: decode(bundle, prompt_ids, m, max_tokens, cfg=cfg) for m in modes)],
                        repeats, warmup)
    return Rounds(cfg, [c for c, _ in timed], [s for _, s in timed if s is not None], dict(zip(modes, runs)))


def _survival(runs: Sequence[DecodeResult], k: int) -> list[float]:
    """Survival to depth d = steps whose first d drafts were all accepted / verify steps, pooled over runs."""
    steps = sum(r.verify_steps for r in runs)
    return [sum(r.accepted_at_depth[d] for r in runs) / steps if steps else 0.0 for d in range(k)]


def _rejected_js(runs: Sequence[DecodeResult], k: int) -> list[int]:
    return [j for r in runs for j in r.accepted_per_step if j < k]


def _catch_up_rows(runs: Sequence[DecodeResult]) -> list[int]:
    """Positions the head is fed at each step's first draft: 1 after the prompt, then the previous step's j + 1."""
    return [rows for r in runs for rows in [1, *(j + 1 for j in r.accepted_per_step[:-1])]]


def _ar_token_s(ar: Sequence[DecodeResult]) -> float:
    """The AR loop's own seconds per decoded token (it keeps one forward in flight, so it beats an isolated step)."""
    return sum(r.decode_s for r in ar) / sum(r.generated_tokens - 1 for r in ar)


def _terms(costs: MeasuredCosts, sampled: SampledTerms | None, k: int, mtp: Sequence[DecodeResult], ar_token_s: float,
           rollback: str = "capture") -> StepCosts:
    """The step's terms at one setting: the greedy ones, or the sampled drafts and verify in their place (the
    head's catch-up on accepted positions and the rollback are the same work at every setting); the rollback
    weighted by the runs' rejected prefixes, the AR term the AR loop's own."""
    base = costs.for_k(k, _rejected_js(mtp, k), rollback=rollback, catch_up_rows=_catch_up_rows(mtp))
    if sampled is None:
        return replace(base, ar_step=ar_token_s)
    catch_up = base.drafts(k) - costs.draft_chain.get(k, base.drafts(k))
    return replace(base, ar_step=ar_token_s, draft_chain={k: sampled.drafts[k] + catch_up},
                   verify={k: sampled.verify[k]})


def _k_efficiency(k: int, rounds: Rounds) -> dict[str, Any]:
    """Predicted speedup = tau x (AR seconds per token) / (modelled MTP step), realized = paired tok/s ratio.

    The prediction is "what the checkpoint allows over the AR baseline it is compared with" on these terms;
    efficiency below 1 is time the MTP loop spends beyond its measured terms.
    """
    ar, mtp = rounds.runs[0], rounds.runs[k]
    costs, sampled = rounds.terms()
    survival = _survival(mtp, k)
    real_ar = _ar_token_s(ar)
    ck = _terms(costs, sampled, k, mtp, real_ar)
    predicted = predicted_speedup(survival, ck)
    predicted_reforward = predicted_speedup(survival, _terms(costs, sampled, k, mtp, real_ar, "reforward"))
    realized = geomean_ratio([r.decode_tok_s for r in mtp], [r.decode_tok_s for r in ar])
    per_round = [predicted_speedup(survival, _terms(c, s, k, mtp, _ar_token_s([a])))
                 / (m.decode_tok_s / a.decode_tok_s) - 1
                 for c, s, a, m in zip(rounds.costs, rounds.sampled or [None] * len(ar), ar, mtp)]
    p_reject = 1.0 - (survival[-1] if survival else 0.0)
    model_step = ck.drafts(k) + ck.verify[k] + p_reject * ck.rollback
    steps = sum(r.verify_steps for r in mtp)
    real_step = sum(r.decode_s for r in mtp) / steps if steps else float("nan")
    return {
        "setting": rounds.cfg.label(), "k": k, "survival": survival, "tau": expected_tokens(survival),
        "rollback_s": ck.rollback, "drafts_s": ck.drafts(k), "verify_s": ck.verify[k],
        "catch_up_s": ck.drafts(k) - (sampled.drafts[k] if sampled else costs.draft_chain.get(k, ck.drafts(k))),
        "ar_tok_s": median([r.decode_tok_s for r in ar]), "mtp_tok_s": median([r.decode_tok_s for r in mtp]),
        "predicted_speedup": predicted, "predicted_speedup_reforward": predicted_reforward,
        "realized_speedup": realized, "efficiency": realized / predicted, "error": predicted / realized - 1,
        "error_rounds": per_round, "rounds": len(mtp),
        "break_even_acceptance": break_even_acceptance(k, ck),
        "model_step_s": model_step, "measured_step_s": real_step, "step_overhead": real_step / model_step,
        "model_ar_step_s": costs.ar_step, "measured_ar_step_s": real_ar, "ar_overhead": real_ar / costs.ar_step,
        "verify_steps": steps, "no_draft_accepted": sum(r.accepted_tokens for r in mtp) == 0,
    }


def mtp_efficiency(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
                   cfg: SamplingConfig = GREEDY, warmup: int = 1) -> list[dict[str, Any]]:
    """Per K: realized speedup (MTP vs AR at `cfg`, side by side) over the speedup the setting's terms predict,
    terms and runs timed in the same rounds."""
    rounds = measure_rounds(bundle, prompt_ids, ks, max_tokens, repeats, cfg, warmup)
    return [_k_efficiency(k, rounds) for k in ks]


def cost_model(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
               greedy: list[dict[str, Any]], sampled_cfg: SamplingConfig, warmup: int = 1) -> dict[str, Any]:
    """`bench`'s cost-model section: predicted vs realized per setting (greedy: the `mtp` rows already measured;
    `sampled_cfg`: its own terms and runs, in rounds)."""
    rounds = measure_rounds(bundle, prompt_ids, ks, max_tokens, repeats, sampled_cfg, warmup)
    _, terms = rounds.terms()
    rows = greedy + [_k_efficiency(k, rounds) for k in ks]
    return {"settings": rows, "sampled_terms": [terms.to_dict()], "target_error": TARGET_ERROR}
