"""The statistics: calibrated under a true null, powerful against broken samplers, and the acceptance scan."""

from __future__ import annotations

import numpy as np
import pytest

from mtpbench.model.checkpoint import load
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.decode.controls import CONTROLS
from mtpbench.decode.scan import greedy_k1_walk, scan
from mtpbench.sampling import SamplingConfig, sample
from mtpbench.stats.acceptance import StepCosts, break_even_acceptance, paired_comparison, predicted_speedup
from mtpbench.stats.preservation import (TestResult, calibration_test, exact_target_test, holm, pit_test, score_test,
                                         two_sample_categorical, two_sample_scalar)
from mtpbench.stats.summary import wilson
from mtpbench.sweep.spec import Setting
from mtpbench.orchestrate.verify import DEFAULT_TESTS, VerifyPlan, run_verify

REPS = 200


def _random_dists(rng, n, v=12):
    logits = rng.normal(size=(n, v)) * rng.uniform(0.3, 3.0, size=(n, 1))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _null_draws(rng):
    """One experiment under exact sampling: tokens drawn from their own target rows."""
    p = _random_dists(rng, 300)
    x = np.array([sample(row, rng) for row in p])
    u = p.cumsum(1)[np.arange(300), x] - p[np.arange(300), x] * rng.random(300)
    logs = np.where(p > 0, np.log(p), 0)
    mean = (p * logs).sum(1)
    var = (p * logs ** 2).sum(1) - mean ** 2
    return p, x, u, np.log(p[np.arange(300), x]), mean, var


def test_every_test_is_calibrated_under_a_true_null():
    """200 seeded experiments under the null: each test rejects at 0.05 between 1% and 10% of the time."""
    rng = np.random.default_rng(2024)
    target = {s: float(w) for s, w in enumerate(_random_dists(np.random.default_rng(1), 1, 30)[0])}
    keys, probs = list(target), np.array(list(target.values()))
    rejections = {name: 0 for name in ("exact", "pit", "score", "calibration", "two_cat", "two_scalar")}
    for _ in range(REPS):
        _, _, u, lp, mean, var = _null_draws(rng)
        rejections["pit"] += pit_test(u).p_value < 0.05
        rejections["score"] += score_test(lp, mean, var).p_value < 0.05
        samples = [keys[i] for i in rng.choice(len(keys), size=400, p=probs)]
        rejections["exact"] += exact_target_test(samples, target).p_value < 0.05
        alpha = rng.uniform(0.05, 0.95, size=300)
        rejections["calibration"] += calibration_test(rng.random(300) < alpha, alpha).p_value < 0.05
        other = [keys[i] for i in rng.choice(len(keys), size=400, p=probs)]
        rejections["two_cat"] += two_sample_categorical(samples, other).p_value < 0.05
        rejections["two_scalar"] += two_sample_scalar(rng.normal(size=150), rng.normal(size=150)).p_value < 0.05
    rates = {k: v / REPS for k, v in rejections.items()}
    assert all(0.01 <= r <= 0.10 for r in rates.values()), rates


def test_tests_reject_a_biased_sampler():
    """Sampling from a tempered copy of p (a classic bug) is caught by PIT, score and exact tests."""
    rng = np.random.default_rng(7)
    p = _random_dists(rng, 2000)
    biased = p ** 1.6
    biased /= biased.sum(1, keepdims=True)
    x = np.array([sample(row, rng) for row in biased])
    idx = np.arange(len(x))
    u = p.cumsum(1)[idx, x] - p[idx, x] * rng.random(len(x))
    logs = np.log(p)
    mean = (p * logs).sum(1)
    assert pit_test(u).p_value < 0.05  # KS on PIT is the weakest here: sharpening moves mass symmetrically
    assert score_test(logs[idx, x], mean, (p * logs ** 2).sum(1) - mean ** 2).p_value < 1e-3
    target = {i: float(w) for i, w in enumerate(p[0])}
    samples = [sample(biased[0], rng) for _ in range(2000)]
    assert exact_target_test(samples, target).p_value < 1e-3
    assert exact_target_test(samples + [999], target).p_value == 0.0  # impossible outcome fails outright


