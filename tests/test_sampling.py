"""The sparse sampling path (`support`, `Support`, the rule on supports, records) equals the dense oracle
(`sampling_probs` and the rule written on dense rows): same supports, same probabilities within float tolerance,
same draws from the same seed."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mtpbench.decode.common import host_supports, token_record
from mtpbench.decode.rule import Rule, apply_rule
from mtpbench.errors import UserError
from mtpbench.sampling import SamplingConfig, Support, alpha, residual, sample, sampling_probs, support

CONFIGS = [
    SamplingConfig(temperature=0.6, top_p=0.95, top_k=20),
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7, top_p=0.9),
    SamplingConfig(temperature=0.8, min_p=0.05),
    SamplingConfig(temperature=1.3, top_p=0.8, top_k=50, min_p=0.02),
    SamplingConfig(temperature=0.5, top_k=3),
    SamplingConfig(temperature=0.9, top_p=0.5, min_p=0.1),
    SamplingConfig(),
]


def _rows(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    """Random float32 logits of varied sharpness; every third row rounded so ties are everywhere."""
    rows = []
    for i in range(n):
        x = (rng.standard_normal(vocab) * rng.uniform(0.3, 6.0)).astype(np.float32)
        rows.append(np.round(x) if i % 3 == 0 else x)
    return rows


def _assert_equal_to_oracle(x: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray, Support]:
    dense, s = sampling_probs(x[None], cfg)[0], support(x, cfg)
    assert np.array_equal(s.ids, np.flatnonzero(dense > 0)), cfg.label()
    assert np.all(np.diff(s.ids) > 0) and s.ids.dtype == np.int64 and s.probs.dtype == np.float64
    np.testing.assert_allclose(s.probs, dense[s.ids], rtol=1e-5, atol=1e-12, err_msg=cfg.label())
    assert math.isclose(s.probs.sum(), 1.0, rel_tol=1e-12)
    return dense, s


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
@pytest.mark.parametrize("vocab", [7, 300, 4000])
def test_support_equals_the_dense_transform(cfg, vocab):
    rng = np.random.default_rng(vocab)
    for x in _rows(rng, 24, vocab):
        _assert_equal_to_oracle(x, cfg)


def test_ties_at_the_top_k_cut_follow_the_profile():
    """mlx keeps exactly k (the lowest ids of a tie, as mlx_lm's argpartition does); temper-first (vLLM, HF) and
    the audit's tie-inclusive support keep every tied id."""
    x = np.array([5, 4, 3, 3, 3, 3, 1, 0, 3, -2], dtype=np.float32)
    cfg = SamplingConfig(temperature=0.7, top_k=3)
    _, s = _assert_equal_to_oracle(x, cfg)
    assert s.ids.tolist() == [0, 1, 2]  # k = 3: of the five ids sharing the 3rd value, the lowest
    inclusive = [0, 1, 2, 3, 4, 5, 8]
    assert support(x, cfg, ties=True).ids.tolist() == inclusive
    assert np.flatnonzero(sampling_probs(x[None], cfg, ties=True)[0]).tolist() == inclusive
    _, s = _assert_equal_to_oracle(x, SamplingConfig(temperature=0.7, top_k=3, order="temper-first"))
    assert s.ids.tolist() == inclusive


@pytest.mark.parametrize("top_k", [0, 20])
def test_top_p_cut_on_either_side_of_the_mass_threshold(top_k):
    p = np.array([0.5, 0.3, 0.15, 0.05])
    x = np.log(p).astype(np.float32)
    mass_of_two = float(np.exp(x[:2].astype(np.float64) - np.logaddexp.reduce(x.astype(np.float64))).sum())
    for top_p, n in ((mass_of_two - 1e-6, 2), (mass_of_two + 1e-6, 3)):
        _, s = _assert_equal_to_oracle(x, SamplingConfig(temperature=0.6, top_p=top_p, top_k=top_k))
        assert len(s.ids) == n
    tied = np.array([2, 1, 1, 1, 1, 0], dtype=np.float32)  # the cut falls inside a tie: every tied id is kept
    _, s = _assert_equal_to_oracle(tied, SamplingConfig(temperature=1.0, top_p=0.5, top_k=top_k))
    assert s.ids.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("scale", [0.2, 2.0, 8.0], ids=["flat-full-sort", "partial-sorts", "peaked"])
def test_top_p_alone_at_every_size_of_the_kept_set(scale):
    rng = np.random.default_rng(1)
    for _ in range(4):
        x = (rng.standard_normal(20000) * scale).astype(np.float32)
        _assert_equal_to_oracle(x, SamplingConfig(temperature=0.6, top_p=0.95))


def test_qwen_vocabulary_rows():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(248_320) * 3).astype(np.float32)
    for cfg in (SamplingConfig(temperature=0.6, top_p=0.95, top_k=20), SamplingConfig(temperature=0.6, top_p=0.95),
                SamplingConfig(temperature=1.0)):
        _assert_equal_to_oracle(x, cfg)


