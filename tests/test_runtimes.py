"""Auditing the runtimes people run (issue 30): llama.cpp's sampler profile, speculative servers that name only some
token ids, server counters under llama.cpp's names, the server's own clock, an EOS counted but not shown, and the
efficiency of a runtime's acceptance rule.

The servers are tests/audit_server.py's loopback emulation of llama-server (its fields and endpoints as data from
llama.cpp's sources, cited there): the demo through the reference decoder, sampling with the `llama.cpp` profile.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mtpbench.backends.audit import EOS_ADDED, FROM_IDS, FROM_NATIVE, UNAUDITED, names_every_token, server_tokens
from mtpbench.decode.rescore import HIDDEN, impute
from mtpbench.backends.clock import clock_fields, median_rate, server_timings
from mtpbench.sweep.endpoint import Endpoint, endpoints_from_options
from mtpbench.backends.http import Answer
from mtpbench.backends.llamacpp import native_answer
from mtpbench.backends.metrics import counter_fields, parse_spec_counters
from mtpbench.backends.profiles import detect_profile, reported_samplers
from mtpbench.decode.common import pit
from mtpbench.defaults import DEMO_MODEL
from mtpbench.errors import UserError
from mtpbench.model.checkpoint import load
from mtpbench.report import backends
from mtpbench.report.load import load as load_results
from mtpbench.sampling import LLAMA_CPP, SamplingConfig, Support, chain_name, profile_of, sampling_probs, support
from mtpbench.orchestrate.sweep import run_sweep
from mtpbench.sweep.spec import SweepSpec
from mtpbench.sweep.store import read_manifest, read_table

from .audit_server import LLAMA_SAMPLERS, AuditServer, Served

SIZE = {"prompt_limit": 4, "repeats": 1}
LLAMA = Served(profile=LLAMA_CPP, llamacpp=True, partial_ids=True)  # speculative llama-server (draft-mtp)


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_MODEL)


def sweep(demo, served: Served, out: Path, top_p: float = 0.95, profile: str = "auto", **size):
    server = AuditServer(demo, served)
    try:
        endpoint = Endpoint(address=server.url, name="llama", audit_model=str(DEMO_MODEL), audit_profile=profile,
                            timeout_s=30)
        spec = SweepSpec.of(prompts="stdlib", k=2, temperature=0.6, top_p=top_p, top_k=20, warmup_tokens=0,
                            endpoints=(endpoint,), **{**SIZE, **size})
        assert run_sweep(spec, out).failed_runs == []
    finally:
        server.stop()
    return load_results([out])


def preservation(v: pd.DataFrame) -> pd.DataFrame:
    return v[(v["family"] == "preservation") & ~v["test"].isin(["audit", "drift"])].set_index("test")


# ---- the llama.cpp profile ---------------------------------------------------------------------------------------

def llama_sampling(logits: np.ndarray, temp: float, top_p: float, top_k: int, min_p: float) -> np.ndarray:
    """A literal transcription of llama.cpp's chain at default penalties/dry/xtc/typ_p (src/llama-sampling.cpp):
    llama_sampler_top_k_impl sorts and keeps k; llama_sampler_top_p_apply softmaxes the candidates left and keeps
    up to and including the one whose cumulative probability reaches p; llama_sampler_min_p_apply keeps logits >=
    max + log(min_p); llama_sampler_temp_impl divides the logits; dist softmaxes. Ties are broken by id here, where
    the reference keeps them; the test rows have none."""
    cand = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if top_k > 0:
        cand = cand[:top_k]
    if top_p < 1:
        x = np.array([logits[i] for i in cand], dtype=np.float64)
        p = np.exp(x - x.max())
        p /= p.sum()
        cum, last = 0.0, len(cand)
        for i, pi in enumerate(p):
            cum += pi
            if cum >= top_p:
                last = i + 1
                break
        cand = cand[:last]
    if min_p > 0:
        top = max(logits[i] for i in cand)
        cand = [i for i in cand if logits[i] >= top + np.log(min_p)]
    out = np.zeros(len(logits))
    x = np.array([logits[i] for i in cand], dtype=np.float64) / temp
    out[cand] = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    return out


def vllm_sampling(logits: np.ndarray, temp: float, top_p: float, top_k: int, min_p: float) -> np.ndarray:
    """A literal transcription of vLLM v1's sampler (v1/sample/sampler.py, ops/topk_topp_sampler.py):
    apply_temperature divides the logits; apply_min_p masks probabilities below min_p x the largest;
    apply_top_k_top_p sorts ascending, masks logits below the k-th largest, softmaxes what is left and masks the
    entries whose ascending cumulative sum is <= 1 - top_p (the largest always kept); then softmax."""
    x = np.asarray(logits, dtype=np.float64) / temp
    if min_p > 0:
        p = np.exp(x - x.max())
        x = np.where(p / p.max() < min_p, -np.inf, x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    if top_k > 0:
        xs = np.where(xs < xs[len(xs) - top_k], -np.inf, xs)
    if top_p < 1:
        ps = np.exp(xs - xs.max())
        ps /= ps.sum()
        mask = np.cumsum(ps) <= 1 - top_p
        mask[-1] = False
        xs = np.where(mask, -np.inf, xs)
    out = np.zeros(len(x))
    out[order] = np.exp(xs - xs.max()) / np.exp(xs - xs.max()).sum()
    return out


SETTINGS = [(0.95, 20, 0.0), (0.8, 20, 0.0), (0.8, 0, 0.0), (0.9, 40, 0.05), (1.0, 5, 0.1)]


@pytest.mark.parametrize("profile,written_out,other", [(LLAMA_CPP, llama_sampling, "mlx"),
                                                       ("vllm", vllm_sampling, "temper-first")])
@pytest.mark.parametrize("top_p,top_k,min_p", SETTINGS)
def test_a_renormalising_profile_is_its_runtimes_sampler(profile, written_out, other, top_p, top_k, min_p):
    """llama.cpp and vLLM renormalise top-p over what top-k left; mlx and SGLang (temper-first) read the whole
    row: a server audited under the other profile at top_k 20 would be scored against the wrong distribution."""
    rng = np.random.default_rng(7)
    cfg = SamplingConfig(0.6, top_p, top_k, min_p, order=profile)
    differs = 0
    for _ in range(30):
        logits = rng.normal(size=200) * 3
        want = written_out(logits, 0.6, top_p, top_k, min_p)
        assert np.allclose(sampling_probs(logits, cfg), want, atol=1e-9)
        assert np.allclose(support(logits.astype(np.float32), cfg).dense(200), want, atol=1e-5)
        differs += not np.allclose(sampling_probs(logits, replace(cfg, order=other)), want)
    if top_k == 20 and top_p < 1:
        assert differs > 0
    if not top_k and not min_p:  # without top_k (and min_p) the orders agree
        assert differs == 0


def test_profiles_are_data_with_sources_and_a_reported_order_is_a_profile():
    for name in ("mlx", "temper-first", "llama.cpp", "vllm", "hf"):
        assert profile_of(name).source and set(profile_of(name).steps) == {"top_k", "top_p", "min_p", "temperature"}
    assert dict(profile_of(LLAMA_CPP).defaults)["min_p"] == 0.05 and dict(profile_of(LLAMA_CPP).defaults)["top_k"] == 40
    assert chain_name(LLAMA_SAMPLERS) == LLAMA_CPP
    reordered = chain_name(["penalties", "temperature", "top_k", "top_p", "min_p"])
    assert reordered == "llama.cpp[temperature>top_k>top_p>min_p]" and profile_of(reordered).renormalised
    with pytest.raises(UserError, match="sampling profile"):
        SamplingConfig(0.6, order="llama.cpp[bogus]")
    props = {"default_generation_settings": {"params": {"samplers": ["top_k", "temperature"]}}}
    assert reported_samplers(props) == ["top_k", "temperature"]
    assert detect_profile("auto", None, props=props)[0] == "llama.cpp[top_k>temperature]"
    assert detect_profile("auto", [{"id": "m", "owned_by": "llamacpp"}])[0] == LLAMA_CPP
    assert detect_profile("auto", None, headers={"server": "llama.cpp"})[0] == LLAMA_CPP
    assert detect_profile("auto", [{"id": "m", "owned_by": "vllm"}])[0] == "vllm"
    assert detect_profile("auto", [{"id": "m", "owned_by": "sglang"}])[0] == "temper-first"
    assert detect_profile("auto", [{"id": "m", "owned_by": ""}])[0] == "mlx"


def test_audit_profiles_take_comma_lists():
    eps = endpoints_from_options(["a=http://127.0.0.1:9/v1", "b=http://127.0.0.1:8/v1"], audit_model=str(DEMO_MODEL),
                                 audit_profiles=["llama.cpp,temper-first"])
    assert [e.audit_profile for e in eps] == ["llama.cpp", "temper-first"]
    with pytest.raises(UserError, match="sampling profile"):
        endpoints_from_options(["http://127.0.0.1:9/v1"], audit_model=str(DEMO_MODEL), audit_profiles=["tgi"])


# ---- a speculative llama-server, end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [0.95, 0.8])
def test_speculative_llamacpp_server_is_audited_under_auto(demo, tmp_path, top_p):
    """The stream names ids only for tokens not taken from a draft; the /completion replay names them all. Under
    `auto` (/props), every run is audited with llama.cpp's profile and passes; counters, clock and the runtime table
    come from the server."""
    # seed 1: under seed 0 the exact emulated server draws fresh PIT p 0.008 at top_p 0.8 (a null's chance draw:
    # seeds 1-3 give 0.89, 0.82, 0.29), which Holm over three tests rejects
    data = sweep(demo, LLAMA, tmp_path / "res", top_p=top_p, seed=1)
    runs = data.runs
    audited = runs["audit"].str.startswith(FROM_NATIVE)
    assert audited.mean() >= 0.9, runs["audit"].tolist()
    assert set(runs["audit_profile"]) == {LLAMA_CPP}
    assert "/props" in read_manifest(tmp_path / "res")["endpoints"]["llama"]["audit"]["profile_source"]
    p = preservation(data.verdicts)
    assert len(p) == 3 and not p["rejected"].any(), p[["n", "p_value"]]
    assert runs["accepted_at_depth"].map(len).eq(2).all() and runs["verify_steps"].gt(0).all()  # llamacpp: names
    assert set(runs["decode_clock"]) == {"server"} and runs["server_decode_tok_s"].gt(0).all()
    assert runs["client_decode_tok_s"].gt(0).all()
    rt = backends.runtimes(runs, data.verdicts).iloc[0]
    assert rt["profile"] == LLAMA_CPP and rt["exactness"] == "passes 3 tests" and rt["clock"].startswith("server")
    assert rt["efficiency_flag"] == "" and rt["efficiency_lo"] < 1 < rt["efficiency_hi"] + 0.1
    assert len(rt["acceptance"]) == 2


def test_llamacpp_server_under_the_wrong_profile_is_rejected_and_named(demo, tmp_path):
    data = sweep(demo, LLAMA, tmp_path / "res", top_p=0.8, profile="mlx")
    assert preservation(data.verdicts)["rejected"].any()
    note = data.verdicts.loc[data.verdicts["test"] == "audit", "note"].iloc[0]
    assert "sampling profile mlx (under a profile the server does not use" in note


def test_a_reordered_llamacpp_chain_is_read_from_props(demo, tmp_path):
    order = ("penalties", "temperature", "top_k", "top_p", "min_p")
    chain = "llama.cpp[temperature>top_k>top_p>min_p]"
    data = sweep(demo, Served(profile=chain, llamacpp=True, samplers=order), tmp_path / "res", prompt_limit=2)
    assert set(data.runs["audit_profile"]) == {chain}
    assert not preservation(data.verdicts)["rejected"].any()


@pytest.mark.parametrize("served,flag", [
    (Served(profile=LLAMA_CPP, llamacpp=True, bug="sample-match"), backends.INEFFICIENT),
    (Served(profile=LLAMA_CPP, llamacpp=True, counters="inflated"), backends.IMPOSSIBLE),
])
def test_rule_efficiency_flags(demo, tmp_path, served, flag):
    """Keeping a draft only while it equals the target's own sample is exact but accepts ~sum p q (measured 0.41 of
    alpha on the demo); counters claiming every draft accepted exceed alpha, which no exact rule can."""
    data = sweep(demo, served, tmp_path / "res")
    rt = backends.runtimes(data.runs, data.verdicts).iloc[0]
    assert rt["efficiency_flag"] == flag, rt.to_dict()
    assert rt["exactness"] == "passes 3 tests"  # both are exact samplers: the flag is about speed, not exactness
    table = backends.runtime_table(backends.runtimes(data.runs, data.verdicts))
    assert flag in " ".join(table.rows[0])


# ---- parsing -----------------------------------------------------------------------------------------------------

def test_llamacpp_metric_names_parse():
    text = ("# TYPE llamacpp:spec_decode_num_drafts_total counter\nllamacpp:spec_decode_num_drafts_total 10\n"
            "# TYPE llamacpp:spec_decode_num_draft_tokens_total counter\nllamacpp:spec_decode_num_draft_tokens_total 20\n"
            "# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter\n"
            "llamacpp:spec_decode_num_accepted_tokens_total 13\n"
            "# TYPE llamacpp:spec_decode_num_accepted_tokens_per_pos_total counter\n"
            'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 8\n'
            'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 5\n'
            "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 99\n")
    c = parse_spec_counters(text)
    assert (c.drafts, c.draft_tokens, c.accepted, c.per_pos) == (10, 20, 13, (8, 5))
    row = counter_fields(c)
    assert row["accepted_at_depth"] == [8, 5] and row["drafted_at_depth"] == [10, 10]
    assert parse_spec_counters("# TYPE sglang:spec_verify_calls_total counter\n"
                               "sglang:spec_verify_calls_total 7\n").drafts == 7


def test_native_completion_answer_and_partial_ids_say_why():
    a = native_answer({"tokens": [5, 6, 7], "tokens_predicted": 4, "tokens_evaluated": 9, "stop_type": "eos",
                       "completion_probabilities": [{"id": 5, "logprob": -0.1}, {"id": 6, "logprob": -0.2},
                                                    {"id": 7, "logprob": -0.3}],
                       "timings": {"predicted_n": 4, "predicted_ms": 40.0}}, 128)
    assert a.token_ids == (5, 6, 7) and a.completion_tokens == 4 and a.finish_reason == "stop"
    assert a.token_logprobs == (-0.1, -0.2, -0.3) and a.server_clock == (4, 0.04) and a.prompt_tokens == 9
    assert native_answer({"content": "x"}, 8).error  # no return_tokens: no ids, never guessed
    partial = server_tokens(Answer(completion_tokens=128, finish_reason="length", token_ids=(5,)), None)
    assert partial.ids is None and partial.how.startswith(UNAUDITED) and "speculative" in partial.how
    assert "1 token ids but reported 128" in partial.how
    # llama.cpp folds a partial UTF-8 token into the next entry: one id short, so the replay is asked for
    folded = Answer(completion_tokens=3, finish_reason="length", token_ids=(1, 2))
    assert not names_every_token(folded) and names_every_token(replace(folded, token_ids=(1, 2, 3)))
    assert names_every_token(Answer(completion_tokens=3, finish_reason="stop", token_ids=(1, 2)))  # EOS unshown


def test_clocks():
    steady = np.arange(100) * 0.01
    assert median_rate(steady) == pytest.approx(100.0)
    behind = np.concatenate([steady[:70], np.full(30, 0.7 + 1e-4) + np.arange(30) * 1e-6])  # a backlog in a burst
    fields = clock_fields(behind, 99 / (behind[-1] - behind[0]), None)
    assert fields["client_decode_tok_s"] == pytest.approx(100.0) and fields["decode_clock"] == "client"
    assert fields["client_burst"] and not clock_fields(steady, 100.0, None)["client_burst"]
    burst = clock_fields(np.concatenate([steady[:10], np.full(90, 0.1) + np.arange(90) * 1e-6]), 1e3, None)
    assert burst["client_burst"]
    assert clock_fields(steady, 100.0, (100, 2.0))["decode_clock"] == "server"
    assert server_timings({"timings": {"predicted_n": 10, "predicted_ms": 100}}) == (10, 0.1)
    assert server_timings({"timings": {"predicted_n": 10, "predicted_ms": float("nan")}}) is None


# ---- an EOS counted but not shown --------------------------------------------------------------------------------

def simulated_pits(eos: frozenset[int], runs: int = 400, seed: int = 3) -> np.ndarray:
    """An exact sampler over 10 ids whose EOS ids 0 and 1 (2.5% each: mean length ~20) end a run, as a server shows
    it: every token but the EOS, which it counts (finish 'stop'); the audit's ids (`server_tokens` with the EOS ids
    `eos`, a hidden one imputed as the rescoring imputes it) scored by randomized PIT."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(runs):
        rows, tokens = [], []
        for _ in range(200):
            rest = rng.dirichlet(np.ones(8)) * 0.95
            p = Support(np.arange(10), np.concatenate([[0.025, 0.025], rest]))
            rows.append(p)
            tokens.append(int(rng.choice(10, p=p.probs)))
            if tokens[-1] in (0, 1):
                break
        stop = tokens[-1] in (0, 1)
        shown = tokens[:-1] if stop else tokens
        answer = Answer(completion_tokens=len(tokens), finish_reason="stop" if stop else "length",
                        token_ids=tuple(shown))
        got = server_tokens(answer, None, eos)
        assert got.how.startswith(FROM_IDS)
        ids = [impute(p, eos, rng) if t == HIDDEN else t for p, t in zip(rows, got.ids)]
        out += [pit(p, t, rng.random()) for p, t in zip(rows, ids)]
    return np.asarray(out)


