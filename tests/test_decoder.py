"""The reference MTP decoder: greedy identity with AR, sampled counters, exactness, rollback, limits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mtpbench.model.checkpoint import load
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.decode.cache import restore, snapshot, state_arrays
from mtpbench.model.kvcache import KVCacheSpec
from mtpbench.decode.teacher import enumerate_target, top2_gaps
from mtpbench.sampling import SamplingConfig
from mtpbench.stats.preservation import exact_target_test, greedy_identity

PROMPTS = ["def add(a, b):\n    return a", "The quick brown fox"]


def _assert_greedy_identity(b, prompt_text: str, k: int, n: int = 256) -> tuple[int, float]:
    prompt = b.tokenizer.encode(prompt_text)
    g = SamplingConfig()
    ar = generate_ar(b, prompt, g, n, ignore_eos=True)
    mtp = generate_mtp(b, prompt, g, k, n, ignore_eos=True)
    res = greedy_identity(ar.tokens, mtp.tokens, top2_gaps(b, prompt, ar.tokens))
    if not res.equal:
        assert res.near_tie, f"k={k}: MTP diverged from AR at token {res.first_divergence} (gap {res.gap:.2e})"
        print(f"near-tie at {res.first_divergence} (relative gap {res.gap:.1e}): excused and reported")
    assert len(mtp.tokens) == n
    return mtp.accepted_tokens, mtp.mean_acceptance_length


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_mtp_equals_greedy_ar(k, tiny, tiny_agree, tiny_agree2):
    accepted = 0
    for path, prompts in ((tiny_agree, PROMPTS), (tiny_agree2, PROMPTS[:1]), (tiny, PROMPTS[:1])):
        b = load(path)
        for p in prompts:
            accepted += _assert_greedy_identity(b, p, k)[0]
    assert accepted > 0, "no draft was ever accepted: the test would not exercise rollback-free steps"


def test_a_cache_whose_rollback_is_not_exact_is_refused(bundle):
    from mlx_lm.models.cache import RotatingKVCache

    from mtpbench.errors import UserError

    cache = bundle.trunk.make_cache()
    cache[1] = RotatingKVCache(max_size=8)
    with pytest.raises(UserError, match="cannot be rolled back exactly"):
        snapshot(cache)


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0, top_k=5, seed=3),
                                 SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, seed=4)],
                         ids=["T1-topk5", "T0.6-topp0.95-topk20"])
def test_sampled_counters_are_consistent(bundle_agree, cfg):
    prompt = bundle_agree.tokenizer.encode(PROMPTS[0])
    k = 3
    r = generate_mtp(bundle_agree, prompt, cfg, k, 200, ignore_eos=True)
    assert 0 < r.accepted_tokens < r.drafted_tokens, "both accepted and rejected drafts must occur"
    emitted, drafted, recorded = 1, 0, 0  # K drafts per step, capped at the tokens left (drafts that can be emitted)
    for j in r.accepted_per_step:
        drafted += min(k, 200 - emitted)
        recorded += min(j + 1, k, 200 - emitted)
        emitted += min(j + 1, 200 - emitted)
    assert r.drafted_tokens == drafted and r.drafted_at_depth[0] == r.verify_steps
    assert all(a <= d for a, d in zip(r.accepted_at_depth, r.drafted_at_depth))
    assert all(x >= y for x, y in zip(r.accepted_at_depth, r.accepted_at_depth[1:])), "survival must not increase"
    assert sum(r.accepted_per_step) == r.accepted_tokens
    assert len(r.tokens) == 200
    # every token after the first comes from a step: accepted + one residual/bonus per step (last step may be cut)
    assert len(r.tokens) - 1 <= r.accepted_tokens + r.verify_steps
    sources = {t.source for t in r.token_records}
    assert {"accepted", "residual"} <= sources
    assert sum(t.source == "accepted" for t in r.token_records) <= r.accepted_tokens
    assert len(r.steps) == recorded  # one record per draft up to the first rejection, per step


def test_exact_distribution_of_first_tokens(bundle_agree):
    """Enumerated target joint of the first 3 tokens vs MTP samples (K=2, draft temperature differs)."""
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    prompt = bundle_agree.tokenizer.encode("x = ")
    target = enumerate_target(bundle_agree, prompt, cfg, 3)
    samples, accepted, drafted = [], 0, 0
    for seed in range(700):
        r = generate_mtp(bundle_agree, prompt, SamplingConfig(temperature=1.0, top_k=3, seed=seed), 2, 3,
                         draft_temperature=0.8, records=False)
        samples.append(tuple(r.tokens))
        accepted += r.accepted_tokens
        drafted += r.drafted_tokens
    res = exact_target_test(samples, target)
    assert 0 < accepted < drafted
    assert res.p_value > 0.001, res


def test_eos_stops_even_inside_an_accepted_run_and_max_tokens_is_exact(bundle_agree):
    prompt = bundle_agree.tokenizer.encode(PROMPTS[1])
    eos = bundle_agree.eos_ids
    for n in (1, 2, 5, 7, 33):
        r = generate_mtp(bundle_agree, prompt, SamplingConfig(), 4, n, ignore_eos=True)
        assert len(r.tokens) == n
    ended = 0
    for seed in range(60):
        r = generate_mtp(bundle_agree, prompt, SamplingConfig(temperature=1.0, seed=seed), 4, 64)
        assert len(r.tokens) <= 64
        assert all(t not in eos for t in r.tokens[:-1]), "a token was emitted after EOS"
        ended += r.tokens[-1] in eos
    assert ended > 0, "no run reached EOS: the stop path is untested"


@pytest.mark.parametrize("kv_bits", [0, 8, 4], ids=["kv-full", "kv8", "kv4"])
def test_rollback_restores_the_state_of_a_fresh_prefill(tiny_kv, kv_bits):
    """Both rollbacks after a K+1 verify (snapshot + re-forward, per-position capture + commit) == a fresh prefill
    of the committed tokens, for every number of accepted drafts.

    Also with mlx_lm's quantized KV cache: each position is quantized on its own, so trimming is exact there too.
    """
    trunk, kv = load(tiny_kv).trunk, KVCacheSpec(kv_bits)
    prompt, drafts = [3, 17, 42, 8, 99, 5], [11, 23, 7, 64]
    for accepted, capture in ((a, c) for a in range(len(drafts) + 1) for c in (False, True)):
        cache = trunk.make_cache(kv)
        trunk(mx.array([prompt]), cache)
        if capture:  # keep every position's GatedDeltaNet state, commit the accepted one
            trunk.forward_capturing(mx.array([[1] + drafts]), cache)[1].commit(cache, accepted)
        else:  # snapshot, restore, forward the accepted prefix again
            snap = snapshot(cache)
            trunk(mx.array([[1] + drafts]), cache)
            restore(cache, snap)
            trunk(mx.array([[1] + drafts[:accepted]]), cache)
        fresh = trunk.make_cache(kv)
        trunk(mx.array([prompt + [1] + drafts[:accepted]]), fresh)
        got, want = state_arrays(cache), state_arrays(fresh)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)  # fp32, batched vs stepwise


@pytest.mark.parametrize("args, needle", [
    (["--k", "0"], "--k: depth 0 is out of range (1..16)"),
    (["--k", "17"], "--k: depth 17 is out of range (1..16)"),
    (["--k", "2", "--draft-temp", "-0.5"], "draft-temp must be >= 0"),
])
def test_bad_speculative_input(cli, tiny, args, needle):
    res = cli("generate", "-m", tiny, "-p", "x", *args)
    assert res.exit_code != 0 and needle in res.stderr and "Traceback" not in res.stderr


def test_generate_json_reports_speculative_counters(cli, tiny_agree):
    import json

    res = cli("generate", "-m", tiny_agree, "-p", "def f", "--k", "3", "--json", "--max-tokens", "40", "--temp", "0.7")
    out = json.loads(res.stdout)
    assert out["k"] == 3 and len(out["accepted_at_depth"]) == 3 and len(out["drafted_at_depth"]) == 3
    assert out["accepted_tokens"] == sum(out["accepted_per_step"]) == sum(out["accepted_at_depth"])
    # K per step, fewer only on the last steps, where fewer tokens were left than K (those drafts could not be emitted)
    assert 3 * (out["verify_steps"] - 2) < out["drafted_tokens"] <= 3 * out["verify_steps"]
    assert out["drafted_at_depth"][0] == out["verify_steps"]
    fresh = out["rescoring"]  # an exact sampled run, rescored against a fresh target: nothing impossible, no drift
    assert fresh["outside_fresh_support"] == 0 and fresh["max_finite_drift_logprob"] < 1e-4 and fresh["seconds"] > 0


def test_trunk_gives_mlx_lm_logits_on_both_paths(bundle_agree):
    """Prefills run mlx_lm's layers, decode-sized inputs the compiled mirror of them (capturing or not): at every
    step the logits must be mlx_lm's own, bit for bit."""
    import mlx_lm.models.cache as mlx_cache

    from mtpbench.model.compiled import COMPILED_MAX_TOKENS

    trunk, model = bundle_agree.trunk, bundle_agree.trunk.model
    rng = np.random.default_rng(0)
    for prompt_len in (7, COMPILED_MAX_TOKENS + 9):  # compiled prefill, then eager prefill
        theirs, ours = mlx_cache.make_prompt_cache(model), trunk.make_cache()
        for n, capture in [(prompt_len, False), (1, False), (1, True), (3, True), (2, False), (4, True)]:
            ids = mx.array(rng.integers(0, 200, (1, n)))
            want = model(ids, cache=theirs)
            got = trunk.forward_capturing(ids, ours)[0] if capture else trunk(ids, ours)
            assert np.array_equal(np.asarray(got.logits), np.asarray(want)), (prompt_len, n, capture)