def test_score_test_tail_follows_the_skew_of_log_probabilities():
    """Log p terms are left-skewed; the plain normal tail understates their p-values, the skew-corrected one does not.

    Terms 1 - Exp(1) (mean 0, variance 1, third moment -2) sum to n - Gamma(n), whose tail is known exactly.
    """
    from scipy import stats as st

    for n in (30, 100, 300):
        for z in (-2.5, -3.0, -3.5):
            total = z * np.sqrt(n)
            exact = 2 * st.gamma.sf(n - total, n)
            terms, zeros, ones = np.full(n, total / n), np.zeros(n), np.ones(n)
            plain = score_test(terms, zeros, ones).p_value
            corrected = score_test(terms, zeros, ones, np.full(n, -2.0)).p_value
            assert plain < exact  # the plain normal tail is too thin: a true null rejects too often
            assert abs(np.log(corrected / exact)) < 0.5 * abs(np.log(plain / exact)), (n, z, exact, plain, corrected)


def test_holm_and_wilson_and_detectable_deviation():
    rs = [TestResult(f"t{i}", 100, 0.0, p, 0.1, "u") for i, p in enumerate([0.01, 0.04, 0.03, 0.5])]
    adjusted = [r.p_holm for r in holm(rs)]
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(0.18, abs=0.01)
    assert pit_test(np.random.default_rng(0).random(400)).detectable > pit_test(
        np.random.default_rng(0).random(1600)).detectable


def test_cost_model_break_even_and_paired_comparison():
    costs = StepCosts(ar_step=2.0, draft_step=0.7, verify={1: 2.2, 2: 2.6})
    assert predicted_speedup([1.0], costs) == pytest.approx(2 * 2.0 / 2.9)
    be = break_even_acceptance(1, costs)
    assert predicted_speedup([be], costs) == pytest.approx(1.0, abs=1e-6)
    assert break_even_acceptance(2, costs) > be
    a = np.array([10.0, 11, 12, 9, 10, 13, 12, 11])
    cmp = paired_comparison(a, a * 1.2)
    assert cmp.mean_ratio == pytest.approx(1.2) and cmp.ci_low <= 1.2 <= cmp.ci_high


SETTINGS = (Setting(0.6, 0.95, 20), Setting(1.0, 1.0, 0, 0.0, 0.5))


# Every control runs at the headline setting users run; draft-hotter also at the untruncated T=1 one, the only
# setting where it is rejected on this tiny checkpoint (headline: every preservation p > 0.25 at 150 sequences; T=1,
# draft T 0.5: fresh score Holm p 9e-4). The other controls of the first round were rejected at both settings by
# the same tests (argmax-accept, correction-from-draft, bonus-argmax: p < 1e-100 at both; resample-target: score
# 0.004 and 2e-9), and draft-only-transform is the identity at an untruncated T=1 target: the second setting is
# left out for them to keep the suite's time down. The exact rule runs at both.
BOTH_SETTINGS = {"draft-hotter"}


# The exact-target test enumerates K + 1 tokens since issue 31: at top_k 20 and K = 2 that is 2 tokens (300 extra
# decodes per run, ~5 s), at the untruncated setting nothing. The controls' runs leave it out (before issue 31 it did
# not run at these settings either: 20^3 sequences exceeded the cap), the exact rule keeps it; the depth coverage of
# the enumeration has its own test (test_exact_depth.py).
CONTROL_TESTS = tuple(t for t in DEFAULT_TESTS if t != "exact")

# lenient-ratio ((p/q)^0.8) moves acceptance by ~0.01 on this agreeing checkpoint: at the default 150 sequences its
# strongest test, acceptance_given_draft, has p = 0.054 (Holm 0.43); at 400, p = 0.0034 (Holm 0.027); at 800,
# p = 7e-6 (Holm 6e-5). It runs alone, at the headline setting users run, at the sample size it needs.
LENIENT_SAMPLES = 800
# Controls whose every failure is gross (an impossible token: the support test fails outright; bonus-argmax: fresh
# score p = 0) are rejected at 50 sequences (measured, headline setting: every one at Holm p = 0); they run at 50, a
# stronger statement than rejection at the default 150, and a third of the time. The rest run at the default.
GROSS = ("correction-from-draft", "draft-only-transform", "bonus-argmax", "bonus-previous-row", "filters-accept-only",
         "filters-residual-only", "rollback-commit-next", "rollback-keep-gdn", "no-causal-mask")