def test_an_eos_counted_but_not_shown_is_scored():
    """Left out, the hidden EOS leaves a hole in the PIT sample; with several EOS ids it is imputed from the target
    over them (its law given that it is an EOS), which keeps the sample exact."""
    holed = stats.kstest(simulated_pits(frozenset()), "uniform").pvalue
    imputed = stats.kstest(simulated_pits(frozenset({0, 1})), "uniform").pvalue
    assert holed < 1e-6 < 0.01 < imputed, (holed, imputed)
    one = server_tokens(Answer(completion_tokens=3, finish_reason="stop", token_ids=(4, 5)), None, frozenset({0}))
    assert one.ids == [4, 5, 0] and one.how.endswith(EOS_ADDED)
    two = server_tokens(Answer(completion_tokens=3, finish_reason="stop", token_ids=(4, 5)), None,
                        frozenset({0, 2}))
    assert two.ids == [4, 5, HIDDEN] and "2 EOS ids" in two.how


# ---- the runtime table in the report and the card -----------------------------------------------------------------

def test_runtime_table_in_report_and_card(demo, tmp_path):
    """The reference decoder and a speculative llama-server in one sweep: one runtime table with both, each with its
    clock, survival by depth, rule efficiency (the reference's own rule: ~1), exactness and profile."""
    from mtpbench.report import render_card, render_report

    server = AuditServer(demo, LLAMA)
    out = tmp_path / "res"
    try:
        endpoint = Endpoint(address=server.url, name="llama", audit_model=str(DEMO_MODEL), timeout_s=30)
        spec = SweepSpec.of(model=str(DEMO_MODEL), prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20,
                            warmup_tokens=0, endpoints=(endpoint,), prompt_limit=2, repeats=1)
        assert run_sweep(spec, out).failed_runs == []
    finally:
        server.stop()
    data = load_results([out])
    rt = backends.runtimes(data.runs, data.verdicts, data.steps).set_index(["runtime", "mode"])
    ref = rt.loc[("reference", "mtp")]
    assert ref["profile"] == "mlx" and ref["clock"] == "reference decoder's own clock"
    assert ref["efficiency_lo"] < 1 < ref["efficiency_hi"] and ref["efficiency_flag"] == ""
    srv = rt.loc[("llama", "mtp")]
    assert srv["profile"] == LLAMA_CPP and srv["clock"].startswith("server") and len(srv["acceptance"]) == 2
    md = render_card(out)
    assert "**Runtimes**" in md and "Rule efficiency [95% CI]" in md and "server (timings)" in md
    html = render_report([out], tmp_path / "report.html").read_text()
    assert 'id="runtimes"' in html and "Rule efficiency" in html and "llama.cpp" in html