def test_rope_variants_run_outside_the_trace_with_the_same_logits(bundle_agree):
    """RoPE classes other than nn.RoPE run outside the compiled trace, as mlx_lm calls them: same logits."""
    from mtpbench.model.compiled import AttentionLayer
    from mtpbench.model.trunk import Trunk

    inside, outside = bundle_agree.trunk, Trunk(bundle_agree.model, bundle_agree.hidden_variant)
    for i, layer in enumerate(outside.body.layers):
        if not layer.is_linear:
            outside._compiled(i).rope_in_trace = False
    assert any(isinstance(f, AttentionLayer) and not f.rope_in_trace for f in outside._layers.values())
    a, b = inside.make_cache(), outside.make_cache()
    for ids in ([[5, 9, 200, 17]], [[3]], [[88, 41]], [[7]]):
        x = mx.array(ids)
        assert np.array_equal(np.asarray(inside(x, a).logits), np.asarray(outside(x, b).logits))


def test_compiled_head_equals_the_head_module(bundle_agree):
    """The decoders' compiled MTP head computes what the MTPHead module computes, bit for bit, on its own cache."""
    head, compiled, trunk = bundle_agree.mtp, bundle_agree.draft_head, bundle_agree.trunk
    rng = np.random.default_rng(1)
    theirs, ours = head.make_cache(), compiled.make_cache()
    for rows in (6, 1, 3, 1, 2):
        hidden = mx.array(rng.standard_normal((1, rows, trunk.lm.args.hidden_size)).astype(np.float32))
        emb = trunk.embed(mx.array(rng.integers(0, 200, (1, rows))))
        want, got = head(hidden, emb, theirs), compiled(hidden, emb, ours)
        assert np.array_equal(np.asarray(got), np.asarray(want)), rows
    assert ours[0].offset == theirs[0].offset == 13
    # A greedy chain (embedding, lm head and argmax folded into the traces) drafts what the module chained drafts.
    hidden, tokens = mx.array(rng.standard_normal((1, 2, trunk.lm.args.hidden_size)).astype(np.float32)), [7, 9]
    got = compiled.greedy_chain(hidden, mx.array([tokens]), ours, 3).tolist()
    z, want = head(hidden, trunk.embed(mx.array([tokens])), theirs)[:, -1:], []
    for i in range(3):
        if i:
            z = head(z, trunk.embed(mx.array([[want[-1]]])), theirs)
        want.append(int(mx.argmax(trunk.lm_head(z)[0, -1])))
    assert got == want and ours[0].offset == theirs[0].offset == 13 + 2 + 2