def test_greedy_is_the_lowest_argmax():
    x = np.array([1, 3, 0, 3], dtype=np.float32)
    _, s = _assert_equal_to_oracle(x, SamplingConfig())
    assert s.ids.tolist() == [1] and s.argmax() == 1


def test_host_supports_bring_every_row_once():
    rng = np.random.default_rng(3)
    logits = np.stack(_rows(rng, 4, 500))
    for cfg in (SamplingConfig(temperature=0.6, top_p=0.95, top_k=20), SamplingConfig()):
        got = host_supports(mx.array(logits), cfg)
        assert len(got) == 4
        for row, s in zip(logits, got):
            want = support(row, cfg)
            assert np.array_equal(s.ids, want.ids) and np.array_equal(s.probs, want.probs)


def test_same_draws_as_the_dense_inverse_cdf():
    rng = np.random.default_rng(4)
    for cfg in CONFIGS[:-1]:
        for x in _rows(rng, 6, 3000):
            dense, s = sampling_probs(x[None], cfg)[0], support(x, cfg)
            a, b = np.random.default_rng(7), np.random.default_rng(7)
            assert [sample(s, a) for _ in range(200)] == [sample(dense, b) for _ in range(200)], cfg.label()


def test_alpha_and_residual_on_the_union_of_supports():
    """A draft at another temperature (and so another support) than the target."""
    rng = np.random.default_rng(5)
    target = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20)
    for draft in (SamplingConfig(temperature=1.0, top_p=0.95, top_k=20), SamplingConfig(temperature=1.0),
                  SamplingConfig(temperature=0.3, top_k=5), SamplingConfig()):
        for x in _rows(rng, 8, 800):
            y = x + rng.standard_normal(x.size).astype(np.float32)
            p, q = sampling_probs(x[None], target)[0], sampling_probs(y[None], draft)[0]
            sp, sq = support(x, target), support(y, draft)
            assert math.isclose(alpha(sp, sq), np.minimum(p, q).sum(), rel_tol=1e-5, abs_tol=1e-12)
            diff = np.maximum(p - q, 0.0)
            r = residual(sp, sq)
            if diff.sum() == 0:
                assert r is None
                continue
            assert np.array_equal(r.ids, np.flatnonzero(diff > 0))
            np.testing.assert_allclose(r.probs, (diff / diff.sum())[r.ids], rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(sp.dense(x.size), p, rtol=1e-5, atol=1e-12)


def _dense_rule(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator, rule: Rule):
    """The rule as it was written on dense (K+1, V) rows: the oracle of `apply_rule` on supports."""
    for i, d in enumerate(drafts):
        if rule.accept == "ratio":
            ok = rng.random() * q[i, d] < p[i, d]
        elif rule.accept == "target_argmax":
            ok = d == int(np.argmax(p[i]))
        else:
            y = sample(p[i], rng)
            if d != y:
                return i, y, "residual"
            ok = True
        if not ok:
            if rule.correction == "target":
                dist = p[i]
            elif rule.correction == "draft":
                dist = q[i]
            else:
                dist = np.maximum(p[i] - q[i], 0.0)
                dist = dist / dist.sum() if dist.sum() > 0 else p[i]
            return i, sample(dist, rng), "residual"
    last = p[len(drafts)]
    return len(drafts), int(np.argmax(last)) if rule.bonus == "argmax" else sample(last, rng), "bonus"


@pytest.mark.parametrize("rule", [Rule(), Rule(accept="target_argmax"), Rule(accept="target_sample"),
                                  Rule(correction="target"), Rule(correction="draft"), Rule(bonus="argmax")],
                         ids=lambda r: f"{r.accept}-{r.correction}-{r.bonus}")
def test_the_rule_on_supports_draws_what_the_dense_rule_draws(rule):
    rng = np.random.default_rng(6)
    target, draft = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20), SamplingConfig(temperature=0.9, top_k=8)
    sources = set()
    for trial in range(150):
        k, vocab = int(rng.integers(1, 5)), 200
        base = (rng.standard_normal((k + 1, vocab)) * 2).astype(np.float32)
        x, y = base, base[:k] + (rng.standard_normal((k, vocab)) * 0.5).astype(np.float32)
        sp, sq = [support(r, target) for r in x], [support(r, draft) for r in y]
        draw = np.random.default_rng(trial)
        drafts = [sample(s, draw) for s in sq]
        a, b = np.random.default_rng([trial, 1]), np.random.default_rng([trial, 1])
        got = apply_rule(sp, sq, drafts, a, rule)
        want = _dense_rule(sampling_probs(x, target), sampling_probs(y, draft), drafts, b, rule)
        assert (got.accepted, got.token, got.source) == want
        sources.add(got.source)
    assert sources == {"residual", "bonus"}


