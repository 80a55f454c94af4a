"""One count per concept: the summary, card and report counts equal the steps and tokens tables, on runs where an
EOS lands inside accepted drafts and where max_tokens truncates the last step; a broken invariant fails loudly."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from mtpbench.decode import generate_mtp
from mtpbench.decode.counts import CountError, check_counts, reached_by_depth
from mtpbench.model.checkpoint import Bundle, load
from mtpbench.sampling import SamplingConfig

PROMPTS = [f"def f{i}(x):\n    return x +" for i in range(3)]
MAX_TOKENS = 13


def _eos_inside_accepted(bundle, prompts: Path) -> tuple[int, int]:
    """(token, prompt index): a token whose first occurrence in a greedy K=3 decode is an accepted draft followed by
    another accepted draft of the same step, so making it the EOS ends a run inside a step's accepted drafts."""
    from mtpbench.sweep.prompts import encode, load_sets

    for pi, prompt in enumerate(load_sets([str(prompts)])):
        ids = encode(bundle.tokenizer, prompt, None)
        r = generate_mtp(bundle, ids, SamplingConfig(), 3, 40, ignore_eos=True)
        src = [t.source for t in r.token_records]
        for i, tok in enumerate(r.tokens[:-1]):
            if r.tokens.index(tok) == i and 0 < i < MAX_TOKENS - 1 and src[i] == src[i + 1] == "accepted":
                return tok, pi
    raise AssertionError("no accepted draft followed by another in the first tokens: the checkpoint never agrees")


@pytest.fixture(scope="module")
def eos_sweep(tmp_path_factory, tiny_agree):
    from click.testing import CliRunner

    from mtpbench.cli.main import main

    tmp = tmp_path_factory.mktemp("counts")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": t}) + "\n"
                               for i, t in enumerate(PROMPTS)))
    tok, _ = _eos_inside_accepted(load(tiny_agree), prompts)
    out = tmp / "results"
    mp = pytest.MonkeyPatch()
    mp.setattr(Bundle, "eos_ids", property(lambda self: frozenset({tok})))
    try:
        res = CliRunner().invoke(main, ["sweep", "-m", str(tiny_agree), "--k", "1..3", "--temp", "0,1.0",
                                        "--prompts", str(prompts), "--repeats", "1", "--max-tokens", str(MAX_TOKENS), "--out", str(out),
                                        "--no-report"], catch_exceptions=False)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return out, tok


def _tables(out: Path):
    from mtpbench.sweep.store import read_table

    runs = read_table(out, "runs")
    return runs[runs["status"] == "ok"], read_table(out, "steps"), read_table(out, "tokens")


def test_runs_cover_eos_inside_accepted_drafts_and_truncated_steps(eos_sweep):
    out, tok = eos_sweep
    runs, steps, tokens = _tables(out)
    mtp = runs[runs["mode"] == "mtp"]
    last = tokens.sort_values("index").groupby("run_id").tail(1).set_index("run_id")
    eos_in_drafts = [rid for rid in mtp["run_id"] if last.at[rid, "token_id"] == tok
                     and last.at[rid, "source"] == "accepted"]
    assert eos_in_drafts, "no run ended on an EOS inside accepted drafts"
    truncated = mtp[(mtp["generated_tokens"] == MAX_TOKENS)
                    & mtp.apply(lambda r: list(r["drafted_at_depth"])[-1] < r["verify_steps"], axis=1)]
    assert len(truncated), "no run whose last step was cut short by max_tokens"
    # The old chain (reached(d) = accepted(d-1)) disagrees with the steps table on such runs: the test can fail.
    assert any(reached_by_depth(r["verify_steps"], list(r["accepted_at_depth"])) != list(r["reached_at_depth"])
               for _, r in mtp.iterrows())


def test_every_run_count_equals_its_tables(eos_sweep):
    runs, steps, tokens = _tables(eos_sweep[0])
    for _, r in runs.iterrows():
        src = Counter(tokens.loc[tokens["run_id"] == r["run_id"], "source"])
        assert sum(src.values()) == r["generated_tokens"]
        if r["mode"] != "mtp":
            continue
        s = steps[steps["run_id"] == r["run_id"]]
        k = int(r["k"])
        assert [int((s["depth"] == d).sum()) for d in range(1, k + 1)] == list(r["reached_at_depth"])
        accepted = [int(((s["depth"] == d) & s["accepted"]).sum()) for d in range(1, k + 1)]
        assert accepted == list(r["accepted_at_depth"])
        assert src["accepted"] == r["accepted_tokens"] == sum(r["accepted_at_depth"])
        assert r["generated_tokens"] == 1 + r["accepted_tokens"] + src["residual"] + src["bonus"]
        assert int(s["step"].nunique()) == r["verify_steps"]


def test_summary_card_and_report_counts_equal_the_steps_table(eos_sweep):
    from mtpbench.report import tables
    from mtpbench.report.card import card_data
    from mtpbench.report.load import load as load_results
    from mtpbench.stats.summary import acceptance_by_depth

    out, _ = eos_sweep
    runs, steps, _ = _tables(out)
    mtp = runs[runs["mode"] == "mtp"][["run_id", "setting", "k"]]
    s = steps.merge(mtp, on="run_id")
    want = {(st, int(k), int(d)): (len(g), int(g["accepted"].sum())) for (st, k, d), g in
            s.groupby(["setting", "k", "depth"])}
    for name, rows in [("summary", acceptance_by_depth(runs).to_dict("records")),
                       ("report", tables.acceptance(load_results([out]).runs).to_dict("records")),
                       ("card", card_data(out)["acceptance"])]:
        got = {(r["setting"], int(r["k"]), int(r["depth"])): (int(r["reached"]), int(r["accepted"])) for r in rows}
        assert got == want, name


def test_a_broken_invariant_fails_loudly(bundle_agree):
    ids = bundle_agree.tokenizer.encode(PROMPTS[0])
    r = generate_mtp(bundle_agree, ids, SamplingConfig(), 3, MAX_TOKENS, ignore_eos=True)
    check_counts(r)
    bad = [replace(r, accepted_at_depth=[r.accepted_at_depth[0] + 1, *r.accepted_at_depth[1:]]),
           replace(r, reached_at_depth=[*r.reached_at_depth[:-1], r.reached_at_depth[-2] + 1]),
           replace(r, bonus_tokens=r.bonus_tokens + 1), replace(r, steps=r.steps[:-1])]
    for b in bad:
        with pytest.raises(CountError):
            check_counts(b)
