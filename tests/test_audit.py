"""Audit of a server: a loopback OpenAI-compatible server (tests/audit_server.py) serves the demo through the
reference decoder with labelled runtime bugs; the audit (`sweep --endpoint URL --audit-model CHECKPOINT`) must
reject each bug and pass the exact MTP server and a plain AR one, at the headline setting T=0.6/top_p=0.95/top_k=20.

Sample size: the sweep's default is 15 prompts x 128 tokens x 2 repetitions, where every bug is rejected (p-values
in the branch's report); the tests run each bug at the smallest size that still has power for it (see BUGS), to
keep the suite's time down, and the passing servers at the smallest size used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtpbench.sweep.endpoint import Endpoint
from mtpbench.backends.audit import FROM_IDS, FROM_TEXT, REPEAT, UNAUDITED, server_tokens
from mtpbench.backends.profiles import detect_profile
from mtpbench.backends.http import Answer, chunk_logprobs
from mtpbench.defaults import DEMO_MODEL
from mtpbench.model.checkpoint import load
from mtpbench.sweep.axes import read_sweep_file
from mtpbench.orchestrate.sweep import run_sweep
from mtpbench.errors import UserError
from mtpbench.sweep.spec import SweepSpec, spec_from_values
from mtpbench.sweep.store import read_manifest, read_table

from .audit_server import AuditServer, Served

SIZE = {"prompt_limit": 4, "repeats": 1}  # 4 stdlib prompts x 128 tokens (the prompts set their own length)
DEFAULT_SIZE = {"prompt_limit": 0, "repeats": 2}  # the sweep's default: 15 prompts x 128 tokens x 2 repetitions
BUGS = {  # the runtime bugs, each a labelled decoder control, and the size each test runs at
    "rollback-commit-next": SIZE,  # a rollback that keeps a rejected draft's state (impossible tokens)
    "draft-only-transform": SIZE,  # target at default settings (raw softmax) while the draft is filtered
    # draft drawn at T x 1.3 while q is computed at T: score z -7.8 at the default size (Holm p 5e-14); not
    # rejected at SIZE (Holm 0.13), barely at 8 prompts (Holm 0.016): all 15 prompts once (z ~ -5.5 expected)
    "draft-hotter": {"prompt_limit": 0, "repeats": 1},
    # temperature fixed at 1 in the acceptance ratio: the weakest, score z -3.6 (Holm p 0.0014) at the default
    # size, not rejected at SIZE (score p 0.79) or 8 prompts x 1 repetition: only the default size has power
    "ratio-at-t1": DEFAULT_SIZE,
}


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_MODEL)


def audit(demo, served: Served, out: Path, **size) -> pd.DataFrame:
    """One audited server sweep at the headline setting; returns its verdict rows for the server's cell."""
    server = AuditServer(demo, served)
    try:
        endpoint = Endpoint(address=server.url, name="srv", mode=served.mode, audit_model=str(DEMO_MODEL),
                            timeout_s=30)
        spec = SweepSpec.of(prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20, warmup_tokens=0,
                            endpoints=(endpoint,), **{**SIZE, **size})
        outcome = run_sweep(spec, out)
    finally:
        server.stop()
    assert outcome.failed_runs == []
    return read_table(out, "verdicts")


def preservation(v: pd.DataFrame) -> pd.DataFrame:
    return v[v["family"] == "preservation"].set_index("test")


@pytest.fixture(scope="module")
def exact(demo, tmp_path_factory) -> pd.DataFrame:
    return audit(demo, Served(), tmp_path_factory.mktemp("exact") / "res")


def test_exact_mtp_server_passes_the_audit(exact):
    p = preservation(exact)
    assert set(p.index) == {"support", "fresh_pit_ks", "fresh_logprob_score"}
    assert not p["rejected"].any(), p[["n", "p_value", "p_holm"]]
    assert (p["n"] >= 450).all()
    note = exact.loc[exact["test"] == "audit", "note"].iloc[0]
    assert "4 of 4 runs audited" in note and FROM_IDS in note and "sampling profile mlx" in note
    assert "same weights as" in note and "asserted by the user" in note


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_runtime_bug_is_rejected(demo, tmp_path, bug):
    p = preservation(audit(demo, Served(bug=bug), tmp_path / "res", **BUGS[bug]))
    assert p["rejected"].any(), (bug, p[["n", "statistic", "p_value", "p_holm", "note"]].to_dict("index"))


def test_plain_ar_server_passes_the_audit(demo, tmp_path):
    v = audit(demo, Served(mode="ar"), tmp_path / "res")
    p = preservation(v)
    assert len(p) == 3 and not p["rejected"].any(), p[["n", "p_value", "p_holm"]]


