"""The fresh-target tests (issue 21): calibrated under a simulated exact speculative sampler, powerful against the
rule errors each one targets, and, on a tiny checkpoint, rescoring that sees a state bug the decoder's rows hide."""

from __future__ import annotations

import numpy as np
import pytest

from mtpbench.decode.rule import EXACT, Rule, apply_rule, conditional_law
from mtpbench.stats.preservation import (acceptance_given_draft_test, calibration_test, conditional_pit_tests,
                                         pit_test, sampled_family, score_test, support_test)

REPS = 200
V = 12


def _rows(rng, n):
    logits = rng.normal(size=(n, V)) * rng.uniform(0.5, 2.5, size=(n, 1))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), logits


def _pit(row, tok, w):
    return float(row[:tok].sum() + w * row[tok])


def _moments(row):
    s = row[row > 0]
    logs = np.log(s)
    mean = float(s @ logs)
    c = logs - mean
    return mean, float(s @ (c * c)), float(s @ (c * c * c))


def _simulate(rng, rule: Rule = EXACT, steps: int = 150, k: int = 2, fresh_noise: float = 1e-9):
    """One experiment: `steps` speculative steps on random target rows p (K+1, V) and draft rows q close to them.

    Returns the tokens table's columns (own and fresh rows; the fresh row is p with float noise, as a fresh
    forward gives) and the steps' (accepted, alpha, p_draft, q_draft)."""
    cols = {c: [] for c in ("source", "target_logprob", "pit_u", "logprob_mean", "logprob_var", "logprob_m3",
                            "cond_pit_u", "fresh_logprob", "fresh_pit_u", "in_fresh_support", "fresh_logprob_mean",
                            "fresh_logprob_var", "fresh_logprob_m3", "drift_logprob", "drift_tv")}
    accepted, alpha, p_draft, q_draft = [], [], [], []
    for _ in range(steps):
        p, logits = _rows(rng, k + 1)
        ql = logits[:k] + rng.normal(scale=0.8, size=(k, V))
        q = np.exp(ql - ql.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        drafts = [int(rng.choice(V, p=q[i])) for i in range(k)]
        verdict = apply_rule(p, q, drafts, rng, rule)
        j = verdict.accepted
        for i in range(min(j + 1, k)):
            accepted.append(i < j)
            alpha.append(float(np.minimum(p[i], q[i]).sum()))
            p_draft.append(float(p[i, drafts[i]]))
            q_draft.append(float(q[i, drafts[i]]))
        new = drafts[:j] + [verdict.token]
        for i, (tok, src) in enumerate(zip(new, ["accepted"] * j + [verdict.source])):
            row = p[i]
            fresh = row * (1 + fresh_noise * rng.normal(size=V))
            fresh /= fresh.sum()
            law = conditional_law(rule, row, q[i] if i < k else None, drafts[i] if i < k else -1, src).dense(V)
            w = rng.random()
            mean, var, m3 = _moments(row)
            fmean, fvar, fm3 = _moments(fresh)
            lp = np.log(row[tok]) if row[tok] > 0 else -np.inf
            flp = np.log(fresh[tok]) if fresh[tok] > 0 else -np.inf
            for c, v in zip(cols, (src, lp, _pit(row, tok, w), mean, var, m3, _pit(law, tok, w), flp,
                                   _pit(fresh, tok, rng.random()), fresh[tok] > 0, fmean, fvar, fm3,
                                   abs(lp - flp), 0.5 * np.abs(row - fresh).sum())):
                cols[c].append(v)
    return cols, accepted, alpha, p_draft, q_draft


def test_fresh_target_and_rule_tests_are_calibrated_under_a_simulated_exact_sampler():
    """Under the exact rule, every test of the sampled family rejects at 0.05 between 1% and 10% of the time; the
    support test never does (an exact sampler emits no impossible token: its false-rejection rate is 0)."""
    rng = np.random.default_rng(21)
    names = ("fresh_pit_ks", "fresh_logprob_score", "pit_accepted", "pit_residual", "pit_bonus", "acceptance_excess",
             "acceptance_given_draft", "acceptance_calibration")
    rejections = dict.fromkeys(names, 0)
    support_rejections = 0
    for _ in range(REPS):
        cols, acc, alpha, pd_, qd = _simulate(rng)
        results = {r.test: r for r in sampled_family(cols, acc, alpha, p_draft=pd_, q_draft=qd)}
        for name in names:
            rejections[name] += results[name].p_value < 0.05
        support_rejections += results["support"].p_value < 0.05
    rates = {k: v / REPS for k, v in rejections.items()}
    assert all(0.01 <= r <= 0.10 for r in rates.values()), rates
    assert support_rejections == 0


@pytest.mark.parametrize("rule, test", [
    (Rule(correction="draft"), "pit_residual"),
    (Rule(uniform="shared"), "pit_residual"),
    (Rule(bonus="previous"), "pit_bonus"),
    (Rule(accept="ratio_power"), "acceptance_given_draft"),
    (Rule(accept="target_argmax"), "pit_accepted"),
])
def test_each_rule_error_is_caught_by_the_test_of_its_part(rule, test):
    """The conditional PIT of the part a mistake lives in (or acceptance given the draft) rejects it, in a sample
    of about the size one verify group gets (some hundreds of accepted drafts)."""
    cols, acc, alpha, pd_, qd = _simulate(np.random.default_rng(5), rule, steps=1500)
    results = {r.test: r for r in sampled_family(cols, acc, alpha, p_draft=pd_, q_draft=qd)}
    assert results[test].p_value < 1e-3, (test, results[test])


def test_positive_control_passes_its_own_conditional_laws_and_acceptance_bounds():
    """An unbiased rule with other conditional laws (sample-match) is tested against its own laws; it accepts
    less, which the one-sided preservation tests must not call bias."""
    cols, acc, alpha, pd_, qd = _simulate(np.random.default_rng(6), Rule(accept="target_sample"), steps=700)
    results = {r.test: r for r in sampled_family(cols, acc, alpha, p_draft=pd_, q_draft=qd)}
    for name in ("pit_accepted", "pit_residual", "pit_bonus", "acceptance_excess", "acceptance_given_draft"):
        assert results[name].p_value > 1e-3, (name, results[name])
    assert results["acceptance_calibration"].p_value < 1e-6  # below sum(alpha): the efficiency diagnostic


def test_support_and_acceptance_tests_fail_outright_where_they_must():
    assert support_test([-1.0, -np.inf, -2.0]).p_value == 0.0
    assert support_test([-1.0, -2.0], [True, False]).p_value == 0.0
    assert support_test([-1.0, -2.0], [True, True]).p_value == 1.0
    assert acceptance_given_draft_test([True, False], [0.0, 0.1], [0.5, 0.5]).p_value == 0.0
    # one-sided: accepting less than min(1, p/q) is not bias
    assert acceptance_given_draft_test([False] * 200, [0.2] * 200, [0.4] * 200).p_value > 0.5
    assert calibration_test([True] * 200, [0.5] * 200, "greater").p_value < 1e-6
    assert calibration_test([True] * 200, [0.5] * 200, "less").p_value > 0.5


def test_family_without_fresh_columns_keeps_the_decoder_row_tests_deciding():
    cols, acc, alpha, _, _ = _simulate(np.random.default_rng(8), steps=60)
    own = {k: v for k, v in cols.items() if not k.startswith(("fresh", "in_fresh", "drift"))}
    families = {r.test: r.family for r in sampled_family(own, acc, alpha)}
    assert families["pit_ks"] == families["logprob_score"] == "preservation"
    assert "fresh_pit_ks" not in families and "drift" not in families
    fresh = {r.test: r.family for r in sampled_family(cols, acc, alpha)}
    assert fresh["pit_ks"] == fresh["logprob_score"] == fresh["drift"] == "diagnostic"
    assert fresh["fresh_pit_ks"] == fresh["support"] == "preservation"
    assert pit_test([0.5] * 10, "fresh_pit_ks").test == "fresh_pit_ks"
    assert score_test([-1.0], [-1.0], [1.0], name="fresh_logprob_score").test == "fresh_logprob_score"
    assert {r.test for r in conditional_pit_tests([0.1, 0.2], ["accepted", "bonus"])} == {
        "pit_accepted", "pit_residual", "pit_bonus"}


CFG_KW = dict(temperature=0.6, top_p=0.95, top_k=20)


def _rescored(bundle, rule, seeds=range(4), k=3, tokens=40):
    from mtpbench.decode import generate_mtp
    from mtpbench.decode.rescore import rescore
    from mtpbench.sampling import SamplingConfig

    prompt = bundle.tokenizer.encode("def add(a, b):\n    return")
    out, own = [], []
    for s in seeds:
        cfg = SamplingConfig(seed=s, **CFG_KW)
        r = generate_mtp(bundle, prompt, cfg, k, tokens, rule=rule, ignore_eos=True,
                         rollback=("capture", "reforward")[s % 2])
        out += rescore(bundle, prompt, r, cfg).records
        own += [t.target_logprob for t in r.token_records]
    return out, own


def test_rescoring_an_exact_run_finds_no_violation_and_no_drift(bundle_agree):
    recs, own = _rescored(bundle_agree, EXACT)
    assert np.all(np.isfinite(own))
    assert recs and all(r.in_fresh_support for r in recs)
    assert max(r.drift_logprob for r in recs) < 1e-4
    assert float(np.mean([r.drift_tv for r in recs])) < 1e-4


@pytest.mark.parametrize("bug", ["keep_gdn", "commit_next"])
def test_rescoring_sees_a_state_bug_the_decoder_rows_hide(bundle_agree, bug):
    """The decoder's own rows are wrong together with its samples (every token inside its own row's support);
    the fresh rows are not: large drift, and tokens the fresh filtered target cannot emit."""
    recs, own = _rescored(bundle_agree, Rule(rollback=bug))
    assert np.all(np.isfinite(own))
    violations = sum(not r.in_fresh_support for r in recs)
    mean_tv = float(np.mean([r.drift_tv for r in recs]))
    assert mean_tv > 0.01 and violations > 0, (violations, mean_tv)


def _control_sweep(tmp_path, model, monkeypatch, rule: Rule | None):
    """A small sampled sweep (K=2, T=0.6/top_p=0.95/top_k=20) through the CLI, with `rule` patched into the
    reference backend's decoder (sweeps have no --control: this is how a shipped state bug would reach one)."""
    import functools
    import json

    from click.testing import CliRunner

    import mtpbench.backends.reference as reference
    from mtpbench.cli.main import main
    from mtpbench.decode import generate_mtp
    from mtpbench.sweep.store import read_table

    if rule is not None:
        monkeypatch.setattr(reference, "generate_mtp", functools.partial(generate_mtp, rule=rule))
    tmp_path.mkdir(parents=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": f"def f{i}(x):\n    return"})
                               + "\n" for i in range(3)))
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["sweep", "-m", str(model), "--k", "2", "--temp", "0.6", "--top-p", "0.95",
                                    "--top-k", "20", "--prompts", str(prompts), "--repeats", "3", "--max-tokens",
                                    "40", "--ignore-eos", "--out", str(out), "--no-report", "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return read_table(out, "verdicts"), read_table(out, "runs")


def test_sweep_cell_verdicts_reject_a_state_bug_and_pass_the_exact_decoder(tmp_path, tiny_agree, monkeypatch):
    exact, runs = _control_sweep(tmp_path / "exact", tiny_agree, monkeypatch, None)
    assert (runs.loc[runs["mode"] == "mtp", "rescore_s"] > 0).all()
    assert runs.loc[runs["mode"] == "ar", "rescore_s"].isna().all()
    decides = exact[exact["family"] == "preservation"]
    assert {"support", "fresh_pit_ks", "fresh_logprob_score"} <= set(decides["test"])
    assert not decides["rejected"].any()
    buggy, _ = _control_sweep(tmp_path / "bug", tiny_agree, monkeypatch, Rule(rollback="keep_gdn"))
    rejected = buggy[buggy["rejected"] & (buggy["family"] == "preservation")]
    assert "support" in set(rejected["test"])
    own = buggy.set_index("test")
    assert not own.loc["pit_ks", "rejected"]  # the decoder's own rows see nothing wrong


def _acc_runs(temperature, prompts, reps, per_prompt_rate, steps=50, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(prompts):
        first = int(rng.binomial(steps, per_prompt_rate[i]))
        for r in range(reps):
            acc = first if temperature == 0 else int(rng.binomial(steps, per_prompt_rate[i]))  # greedy: copies
            rows.append({"status": "ok", "mode": "mtp", "k": 1, "temperature": temperature, "setting": "s",
                         "prompt_id": f"p{i}", "prompt_digest": f"d{i}", "output_hash": f"h{i}-{acc}",
                         "verify_steps": steps, "accepted_at_depth": [acc]})
    return pd.DataFrame(rows)


def test_acceptance_intervals_resample_prompts_and_count_greedy_repetitions_once():
    from mtpbench.stats.summary import acceptance_by_depth, wilson

    # prompts that differ a lot: steps of one prompt are not independent draws of one rate
    rates = np.linspace(0.2, 0.9, 8)
    acc = acceptance_by_depth(_acc_runs(0.6, 8, 4, rates), by=["setting"]).iloc[0]
    lo, hi = wilson(acc["accepted"], acc["reached"])
    assert acc["prompt_clusters"] == 8
    assert acc["acceptance_hi"] - acc["acceptance_lo"] > 2 * (hi - lo)  # wider than the binomial interval
    assert acc["acceptance_lo"] <= acc["acceptance"] <= acc["acceptance_hi"]
    greedy = acceptance_by_depth(_acc_runs(0.0, 8, 5, rates), by=["setting"]).iloc[0]
    assert greedy["repeats_dropped"] == 8 * 4 and greedy["verify_steps"] == 8 * 50


def test_verify_says_when_drafts_are_too_rarely_accepted_to_see_rule_errors(cli, tiny):
    """The random tiny head almost never drafts what the trunk wants: 'not rejected' must not stand bare."""
    res = cli("verify", "-m", tiny, "--k", "1", "--temp", "0.6", "--samples", "20", "--tokens", "8", "-q")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "could not see rule errors" in res.stdout and "rescoring against the fresh target" in res.stdout


def test_rescoring_from_a_shared_prompt_prefix_equals_a_whole_fresh_forward(bundle_agree):
    """The cell's runs continue from one fresh prefix of the prompt: the same fresh rows as a forward over the whole
    prompt + output, for every run, however often the prefix is reused (no run writes into another's)."""
    from mtpbench.decode import generate_mtp
    from mtpbench.decode.rescore import fresh_logits, fresh_prefix
    from mtpbench.sampling import SamplingConfig

    prompt = bundle_agree.tokenizer.encode("def add(a, b):\n    return a + b\n\nclass Point:\n")
    prefix = fresh_prefix(bundle_agree, prompt)
    assert prefix is not None and len(prefix.ids) == len(prompt) - 1
    for k, seed in ((1, 1), (2, 2), (3, 3), (2, 4)):
        r = generate_mtp(bundle_agree, prompt, SamplingConfig(0.6, 0.95, 20, 0.0, seed), k, 40, records=True,
                         ignore_eos=True)
        ids = prompt + list(r.tokens)[:-1]
        whole = fresh_logits(bundle_agree, ids, len(prompt) - 1)
        shared = fresh_logits(bundle_agree, ids, len(prompt) - 1, prefix=prefix)
        np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        fresh_logits(bundle_agree, [t + 1 for t in prompt], len(prompt) - 1, prefix=prefix)


# ---- the independent oracle (issue 31) -------------------------------------------------------------------------


@pytest.mark.parametrize("params", [dict(temperature=0.6, top_p=0.95, top_k=20), dict(temperature=1.0),
                                    dict(temperature=0.8, min_p=0.05), dict(temperature=0.5, top_k=3),
                                    dict(temperature=1.3, top_p=0.8, top_k=50, min_p=0.02)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_oracle_equals_mlx_lm_sampler_functions_and_the_one_transform(params):
    """mtpbench/oracle.py against mlx_lm's own filters (apply_top_p, apply_min_p, apply_top_k, then logprobs / temp)
    and against `sampling.support`, on random rows with ties everywhere (every third row rounded)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    from mtpbench.sampling import SamplingConfig, support
    from mtpbench.oracle import TOLERANCE, mlx_lm_probs, total_variation

    rng = np.random.default_rng(31)
    cfg = SamplingConfig(**params)
    for i in range(30):
        x = (rng.standard_normal(400) * rng.uniform(0.5, 5)).astype(np.float32)
        x = np.round(x) if i % 3 == 0 else x
        oracle = mlx_lm_probs(x, cfg.temperature, cfg.top_p, cfg.min_p, cfg.top_k)
        lp = mx.array(x)[None] - mx.logsumexp(mx.array(x)[None], axis=-1, keepdims=True)
        if 0 < cfg.top_p < 1:
            lp = apply_top_p(lp, cfg.top_p)
        if cfg.min_p:
            lp = apply_min_p(lp, cfg.min_p)
        if cfg.top_k:
            lp = apply_top_k(lp, cfg.top_k)
        theirs = np.asarray(mx.softmax(lp * (1 / cfg.temperature), axis=-1)[0]).astype(np.float64)
        assert np.array_equal(theirs > 0, oracle > 0), (i, np.flatnonzero(theirs > 0), np.flatnonzero(oracle > 0))
        np.testing.assert_allclose(theirs, oracle, atol=1e-5)
        s = support(x, cfg)
        assert total_variation(s.ids, s.probs, oracle) < TOLERANCE


def test_rescoring_checks_rows_against_the_oracle_and_reports_a_broken_transform_as_an_instrument_fault(
        bundle_agree, monkeypatch):
    """A bug in the one transform (here: it tempers at 1.1 T) moves the decoder and the fresh target together, so
    no preservation test can see it; the oracle does, and the family says it is the instrument's."""
    import mtpbench.decode.common as common
    import mtpbench.decode.rescore as rescore_mod
    from mtpbench.sampling import SamplingConfig, support

    recs, _ = _rescored(bundle_agree, EXACT)
    assert recs and all(np.isfinite(r.oracle_tv) and r.oracle_tv < 1e-4 for r in recs)

    def tempers_hotter(logits, cfg, ties=None):
        return support(logits, SamplingConfig(cfg.temperature * 1.1, cfg.top_p, cfg.top_k, cfg.min_p, cfg.seed,
                                              cfg.order), ties)

    monkeypatch.setattr(common, "support", tempers_hotter)
    monkeypatch.setattr(rescore_mod, "support", tempers_hotter)
    broken, _ = _rescored(bundle_agree, EXACT)
    tv = [r.oracle_tv for r in broken]
    assert sum(t > 1e-4 for t in tv) > len(tv) / 2
    cols = {"source": ["bonus"] * len(broken), **{c: [getattr(r, c) for r in broken] for c in (
        "fresh_logprob", "fresh_pit_u", "in_fresh_support", "fresh_logprob_mean", "fresh_logprob_var",
        "fresh_logprob_m3", "drift_logprob", "drift_tv", "oracle_tv")}}
    family = sampled_family(cols, [], [], tests=("support", "pit", "score"))
    (fault,) = [r for r in family if r.test == "oracle"]
    assert fault.family == "instrument" and fault.statistic > 0 and "INSTRUMENT FAULT" in fault.note
    assert not any(r.rejected() for r in family if r.family == "preservation")  # the decoder is not blamed


def test_rescoring_support_is_tie_inclusive_while_the_profile_keeps_exactly_k(monkeypatch):
    """A server that breaks a tie at the k-th logit differently from mlx is inside the support (never rejected),
    and its token is scored under the tie-inclusive row."""
    from mtpbench.sampling import SamplingConfig, support

    x = np.array([5, 4, 3, 3, 3, 1, 0], dtype=np.float32)
    cfg = SamplingConfig(0.7, top_k=3)
    assert support(x, cfg).ids.tolist() == [0, 1, 2] and support(x, cfg, ties=True).ids.tolist() == [0, 1, 2, 3, 4]

    class _Stub:  # the parts of a Bundle rescore_tokens touches, with fixed logits
        pass

    import mtpbench.decode.rescore as rescore_mod

    monkeypatch.setattr(rescore_mod, "fresh_logits", lambda *a, **k: np.stack([x, x]))
    out = rescore_mod.rescore_tokens(_Stub(), [1, 2], [4, 3], cfg).records
    assert all(r.in_fresh_support and np.isfinite(r.fresh_logprob) for r in out)
    assert 0 <= out[0].fresh_pit_u <= 1