SAMPLES = {"lenient-ratio": LENIENT_SAMPLES, **{name: 50 for name in GROSS}}


@pytest.fixture(scope="module")
def control_reports(bundle_agree):
    """The exact rule and every control (K=2) at the default sample size; lenient-ratio at the size it needs, the
    gross failures at 50 (`SAMPLES`)."""
    out = {}
    for name in [None, *CONTROLS]:
        settings = SETTINGS if name is None or name in BOTH_SETTINGS else SETTINGS[:1]
        plan = VerifyPlan(ks=(2,), settings=settings, control=CONTROLS.get(name),
                          tests=DEFAULT_TESTS if name is None else CONTROL_TESTS,
                          samples=SAMPLES.get(name, VerifyPlan.samples))
        out[name] = run_verify(bundle_agree, plan)
    return out


def test_exact_rule_is_not_rejected_and_drafts_are_accepted(control_reports):
    rep = control_reports[None]
    assert not rep.rejected and not rep.acceptance_differs
    for g in rep.groups:
        assert 0.3 < g.acceptance < 0.99, "verification needs real acceptance to exercise the accept path"


@pytest.mark.parametrize("name", [n for n, c in CONTROLS.items() if c.kind == "negative"])
def test_every_negative_control_is_rejected(control_reports, name):
    assert control_reports[name].rejected, name


def test_positive_control_preserves_but_accepts_less(control_reports):
    exact, positive = control_reports[None], control_reports["sample-match"]
    assert not positive.rejected
    assert positive.acceptance_differs
    for g_exact, g_pos in zip(exact.groups, positive.groups):
        assert g_pos.acceptance < g_exact.acceptance - 0.2


def test_verify_cli_exit_codes(cli, tiny_agree, tmp_path):
    args = ["verify", "-m", tiny_agree, "--k", "2", "--temp", "0,0.6", "--top-k", "10", "--samples", "60", "-q"]
    ok = cli(*args, "--out", tmp_path / "ev")
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert "pit_ks" in ok.stdout and "exact_target" in ok.stdout and "not rejected" in ok.stdout
    assert list((tmp_path / "ev" / "verdicts").glob("part-verify-*.parquet"))
    assert cli(*args, "--control", "bonus-argmax").exit_code == 1
    assert cli(*args, "--control", "sample-match").exit_code == 0
    listed = cli("verify", "--list-controls").stdout.strip().splitlines()
    assert len(listed) == len(CONTROLS) and all(line.split()[1] in ("negative", "positive") for line in listed)
    bad = cli("verify", "-m", tiny_agree, "--control", "nope")
    assert bad.exit_code == 2 and "unknown control" in bad.stderr


def test_scan_reproduces_decode_time_greedy_depth1_acceptance(tiny_agree, tiny_agree2):
    for path in (tiny_agree, tiny_agree2):
        b = load(path)
        for text in ("def add(a, b):\n    return", "The quick brown fox"):
            ids = b.tokenizer.encode(text)
            ar = generate_ar(b, ids, SamplingConfig(), 120, ignore_eos=True)
            mtp = generate_mtp(b, ids, SamplingConfig(), 1, 120, ignore_eos=True)
            assert mtp.tokens == ar.tokens
            s = scan(b, ids + ar.tokens)
            assert greedy_k1_walk(s.match, len(ids), len(ar.tokens)) == (mtp.accepted_tokens, mtp.verify_steps)
            assert 0 < mtp.accepted_tokens < mtp.verify_steps


# ---- issue 31: derived KS power, the honest headline, one greedy-identity verdict ------------------------------