def test_mtp_server_is_compared_with_an_audited_ar_endpoint(demo, tmp_path):
    """Two endpoints in one sweep (an exact MTP server and a plain AR one): the MTP cell gets a two-sample test
    against the AR endpoint's runs, in its preservation family, and passes."""
    mtp, ar = AuditServer(demo, Served()), AuditServer(demo, Served(mode="ar"))
    out = tmp_path / "res"
    try:
        endpoints = tuple(Endpoint(address=s.url, name=n, mode=n, audit_model=str(DEMO_MODEL), timeout_s=30)
                          for s, n in ((mtp, "mtp"), (ar, "ar")))
        spec = SweepSpec.of(prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20, warmup_tokens=0,
                            endpoints=endpoints, prompt_limit=2, repeats=1)
        assert run_sweep(spec, out).failed_runs == []
    finally:
        mtp.stop()
        ar.stop()
    v = read_table(out, "verdicts")
    two = v[(v["backend"] == "mtp") & v["test"].str.startswith("two_sample")].set_index("test")
    assert set(two.index) == {"two_sample_mean_logprob"}  # no first-token test: same seed, same first token
    assert (two["family"] == "preservation").all() and two["note"].str.contains("vs ar AR").all()
    assert not v.loc[v["backend"] == "mtp", "rejected"].any()
    assert not v.loc[v["backend"] == "ar", "test"].str.startswith("two_sample").any()


def test_mtp_server_is_compared_with_the_reference_ar(demo, tmp_path):
    """A sweep of the checkpoint and its server together: with no audited AR endpoint, the server's MTP cell is
    compared with the reference decoder's AR runs (same setting, same prompts; the mlx profile is the reference's)."""
    server = AuditServer(demo, Served())
    out = tmp_path / "res"
    try:
        endpoint = Endpoint(address=server.url, name="srv", audit_model=str(DEMO_MODEL), timeout_s=30)
        spec = SweepSpec.of(model=str(DEMO_MODEL), prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20,
                            warmup_tokens=0, endpoints=(endpoint,), prompt_limit=2, repeats=1)
        assert run_sweep(spec, out).failed_runs == []
    finally:
        server.stop()
    v = read_table(out, "verdicts")
    two = v[(v["backend"] == "srv") & v["test"].str.startswith("two_sample")]
    assert len(two) == 1 and two["note"].str.contains("vs reference AR \\(2 runs\\)").all()
    assert set(v["backend"]) == {"srv", "reference"}  # the server's cell beside the reference's


def test_the_audit_records_profile_model_and_assumption(demo, exact, tmp_path):
    server = AuditServer(demo, Served(owned_by="sglang", bug="draft-hotter"))
    out = tmp_path / "res"
    try:
        endpoint = Endpoint(address=server.url, name="srv", audit_model=str(DEMO_MODEL), timeout_s=30,
                            concurrency=(1, 2))
        spec = SweepSpec.of(prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20, warmup_tokens=0,
                            endpoints=(endpoint,), prompt_limit=1, repeats=1)
        run_sweep(spec, out)
    finally:
        server.stop()
    entry = read_manifest(out)["endpoints"]["srv"]
    assert entry["audit"]["profile"] == "temper-first" and "owned_by 'sglang'" in entry["audit"]["profile_source"]
    assert "same weights" in entry["audit"]["assumption"]
    runs, tokens = read_table(out, "runs"), read_table(out, "tokens")
    # one audited run per cell: the other requests repeat it with the same seed (a seeded server repeats its sample)
    assert set(runs["audit_profile"]) == {"temper-first"} and sorted(runs["audit"]) == sorted([FROM_IDS, REPEAT, REPEAT])
    assert set(tokens["source"]) == {"server"} and set(tokens["run_id"]) == {runs["run_id"].iloc[0]}
    assert len(tokens) == runs["generated_tokens"].iloc[0]
    assert tokens["pit_u"].isna().all()  # a server has no own rows: nothing pretends it does


def test_a_profile_mismatch_is_visible_and_named(demo, tmp_path):
    """The test server samples in mlx's order; audited as temper-first (vLLM's order) its tokens fall outside the
    assumed support, and the verdict names the profile it assumed, so the rejection reads as the mismatch it is."""
    server = AuditServer(demo, Served())
    try:
        endpoint = Endpoint(address=server.url, name="srv", audit_model=str(DEMO_MODEL), audit_profile="temper-first",
                            timeout_s=30)
        spec = SweepSpec.of(prompts="stdlib", k=2, temperature=0.6, top_p=0.95, top_k=20, warmup_tokens=0,
                            endpoints=(endpoint,), **SIZE)
        run_sweep(spec, tmp_path / "res")
    finally:
        server.stop()
    v = read_table(tmp_path / "res", "verdicts").set_index("test")
    assert v.loc["support", "rejected"] and "outside the fresh target" in v.loc["support", "note"]
    assert "sampling profile temper-first (under a profile the server does not use" in v.loc["audit", "note"]


