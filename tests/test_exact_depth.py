"""The exact-target test enumerates K + 1 tokens where top-k makes it feasible, so every draft depth is tested:
a bug confined to depth 3 (a test-only rule variant) is rejected, while the former 3-token enumeration, which
never reaches depth 3, cannot see it."""

from __future__ import annotations

import numpy as np
import pytest

import mtpbench.decode.speculative as speculative
import mtpbench.orchestrate.verify as verify
from mtpbench.decode.rule import apply_rule
from mtpbench.sampling import Support, as_support
from mtpbench.sweep.spec import Setting
from mtpbench.orchestrate.verify import VerifyPlan, exact_coverage, exact_tokens, run_verify, total_ticks

SETTING = Setting(0.6, 0.95, 4, 0.0, None)


@pytest.fixture(scope="module")
def demo():
    """The embedded demo checkpoint: its target is peaked enough that 300 sequences fill the enumerated cells (the
    tiny random checkpoints spread them over ~900 sequences, and pooling leaves the test no power)."""
    from mtpbench.defaults import default_model
    from mtpbench.model.checkpoint import load

    return load(default_model(), require_mtp=True)


def depth3_flat(p, q, drafts, rng, rule, *rest):
    """Run the depth-3 test (acceptance and residual) against a flattened target row, uniform over the target's
    own support, instead of the real one: emitted tokens stay inside the target's support, so only the distribution
    at depth 3 is wrong. (The former bug, accepting the depth-3 draft whenever p(d) > 0, moves too little mass on
    the rebuilt demo, whose head agrees closely with its trunk: p = 0.36 at 300 sequences, reached [433, 310, 221]
    times at depths 1-3; this one gives p = 3e-6 at the same seeds.)"""
    if len(drafts) >= 3:
        row = as_support(p[2])
        p = [*p[:2], Support(row.ids, np.full(len(row.ids), 1 / len(row.ids))), *p[3:]]
    return apply_rule(p, q, drafts, rng, rule, *rest)


def _exact(bundle, k: int):
    plan = VerifyPlan(ks=(k,), settings=(SETTING,), tests=("exact",), samples=150)
    ticks: list[int] = []
    (group,) = run_verify(bundle, plan, lambda: ticks.append(1)).groups
    assert group.reached == 0 and len(ticks) == total_ticks(plan) == 1  # `--tests exact` decodes no long sequences
    (res,) = [r for r in group.results if r.test == "exact_target"]
    return res


def test_coverage_label_says_which_depths():
    assert exact_tokens(4, 4) == 5 and exact_tokens(4, 3) == 4 and exact_tokens(10, 4) == 3
    assert exact_tokens(2048, 2) == 0
    assert "depths 1-4 of K=4 tested (every depth)" in exact_coverage(5, 4, 4)
    assert "depths 3-4 NOT tested" in exact_coverage(3, 4, 10) and "--top-k <= 4" in exact_coverage(3, 4, 10)
    assert exact_coverage(0, 2, 2048).startswith("not run")


def test_a_depth3_only_bug_is_rejected_by_the_deep_enumeration(demo, monkeypatch):
    exact = _exact(demo, 3)
    assert not exact.rejected() and "depths 1-3 of K=3 tested (every depth)" in exact.note, exact
    monkeypatch.setattr(speculative, "apply_rule", depth3_flat)
    deep = _exact(demo, 3)
    assert deep.rejected() and "(every depth)" in deep.note, deep
    monkeypatch.setattr(verify, "MAX_EXACT_SUPPORT", 4 ** 3)  # the former 3-token enumeration
    shallow = _exact(demo, 3)
    assert "depths 3-3 NOT tested" in shallow.note and not shallow.rejected(), shallow
