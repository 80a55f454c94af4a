"""The one acceptance rule of speculative sampling, and its deliberately broken, labelled variants.

`Rule()` is the exact rule (Leviathan et al. 2023; Chen et al. 2023): accept draft d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit a token from normalize(max(0, p_i - q_i)); if all K
drafts are accepted emit a bonus token from p_{K+1}. At temperature 0, p and q are point masses and the same rule
reduces to "accept while the draft equals the target argmax", so greedy needs no second code path.

The other field values exist only as verification controls (see `controls.py`): each is one switch away from the
exact rule, so a control tests exactly one mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..sampling import Support, as_support, residual, sample

MAX_K = 16  # the deepest draft chain the reference decoder takes (K drafts per step)


@dataclass(frozen=True)
class Rule:
    accept: str = "ratio"  # ratio (exact) | target_argmax | target_sample
    correction: str = "residual"  # residual (exact) | target | draft
    bonus: str = "sample"  # sample (exact) | argmax
    target_transform: str = "same"  # same (exact) | raw: the target ignores the sampling transform


EXACT = Rule()


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of drafts accepted, 0..K
    token: int  # the token emitted after them (residual or bonus)
    source: str  # residual | bonus


Row = Union[Support, np.ndarray]


def apply_rule(p: Sequence[Row], q: Sequence[Row], drafts: list[int], rng: np.random.Generator,
               rule: Rule = EXACT) -> Verdict:
    """Accept drafts left to right. p: K+1 target rows, q: K draft rows (each a `Support` or a dense row),
    drafts: K ids. Every distribution is a support, so a step touches only the ids with probability."""
    for i, d in enumerate(drafts):
        pi, qi = as_support(p[i]), as_support(q[i])
        if rule.accept == "ratio":
            ok = rng.random() * qi.prob(d) < pi.prob(d)  # u < p/q without dividing; q[d] > 0 since d was drawn from q
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
                dist = residual(pi, qi) or pi
            return Verdict(i, sample(dist, rng), "residual")
    last = as_support(p[len(drafts)])
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