def test_drift_compares_reported_raw_log_probs(demo):
    """A server reporting the model's raw log-softmax (mlx_lm.server, vLLM's default) drifts by float noise from
    the fresh forward; reporting anything else (here the tempered, filtered log p) shows as drift."""
    import mlx.core as mx

    from mtpbench.decode.rescore import rescore_tokens
    from mtpbench.sampling import SamplingConfig

    prompt, tokens = [5, 17, 33, 2000], [40, 41, 42, 43, 44, 45]
    logits = np.asarray(demo.trunk.model(mx.array(prompt + tokens[:-1])[None])[0].astype(mx.float32))
    raw = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    reported = [float(raw[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]
    cfg = SamplingConfig(0.6, 0.95, 20)
    same = rescore_tokens(demo, prompt, tokens, cfg, compare=reported, compare_raw=True)
    assert max(r.drift_logprob for r in same.records) < 1e-4
    tempered = rescore_tokens(demo, prompt, tokens, cfg, compare=[2 * x for x in reported], compare_raw=True)
    assert min(r.drift_logprob for r in tempered.records) > 1e-2


def test_profile_detection():
    assert detect_profile("auto", [{"id": "m", "owned_by": ""}])[0] == "mlx"
    assert detect_profile("auto", [{"id": "m", "owned_by": "mlx-community"}])[0] == "mlx"
    assert detect_profile("auto", [{"id": "m", "owned_by": "sglang"}])[0] == "temper-first"
    assert detect_profile("temper-first", None)[0] == "temper-first"
    profile, why = detect_profile("auto", None, "HTTP 404")
    assert profile == "" and "--audit-profile" in why


def test_log_prob_entries_name_ids_in_every_form():
    chat = {"logprobs": {"content": [{"token": "token_id:17", "logprob": -0.5}, {"id": 3, "logprob": -1.0},
                                     {"token": "abc", "logprob": -0.1}]}}
    assert chat_ids(chat) == [17, 3, None]
    done = {"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.2, None]}}
    got = chunk_logprobs(done)
    assert [i for i, _ in got] == [5, 6] and got[0][1] == -0.2 and np.isnan(got[1][1])
    assert chunk_logprobs({"logprobs": None}) == [] and chunk_logprobs({"text": "x"}) == []


def chat_ids(choice) -> list:
    return [i for i, _ in chunk_logprobs(choice)]


def test_text_is_retokenised_only_when_each_chunk_is_one_token(demo):
    tok = demo.tokenizer
    text = "def add(a, b):\n    return a + b\n"
    ids = list(tok.encode(text))
    pieces = tuple(tok.decode([i]) for i in ids)

    def answer(n: int, finish: str = "length", chunks: tuple[str, ...] = pieces, **kw) -> Answer:
        return Answer(completion_tokens=n, finish_reason=finish, text="".join(chunks), pieces=chunks, **kw)

    ok = server_tokens(answer(len(ids)), tok)
    assert ok.ids == ids and ok.how == FROM_TEXT
    assert server_tokens(answer(len(ids) + 1, "stop"), tok).ids == ids  # the EOS counted, never shown
    miscount = server_tokens(answer(len(ids) + 3), tok)
    assert miscount.ids is None and miscount.how.startswith(UNAUDITED)
    # a non-canonical split: the same text as other tokens; whole-text re-tokenisation would silently get it wrong
    split = tuple(ch for p in pieces for ch in p)
    assert len(split) > len(ids)
    assert server_tokens(answer(len(split), chunks=split), tok).ids == [i for p in split for i in tok.encode(p)]
    merged = (pieces[0] + pieces[1],) + pieces[2:]  # two tokens in one chunk: ambiguous, never guessed
    assert server_tokens(answer(len(ids), chunks=merged), tok).ids is None
    assert server_tokens(answer(1, chunks=("x",)), _Lossy(tok)).how.startswith(UNAUDITED)
    named = server_tokens(answer(2, chunks=("zz",), token_ids=(5, 9)), tok)
    assert named.ids == [5, 9] and named.how == FROM_IDS


class _Lossy:
    """A tokenizer whose decode loses what it encoded (as a byte-level BPE does with invalid UTF-8)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str, **kw) -> list[int]:
        return [1]

    def decode(self, ids) -> str:
        return "?"


def test_audit_options_reach_the_endpoints():
    spec = spec_from_values({"endpoint": ("a=http://127.0.0.1:9/v1", "b=http://127.0.0.1:8/v1"),
                             "audit_model": str(DEMO_MODEL), "audit_profile": ("mlx", "temper-first")})
    assert [(e.audit_model, e.audit_profile) for e in spec.endpoints] == [(str(DEMO_MODEL), "mlx"),
                                                                          (str(DEMO_MODEL), "temper-first")]
    assert spec.to_dict()["endpoints"]["b"]["audit_profile"] == "temper-first"
    with pytest.raises(UserError, match="--audit-model"):
        spec_from_values({"endpoint": ("http://127.0.0.1:9/v1",), "audit_profile": ("mlx",)})
    with pytest.raises(UserError, match="--endpoint"):
        spec_from_values({"audit_model": str(DEMO_MODEL)})
    given = read_sweep_file({"endpoint": ["http://127.0.0.1:9/v1"], "audit-model": str(DEMO_MODEL),
                             "audit_profile": ["temper-first"]}, "sweep.toml").given
    assert spec_from_values(given).endpoints[0].audit_profile == "temper-first"