def test_greedy_rule_specialisation_equals_the_rule_on_point_masses():
    from mtpbench.decode.rule import apply_rule, apply_rule_greedy

    rng, v = np.random.default_rng(0), 6
    for _ in range(500):
        k = int(rng.integers(1, 5))
        drafts, targets = rng.integers(0, 3, k).tolist(), rng.integers(0, 3, k + 1).tolist()
        p, q = np.eye(v)[targets], np.eye(v)[drafts]
        assert apply_rule_greedy(drafts, targets) == apply_rule(p, q, drafts, rng)


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, seed=5)],
                         ids=["greedy", "T0.6"])
def test_rollback_mode_and_greedy_fast_path_change_how_not_what(bundle_agree, cfg):
    """Every implementation choice gives the same tokens, counters and records (PIT draws included)."""
    prompt = bundle_agree.tokenizer.encode(PROMPTS[0])
    runs = [generate_mtp(bundle_agree, prompt, cfg, 3, 96, ignore_eos=True, rollback=rb, greedy_fast_path=fast)
            for rb in ("capture", "reforward") for fast in (True, False)]
    first = runs[0]
    assert 0 < first.accepted_tokens < first.drafted_tokens
    for r in runs[1:]:
        assert (r.tokens, r.accepted_at_depth, r.accepted_per_step) == (first.tokens, first.accepted_at_depth,
                                                                         first.accepted_per_step)
        assert r.steps == first.steps
        np.testing.assert_allclose([tuple(t.__dict__.values())[3:] for t in r.token_records],
                                   [tuple(t.__dict__.values())[3:] for t in first.token_records], atol=1e-12)
        assert [t.source for t in r.token_records] == [t.source for t in first.token_records]


