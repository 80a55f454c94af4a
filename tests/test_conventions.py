"""The MTP head's feeding conventions (hidden fed, chained hidden, history) and the draft cap at the budget's end:
greedy identity under every combination, compiled == module, the axes in sweep rows and the report."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.model.conventions import CHAINS, HIDDEN_VARIANTS, History
from mtpbench.sampling import SamplingConfig
from mtpbench.sweep.store import read_table

PROMPT = "def add(a, b):\n    return a"
HISTORIES = ("committed", "cycle", "window:3", "window:40")  # 40: a window longer than the compiled inputs


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("hidden", HIDDEN_VARIANTS)
def test_greedy_mtp_equals_greedy_ar_under_every_convention(bundle_agree, hidden, chain, history):
    """Conventions change what the head drafts, never what the decode emits; the greedy fast path (compiled
    chains) and the host-side step draft the same under each, with both rollbacks."""
    b = bundle_agree.with_hidden_variant(hidden)
    prompt = b.tokenizer.encode(PROMPT)
    ar = generate_ar(b, prompt, SamplingConfig(), 40, ignore_eos=True)
    accepted = 0
    for k in (1, 2, 3, 4):
        runs = [generate_mtp(b, prompt, SamplingConfig(), k, 40, ignore_eos=True, rollback=rb, greedy_fast_path=fast,
                             chain=chain, history=history)
                for rb, fast in (("capture", True), ("reforward", False))]
        for r in runs:
            assert r.tokens == ar.tokens, (k, hidden, chain, history)
        assert runs[0].accepted_at_depth == runs[1].accepted_at_depth and runs[0].steps == runs[1].steps
        accepted += runs[0].accepted_tokens
    assert accepted > 0


def test_conventions_reach_the_head(bundle):
    """Each non-default convention drafts differently from the default (so the option is used), on the random head:
    the agreeing one ignores its hidden input and nearly its attention, by construction."""
    def drafts(b, **kw):
        prompt = b.tokenizer.encode(PROMPT * 3)
        r = generate_mtp(b, prompt, SamplingConfig(), 3, 48, ignore_eos=True, **kw)
        return [s.drafted_token for s in r.steps]

    base = drafts(bundle)
    assert drafts(bundle, history="cycle") != base
    assert drafts(bundle, history="window:2") != base
    assert drafts(bundle, history="cycle") == drafts(bundle, history="window:1")  # cycle: the newest pair only
    assert drafts(bundle.with_hidden_variant("pre_norm")) != base
    # Chaining shows only at depth > 1, which a random head's records rarely reach: compare the chains themselves.
    rng, head, trunk = np.random.default_rng(0), bundle.draft_head, bundle.trunk
    chains = {c: [] for c in CHAINS}
    for _ in range(8):
        hidden = mx.array(rng.standard_normal((1, 2, trunk.lm.args.hidden_size)).astype(np.float32))
        tokens = mx.array(rng.integers(0, 300, (1, 2)))
        for c in CHAINS:
            chains[c].append(head.greedy_chain(hidden, tokens, head.make_cache(), 3, chain=c).tolist())
    assert [x[0] for x in chains["normed"]] == [x[0] for x in chains["prenorm"]]  # depth 1 is the same draft
    assert chains["normed"] != chains["prenorm"]


def test_compiled_head_chains_prenorm_like_the_module(bundle_agree):
    head, compiled, trunk = bundle_agree.mtp, bundle_agree.draft_head, bundle_agree.trunk
    rng = np.random.default_rng(2)
    theirs, ours = head.make_cache(), compiled.make_cache()
    hidden = mx.array(rng.standard_normal((1, 3, trunk.lm.args.hidden_size)).astype(np.float32))
    emb = trunk.embed(mx.array([[3, 5, 8]]))
    for got, want in zip(compiled.both(hidden, emb, ours), head.both(hidden, emb, theirs)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    tokens = [7, 9]
    hidden = hidden[:, :2]
    got = compiled.greedy_chain(hidden, mx.array([tokens]), ours, 3, chain="prenorm").tolist()
    pre, normed = head.both(hidden, trunk.embed(mx.array([tokens])), theirs)
    z, normed, want = pre[:, -1:], normed[:, -1:], []
    for i in range(3):
        if i:
            z, normed = head.both(z, trunk.embed(mx.array([[want[-1]]])), theirs)
        want.append(int(mx.argmax(trunk.lm_head(normed)[0, -1])))
    assert got == want


def test_bad_conventions_are_one_line():
    from mtpbench.errors import UserError
    from mtpbench.sweep.axes import BY_NAME

    for axis, value, needle in (("mtp_hidden", "mid", "post, pre"), ("mtp_chain", "raw", "normed, prenorm"),
                                ("mtp_history", "window:0", "window:N"), ("mtp_history", "window", "window:N"),
                                ("mtp_history", "cycle:2", "window:N"), ("mtp_concat", "both", "hidden_embedding"),
                                ("mtp_chain", "mix:fc:prev:1.5", "mix:A:B:ALPHA")):
        with pytest.raises(UserError, match=needle):
            BY_NAME[axis].parse(value, BY_NAME[axis].option)
    assert BY_NAME["mtp_hidden"].parse("post,pre", "x") == ("post_norm", "pre_norm")
    assert BY_NAME["mtp_chain"].parse("post_norm,mix:pre_norm:prev:0p75", "x") == ("normed", "mix:prenorm:prev:0.75")
    assert str(History.parse("window:8")) == "window:8"


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(temperature=0.8, top_k=5, seed=2)],
                         ids=["greedy", "sampled"])
def test_drafts_are_capped_at_the_tokens_left(bundle_agree, cfg):
    """A step near the end drafts min(K, tokens left): every counted acceptance is an emitted token."""
    prompt = bundle_agree.tokenizer.encode(PROMPT)
    k, capped = 4, 0
    for n in range(30, 36):
        r = generate_mtp(bundle_agree, prompt, cfg, k, n, ignore_eos=True)
        assert len(r.tokens) == n
        emitted, want = 1, [0] * k
        for j in r.accepted_per_step:
            depth = min(k, n - emitted)
            assert j <= depth
            for i in range(depth):
                want[i] += 1
            emitted += min(j + 1, n - emitted)
        assert emitted == n and r.drafted_at_depth == want
        assert sum(t.source == "accepted" for t in r.token_records) == r.accepted_tokens
        capped += want[-1] < r.verify_steps
    assert capped, "no step was capped: the test would not exercise the cap"


def _prompt_file(tmp_path: Path) -> Path:
    f = tmp_path / "mini.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": f"def f{i}(x):\n    return x +"})
                         + "\n" for i in range(2)))
    return f


def test_convention_axes_land_in_rows_and_the_report(cli, tmp_path, tiny_agree):
    out = tmp_path / "conv"
    res = cli("sweep", "-m", tiny_agree, "--mtp-hidden", "post,pre", "--mtp-history", "committed,cycle",
              "--mtp-chain", "prenorm", "--k", "1..2", "--temp", "0", "--prompts", _prompt_file(tmp_path),
              "--repeats", "1", "--max-tokens", "16", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert set(zip(runs["hidden_variant"], runs["mtp_history"], runs["mtp_chain"])) == {
        (h, hist, "prenorm") for h in ("post_norm", "pre_norm") for hist in ("committed", "cycle")}
    assert runs["cell_id"].nunique() == 4 * 2
    for _, g in runs.groupby("cell_id"):
        assert g["output_hash"].nunique() == 1  # greedy MTP == greedy AR under every convention
    report = cli("report", out, "-o", tmp_path / "c.html")
    html = (tmp_path / "c.html").read_text()
    assert report.exit_code == 0
    assert 'id="compare-hidden_variant"' in html and 'id="compare-mtp_history"' in html
    assert 'id="compare-mtp_chain"' not in html  # one value: nothing to compare
    toml = tmp_path / "s.toml"
    toml.write_text('mtp_history = ["window:4"]\nmtp_hidden = "pre"\n')
    from mtpbench.sweep.axes import read_sweep_file
    import tomllib

    given = read_sweep_file(tomllib.loads(toml.read_text()), str(toml)).given
    assert given["mtp_history"] == ("window:4",) and given["mtp_hidden"] == ("pre_norm",)
    bad = cli("sweep", "-m", tiny_agree, "--mtp-history", "forever", "--out", tmp_path / "bad", "--no-report")
    assert bad.exit_code == 2 and "--mtp-history" in bad.stderr and not (tmp_path / "bad").exists()


def test_a_declared_runtime_contract_sets_the_defaults_and_says_so(cli, tmp_path, tiny_agree):
    """A checkpoint shipping MTPLX 2.12.2's `mtplx_runtime.json` (the contract under `mtp_contract`, as
    `_stamp_runtime_metadata` writes it) is run by its own conventions unless told otherwise; `inspect` shows them
    with their keys, the sweep says it used them, and the rows record them. History is not a contract field."""
    import shutil

    model = tmp_path / "contract"
    shutil.copytree(tiny_agree, model)
    contract = {"base_hidden_variant": "pre_norm", "hidden_variant": "post_norm", "concat_order": "embedding_hidden",
                "mtp_position_mode": "cache", "mtp_quant_group_size": 64, "mtp_quant_mode": "affine"}
    (model / "mtplx_runtime.json").write_text(json.dumps(
        {"mtplx_version": "2.12.2", "mtp_contract": contract, "forge_provenance": {"mtp_contract": contract}}))
    shown = cli("inspect", model)
    assert shown.exit_code == 0
    assert "declares:    mtp-hidden pre_norm (mtplx_runtime.json mtp_contract.base_hidden_variant)" in shown.stdout
    common = ["--k", "1", "--temp", "0", "--prompts", _prompt_file(tmp_path), "--repeats", "1", "--max-tokens", "8",
              "--quiet", "--no-report"]
    res = cli("sweep", "-m", model, *common, "--out", tmp_path / "declared")
    assert res.exit_code == 0, res.stderr
    assert "mtp-hidden: pre_norm, as the checkpoints' MTPLX contract declares" in res.stderr
    runs = read_table(tmp_path / "declared", "runs")
    assert set(zip(runs["hidden_variant"], runs["mtp_history"], runs["mtp_chain"], runs["mtp_concat"])) == {
        ("pre_norm", "committed", "normed", "embedding_hidden")}
    res = cli("sweep", "-m", model, *common, "--mtp-hidden", "post", "--out", tmp_path / "chosen")
    assert res.exit_code == 0 and "mtp-hidden: pre_norm" not in res.stderr
    assert set(read_table(tmp_path / "chosen", "runs")["hidden_variant"]) == {"post_norm"}
    (model / "mtplx_runtime.json").write_text(json.dumps({"mtp_contract": {"mtp_position_mode": "sometimes"}}))
    bad = cli("sweep", "-m", model, *common, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "mtp_position_mode = 'sometimes'" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("concat", ["embedding_hidden", "hidden_embedding"])
@pytest.mark.parametrize("chain", ["fc", "embedding", "prev", "mix:prenorm:prev:0.5"])
def test_greedy_identity_under_the_other_head_inputs_and_chains(bundle_agree, chain, concat):
    """The concat order and MTPLX's other chains (run by the module, uncompiled) keep greedy MTP == AR."""
    b = bundle_agree.with_conventions(concat=concat)
    prompt = b.tokenizer.encode(PROMPT)
    ar = generate_ar(b, prompt, SamplingConfig(), 24, ignore_eos=True)
    for k in (2, 3):
        for rb, fast in (("capture", True), ("reforward", False)):
            r = generate_mtp(b, prompt, SamplingConfig(), k, 24, ignore_eos=True, rollback=rb, greedy_fast_path=fast,
                             chain=chain)
            assert r.tokens == ar.tokens, (k, chain, concat)


def test_position_modes_shift_every_head_position_alike():
    """MTPLX's `absolute` position mode moves every head position by one constant; RoPE attention depends only on
    position differences, so mtpbench's cache positions compute the same scores (what makes `absolute` modelled)."""
    import mlx.nn as nn

    rope = nn.RoPE(16, base=10000.0)
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((1, 1, 3, 16)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 1, 5, 16)).astype(np.float32))
    scores = [rope(q, offset=2 + s) @ rope(k, offset=s).swapaxes(-1, -2) for s in (0, 1, 37)]
    for other in scores[1:]:
        np.testing.assert_allclose(np.asarray(other), np.asarray(scores[0]), atol=1e-4)