def test_ks_detectable_is_a_derived_power_simulated_at_that_n():
    """An alternative whose CDF departs from uniform by exactly the reported distance is rejected at least 80% of
    the time at that n (here the PIT values of a sampler that never reaches the top d of the quantiles)."""
    from mtpbench.stats.preservation import ks_detectable

    rng = np.random.default_rng(0)
    for n in (60, 400):
        d = ks_detectable(n)
        rejected = np.mean([pit_test(rng.random(n) * (1 - d)).p_value < 0.05 for _ in range(600)])
        assert rejected >= 0.8 - 2 * np.sqrt(0.16 / 600), (n, d, rejected)
    assert ks_detectable(400) < ks_detectable(60) and np.isnan(ks_detectable(1))


def _null_speedup_runs(seed: int):
    """Synthetic runs where every K has the same true speedup (1.0) and per-run noise: any best K is luck."""
    import pandas as pd

    from tests.synthetic import Spec, build_runs

    runs, _ = build_runs(Spec(settings=("T=0.6 top_p=0.95 top_k=20",), ks=(1, 2, 3, 4), prompts_per_category=4,
                              acceptance=(0.8, 0.7, 0.6, 0.5),
                              repetitions=1, failed_runs=0, seed=seed))
    df = pd.DataFrame(runs)
    noise = np.random.default_rng(seed).normal(0, 0.4, len(df))
    df["decode_tok_s"] = 40.0 * np.exp(np.where(df["mode"] == "mtp", noise, 0.0))
    return df


def test_headline_best_k_is_estimated_on_prompts_that_did_not_choose_it():
    from mtpbench.stats.summary import best_k, honest_best_k, speedup_table

    in_sample, honest = [], []
    for seed in range(30):
        runs = _null_speedup_runs(seed)
        in_sample.append(np.log(best_k(speedup_table(runs))["speedup"].iloc[0]))
        h = honest_best_k(runs)
        assert h["method"].iloc[0].startswith("split") and h["n_prompts"].iloc[0] == 6 and h["n_select"].iloc[0] == 6
        honest.append(np.log(h["speedup"].iloc[0]))
    assert np.mean(in_sample) > 0.06  # the winner's curse: the best of 4 null Ks looks faster than it is
    assert abs(np.mean(honest)) < np.mean(in_sample) / 2  # the split estimate is centred on the truth
    few = honest_best_k(_null_speedup_runs(0).query("prompt_id in ['code-0', 'chat-0']"))
    assert "too few prompts to split" in few["method"].iloc[0]


def test_sweep_greedy_identity_excuses_near_ties_like_verify():
    import pandas as pd

    from mtpbench.stats.sweep_verdicts import _greedy_identity

    mtp = pd.DataFrame({"cell_id": ["c1", "c2"], "run_id": ["m1", "m2"], "output_hash": ["x", "y"]})
    ar = pd.DataFrame({"cell_id": ["c1", "c2"], "run_id": ["a1", "a2"], "output_hash": ["x", "z"]})

    def toks(run, ids, gaps=None):
        return pd.DataFrame({"run_id": run, "index": range(len(ids)), "token_id": ids,
                             "top2_gap": gaps if gaps is not None else [np.nan] * len(ids)})

    near_tie = pd.concat([toks("m1", [1, 2, 3]), toks("a1", [1, 2, 3], [0.5, 0.5, 0.5]),
                          toks("m2", [4, 9, 9]), toks("a2", [4, 5, 6], [0.5, 1e-4, 0.5])])
    res = _greedy_identity(mtp, ar, near_tie)
    assert res.p_value == 1.0 and "1 near-tie divergence(s) excused" in res.note
    wide = near_tie.assign(top2_gap=near_tie["top2_gap"].where(near_tie["run_id"] != "a2", 0.5))
    assert _greedy_identity(mtp, ar, wide).p_value == 0.0
    legacy = _greedy_identity(mtp, ar, near_tie.iloc[:0])  # no token rows: hashes, no excuse, said so
    assert legacy.p_value == 0.0 and "compared by output hash" in legacy.note