def test_greedy_ar_and_mtp_stop_at_eos(bundle_agree):
    """The pipelined greedy AR loop and the greedy MTP fast path stop on the first EOS, even mid-run."""
    from dataclasses import replace
    from types import SimpleNamespace

    prompt = bundle_agree.tokenizer.encode(PROMPTS[1])
    free = generate_ar(bundle_agree, prompt, SamplingConfig(), 40, ignore_eos=True).tokens
    stop = free[9]
    b = replace(bundle_agree, tokenizer=SimpleNamespace(eos_token_ids=[stop]))  # the decoders read only the EOS ids
    want = free[: free.index(stop) + 1]
    assert generate_ar(b, prompt, SamplingConfig(), 40).tokens == want
    for k in (1, 2, 4):
        assert generate_mtp(b, prompt, SamplingConfig(), k, 40).tokens == want


def test_prefill_step_is_mlx_lm_s_and_chunks_change_nothing(bundle_agree):
    """PREFILL_STEP is mlx_lm's prefill step; a prompt run in small chunks gives the same decode as one chunk."""
    import inspect
    import sys

    import mlx_lm.generate  # noqa: F401  (the module, shadowed on the package by the function)

    from mtpbench.decode import speculative
    from mtpbench.model.trunk import PREFILL_STEP

    gen = sys.modules["mlx_lm.generate"].generate_step
    assert PREFILL_STEP == inspect.signature(gen).parameters["prefill_step_size"].default
    prompt = bundle_agree.tokenizer.encode("def merge(a, b):\n    out = []\n    i = j = 0\n" * 3)
    whole = generate_mtp(bundle_agree, prompt, SamplingConfig(), 2, 16, ignore_eos=True)
    cache, mtp_cache = bundle_agree.trunk.make_cache(), bundle_agree.draft_head.make_cache()
    out, _, _ = speculative.prefill(bundle_agree, prompt, cache, mtp_cache, step=7)
    assert out.logits.shape[1] == 1 and mtp_cache[0].offset == len(prompt) - 1
    assert cache[bundle_agree.trunk.body.fa_idx].offset == len(prompt)
    one, _, _ = speculative.prefill(bundle_agree, prompt, bundle_agree.trunk.make_cache(),
                                    bundle_agree.draft_head.make_cache())
    assert np.allclose(np.asarray(out.logits), np.asarray(one.logits), atol=1e-4)
    assert whole.tokens == generate_ar(bundle_agree, prompt, SamplingConfig(), 16, ignore_eos=True).tokens