def test_token_records_equal_the_dense_formulas():
    rng = np.random.default_rng(8)
    for cfg in CONFIGS:
        for x in _rows(rng, 4, 1000):
            dense, s = sampling_probs(x[None], cfg)[0], support(x, cfg)
            token = sample(s, rng)
            got = token_record(3, token, "bonus", s, np.random.default_rng(9))
            u = np.random.default_rng(9).random()
            mass = dense[dense > 0]
            mean = float(mass @ np.log(mass))
            c = np.log(mass) - mean
            want = (math.log(dense[token]), dense[:token].sum() + u * dense[token], mean, float(mass @ (c * c)),
                    float(mass @ (c * c * c)))
            assert (got.index, got.token_id, got.source) == (3, token, "bonus")
            np.testing.assert_allclose([got.target_logprob, got.pit_u, got.logprob_mean, got.logprob_var,
                                        got.logprob_m3], want, rtol=1e-5, atol=1e-9, err_msg=cfg.label())


def test_a_vocabulary_wider_than_the_tokenizer_decodes_to_placeholders(tmp_path):
    from click.testing import CliRunner

    from mtpbench.builders.tiny import TinySpec, make_tiny
    from mtpbench.cli.main import main
    from mtpbench.decode import generate_ar, generate_mtp
    from mtpbench.model.checkpoint import load

    b = load(make_tiny(tmp_path / "wide", TinySpec(vocab_size=5000, agree=0.9, seed=1)))
    assert b.trunk.lm.args.vocab_size == 5000
    prompt = b.tokenizer.encode("The quick brown fox")
    assert max(prompt) < 320 and b.tokenizer.decode([4999, 300]).startswith("<|pad_4999|>")
    cfg = SamplingConfig(temperature=1.0, seed=1)
    for r in (generate_ar(b, prompt, cfg, 24, ignore_eos=True), generate_mtp(b, prompt, cfg, 3, 24, ignore_eos=True)):
        assert max(r.tokens) >= 320, "random logits over 5000 ids should reach past the tokenizer"
        assert "<|pad_" in b.tokenizer.decode(r.tokens)
    res = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "narrow"), "--vocab-size", "100"])
    assert res.exit_code == 2 and "--vocab-size" in res.output and not (tmp_path / "narrow").exists()


@pytest.mark.parametrize("cfg", [SamplingConfig(0.6, 0.9, 0, order="temper-first"),
                                 SamplingConfig(0.6, 0.95, 20, order="temper-first"),
                                 SamplingConfig(1.7, 1.0, 0, 0.05, order="temper-first")])
def test_temper_first_profile_filters_the_tempered_distribution(cfg):
    """The `temper-first` profile (vLLM, SGLang, HF) against its own definition, written out here: softmax of
    logits / T, then top-p / min-p / top-k on those probabilities; and it differs from `mlx` where top-p cuts."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        x = rng.normal(size=400) * 3
        p = np.exp(x / cfg.temperature - np.max(x / cfg.temperature))
        p /= p.sum()
        keep = np.ones(len(p), dtype=bool)
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        keep[order[above >= cfg.top_p]] = False
        keep &= p >= cfg.min_p * p.max()
        if cfg.top_k:
            keep &= p >= np.sort(p)[-cfg.top_k]
        want = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        assert np.allclose(sampling_probs(x[None], cfg)[0], want, atol=1e-9)
        assert np.allclose(support(x, cfg).dense(len(x)), want, atol=1e-6)
    x = rng.normal(size=400) * 3
    mlx = support(x, SamplingConfig(0.6, 0.9))
    assert len(support(x, SamplingConfig(0.6, 0.9, order="temper-first")).ids) < len(mlx.ids)


def test_an_unknown_profile_is_refused():
    with pytest.raises(UserError):
        SamplingConfig(0.6, order="vllm-v0")


def test_largest_values_equal_a_full_partition_with_ties_and_masked_logits():
    """`_largest` (a strided sample bounds the n-th largest from below) returns exactly the n largest values, as a
    partition of the whole row does, on rows wide enough to take the sample and on narrow ones."""
    from mtpbench.sampling import _largest

    rng = np.random.default_rng(5)
    for trial in range(120):
        v = int(rng.choice([7, 300, 20_000, 248_320]))
        x = (rng.standard_normal(v) * rng.uniform(0.1, 5)).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x, 1)  # many ties, at the cut too
        if trial % 4 == 0:
            x[rng.integers(0, v, v // 3)] = -np.inf  # masked ids
        n = int(rng.integers(1, min(v, 2_000) + 1))
        want = np.sort(np.partition(x, v - n)[v - n:]) if n < v else np.sort(x)
        assert np.array_equal(np.sort(_largest(x, n)), want), (v, n)
