"""Acceptance analysis beyond the summary tables: the cost model, break-even acceptance, paired comparisons.

Cost model of one speculative step at depth K on a given machine (all terms measured, never assumed):
    t_step(K) = t_drafts(K) + t_verify(K) + p_reject * t_rollback
where t_drafts(K) is K chained draft steps ended by one host sync (measured per K where known: on small models a
sync costs more than a draft, so K * t_draft would overstate deep drafts), else K * t_draft.
and it emits E[tokens | survival s_1..s_K] = 1 + sum_d s_d tokens, where s_d is the survival to depth d.
Predicted speedup = E[tokens] * t_ar / t_step(K), with t_ar the cost of one AR decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import optimize
from scipy import stats as st

from .summary import bootstrap_ci


@dataclass(frozen=True)
class StepCosts:
    """Seconds per operation, measured on one machine."""

    ar_step: float
    draft_step: float
    verify: dict[int, float]  # K -> one (K+1)-token verify forward
    rollback: float = 0.0  # restore + re-forward of the accepted prefix, per rejected step
    draft_chain: dict[int, float] = field(default_factory=dict)  # K -> K chained drafts, one sync

    def drafts(self, k: int) -> float:
        return self.draft_chain.get(k, k * self.draft_step)


def expected_tokens(survival: list[float]) -> float:
    """Tokens per verify step: 1 (residual or bonus) + expected accepted drafts."""
    return 1.0 + float(np.sum(survival))


def iid_expected_tokens(alpha: float, k: int) -> float:
    """(1 - a^(K+1)) / (1 - a): tokens per step when every depth accepts independently with probability a."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(survival: list[float], costs: StepCosts) -> float:
    k = len(survival)
    p_reject = 1.0 - (survival[-1] if survival else 0.0)
    t_step = costs.drafts(k) + costs.verify[k] + p_reject * costs.rollback
    return expected_tokens(survival) * costs.ar_step / t_step


def break_even_acceptance(k: int, costs: StepCosts) -> float:
    """The i.i.d. acceptance below which MTP at depth K is slower than AR on this machine (NaN if never faster)."""
    def gain(a: float) -> float:
        surv = [a ** d for d in range(1, k + 1)]
        return predicted_speedup(surv, costs) - 1.0

    if gain(1.0) <= 0:
        return float("nan")
    if gain(0.0) >= 0:
        return 0.0
    return float(optimize.brentq(gain, 0.0, 1.0))


@dataclass(frozen=True)
class PairedComparison:
    n: int
    mean_ratio: float  # geometric mean of b / a over pairs
    ci_low: float
    ci_high: float
    wilcoxon_p: float


def paired_comparison(a: np.ndarray, b: np.ndarray, seed: int = 0) -> PairedComparison:
    """Compare two policies or depths on the same prompts: ratio b/a with a bootstrap CI, and Wilcoxon signed-rank."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    logr = np.log(b / a)
    lo, hi = bootstrap_ci(logr, np.mean, seed=seed)
    p = float(st.wilcoxon(logr).pvalue) if len(logr) >= 2 and np.any(logr != 0) else float("nan")
    return PairedComparison(len(a), float(np.exp(logr.mean())), float(np.exp(lo)), float(np.exp(hi)), p)


def costs_from_bench(costs: dict) -> StepCosts:
    """The StepCosts a bench.json `costs` section holds (`mtpbench bench`, kept with a sweep by `sweep --bench`)."""
    return StepCosts(ar_step=costs["ar_step_s"], draft_step=costs["draft_step_s"],
                     verify={int(v["k"]): v["seconds"] for v in costs["verify_s"]}, rollback=costs["rollback_s"],
                     draft_chain={int(d["k"]): d["seconds"] for d in costs.get("draft_chain_s", [])})


def setting_costs(doc: dict, setting: str) -> StepCosts | None:
    """The StepCosts a bench.json or cost_model.json prices `setting` (a runs table's label) with: greedy the
    greedy step's terms, a sampled setting its own drafts and verify (`sampled_terms`: a host row and a sample per
    draft, K+1 host rows and the rule) beside the shared AR step and rollback; None when the document has no
    terms for it (a greedy-path price would flatter a sampled setting). A draft temperature changes neither term."""
    if "costs" not in doc:
        return None
    base = costs_from_bench(doc["costs"])
    if setting == "greedy":
        return base
    label = setting.split(" draft_T=")[0]
    terms = next((t for t in doc.get("sampled_terms", []) if t.get("setting") == label), None)
    if terms is None:
        return None
    return replace(base, draft_chain={int(d["k"]): d["seconds"] for d in terms["drafts_s"]},
                   verify={int(v["k"]): v["seconds"] for v in terms["verify_s"]})


def draft_shares(benches: list[dict]) -> dict[str, float]:
    """Checkpoint fingerprint -> draft-step bytes / trunk bytes, from bench.json roofline sections."""
    return {b["model"]["fingerprint"]: b["roofline"]["draft_step_bytes"] / b["roofline"]["trunk_bytes"]
            for b in benches if b.get("roofline") and b.get("model", {}).get("fingerprint")}


def bandwidth_bound_speedup(tau: float, k: int, draft_share: float) -> float:
    """A projection, not a measurement: the speedup a measured tau (tokens per verify step) gives at depth K where
    decoding is bound by weight bandwidth (Apple silicon, GPUs at batch 1). The cost model with a (K+1)-token
    verify costing one decode step, each draft step its share of the weight bytes (`draft_share` = draft-step
    bytes / trunk bytes) and a free rollback: tau / (1 + K * draft_share)."""
    return tau / (1.0 + k * draft_share)