def test_head_prompt_pass_is_evaluated_inside_the_prefill_clock(bundle_agree, monkeypatch):
    """The MTP head's pass over the prompt is computed (evaluated) between the prefill clock's two readings, and the
    first decode step feeds the head only the new pair: TTFT pays for the head, the decode does not."""
    import mlx.core as mx

    from mtpbench.decode import speculative

    events: list = []
    clock = speculative.now
    monkeypatch.setattr(speculative, "now", lambda: events.append("clock") or clock())
    head = bundle_agree.draft_head
    real_call, real_eval = type(head).__call__, mx.eval
    monkeypatch.setattr(type(head), "__call__", lambda self, h, e, c: events.append(("head", h.shape[1]))
                        or real_call(self, h, e, c))
    monkeypatch.setattr(mx, "eval", lambda *a: events.append("eval") or real_eval(*a))
    prompt = bundle_agree.tokenizer.encode("def merge(a, b):\n    out = []\n" * 8)
    generate_mtp(bundle_agree, prompt, SamplingConfig(temperature=1.0, seed=3), 2, 8, ignore_eos=True,
                 records=False)
    t0, t1 = [i for i, e in enumerate(events) if e == "clock"][:2]
    inside = events[t0:t1]
    (i_head,) = [i for i, e in enumerate(inside) if e == ("head", len(prompt) - 1)]
    assert "eval" in inside[i_head:], "the head's prompt pass must be evaluated before the clock stops"
    first_step = [e for e in events[t1:] if isinstance(e, tuple)][0]
    assert first_step == ("head", 1), "the first step must only feed the pair the prefill could not know"


def test_long_prompt_peak_memory_holds_no_all_position_logits(tmp_path):
    """At V = 248,320 a 4,000-token prompt's logits at every position would be ~4 GB (float32); the prefill keeps
    the last row only, so the whole decode's peak memory stays far below one such tensor."""
    from mtpbench.builders.tiny import TinySpec, make_tiny

    b = load(make_tiny(tmp_path / "wide", TinySpec(vocab_size=248_320, hidden=32, layers=2, head_dim=16, seed=1)))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 320, size=4000)]
    r = generate_mtp(b, prompt, SamplingConfig(), 2, 4, ignore_eos=True, records=False)
    all_logits = len(prompt) * 248_320 * 4
    assert r.peak_memory_bytes < all_logits / 8, (r.peak_memory_bytes, all_logits)
    a = generate_ar(b, prompt, SamplingConfig(), 4, ignore_eos=True, records=False)
    assert a.peak_memory_bytes < all_logits / 8 and a.tokens == r.tokens
