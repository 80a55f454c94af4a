"""The one acceptance rule of speculative sampling, and its deliberately broken, labelled variants.

`Rule()` is the exact rule (Leviathan et al. 2023; Chen et al. 2023): accept draft d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit a token from normalize(max(0, p_i - q_i)); if all K
drafts are accepted emit a bonus token from p_{K+1}. At temperature 0, p and q are point masses and the same rule
reduces to "accept while the draft equals the target argmax"; `apply_rule_greedy` is that reduction on ids alone (the
greedy decoder reads K + (K+1) integers a step, not one-hot rows), held equal to `apply_rule` by a test.

The other field values exist only as verification controls (see `controls.py`): each is one switch away from the
exact rule, so a control tests exactly one mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..sampling import Support, as_support, quantile, residual, sample


@dataclass(frozen=True)
class Rule:
    accept: str = "ratio"  # ratio (exact) | target_argmax | target_sample | ratio_power (min(1, (p/q)^0.8))
    correction: str = "residual"  # residual (exact) | target | draft
    bonus: str = "sample"  # sample (exact) | argmax | previous (drawn from the row of the last draft, p_K)
    target_transform: str = "same"  # same (exact) | raw: the target ignores the sampling transform
    uniform: str = "fresh"  # fresh (exact) | shared: the acceptance uniform is reused to draw the residual
    # The decoder's side of a control (read by speculative.py, not by `apply_rule`):
    filters: str = "both"  # both (exact) | accept_only: residual from unfiltered rows | residual_only: the reverse
    ratio_temperature: str = "same"  # same (exact) | one: the acceptance test's p and q at T=1, sampling at T
    draft_temperature_scale: float = 1.0  # != 1: drafts drawn at T * scale while q (the rule's) stays at T
    rollback: str = "exact"  # exact | commit_next: commit position j+1 | keep_gdn: GatedDeltaNet state not rolled back
    causal_mask: bool = True  # False: the verify forward attends to later draft positions too


EXACT = Rule()


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of drafts accepted, 0..K
    token: int  # the token emitted after them (residual or bonus)
    source: str  # residual | bonus


Row = Union[Support, np.ndarray]


def apply_rule(p: Sequence[Row], q: Sequence[Row], drafts: list[int], rng: np.random.Generator, rule: Rule = EXACT,
               accept_rows: tuple[Sequence[Row], Sequence[Row]] | None = None,
               residual_rows: tuple[Sequence[Row], Sequence[Row]] | None = None) -> Verdict:
    """Accept drafts left to right. p: K+1 target rows, q: K draft rows (each a `Support` or a dense row),
    drafts: K ids. Every distribution is a support, so a step touches only the ids with probability.

    `accept_rows`, `residual_rows` (the filter controls only): other (p, q) rows the acceptance test or the
    residual is built from; the bonus always comes from `p`."""
    bonus_p = p
    if accept_rows is not None:
        p, q = accept_rows
    for i, d in enumerate(drafts):
        pi, qi = as_support(p[i]), as_support(q[i])
        u = float("nan")
        if rule.accept == "ratio":
            u = rng.random()
            ok = u * qi.prob(d) < pi.prob(d)  # u < p/q without dividing; q[d] > 0 since d was drawn from q
        elif rule.accept == "ratio_power":
            u = rng.random()
            ok = u < min(1.0, (pi.prob(d) / qi.prob(d)) ** 0.8)
        elif rule.accept == "target_argmax":
            ok = d == pi.argmax()
        else:  # target_sample: draw y ~ p_i; accept if d == y, else emit y itself (unbiased, accepts less)
            y = sample(pi, rng)
            if d != y:
                return Verdict(i, y, "residual")
            ok = True
        if not ok:
            if rule.correction == "target":
                dist = pi
            elif rule.correction == "draft":
                dist = qi
            else:  # p == q exactly leaves no residual: rejection has probability 0 but guard float noise
                rp, rq = (as_support(residual_rows[0][i]), as_support(residual_rows[1][i])) \
                    if residual_rows is not None else (pi, qi)
                dist = residual(rp, rq) or rp
            if rule.uniform == "shared" and u == u:
                return Verdict(i, quantile(dist, u), "residual")
            return Verdict(i, sample(dist, rng), "residual")
    last = as_support(bonus_p[len(drafts) - 1 if rule.bonus == "previous" else len(drafts)])
    token = last.argmax() if rule.bonus == "argmax" else sample(last, rng)
    return Verdict(len(drafts), token, "bonus")


def apply_rule_greedy(drafts: list[int], targets: list[int]) -> Verdict:
    """`apply_rule(EXACT)` on point masses, from ids alone: p_i = onehot(targets[i]), q_i = onehot(drafts[i]).

    The ratio test accepts exactly when the draft equals the target's argmax; at the first mismatch the residual
    max(0, p - q) is p itself; after K matches the bonus is the target's argmax. Taking ids, not (K+1, V) rows,
    lets the greedy decoder read K + (K+1) integers per step instead of one-hot rows of vocabulary size; a test
    holds it equal to `apply_rule` on the one-hot rows.
    """
    for i, (d, t) in enumerate(zip(drafts, targets)):
        if d != t:
            return Verdict(i, t, "residual")
    return Verdict(len(drafts), targets[len(drafts)], "bonus")


def conditional_law(rule: Rule, p: Row, q: Row | None, draft: int, source: str) -> Support:
    """The law an emitted token follows given its source, under the rule the decoder claims to run.

    Exact rule: an accepted draft ~ min(p, q) / alpha, a residual ~ normalize(max(0, p - q)), a bonus ~ p (here p,
    q are the rows of the token's position). The positive control `target_sample` is unbiased with other laws: an
    accepted draft ~ p q / sum(p q), a residual ~ p restricted to tokens other than the draft. Negative controls
    claim the exact rule's laws, so they are tested against those. PIT values under these laws are uniform when
    the rule is run as claimed; each law catches an error in its own part of the rule.
    """
    p = as_support(p)
    if source in ("bonus", "ar") or q is None:
        return p
    q = as_support(q)
    if source != "accepted":
        if rule.accept == "target_sample":
            keep = p.ids != draft
            ids, law = p.ids[keep], p.probs[keep]
        else:
            return residual(p, q) or p
    else:
        ids, i, j = np.intersect1d(p.ids, q.ids, assume_unique=True, return_indices=True)
        law = p.probs[i] * q.probs[j] if rule.accept == "target_sample" else np.minimum(p.probs[i], q.probs[j])
    total = law.sum()
    return Support(ids, law / total) if total > 0 else p
