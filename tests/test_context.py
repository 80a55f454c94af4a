"""Long context as a sweep axis: bucket parsing, cutting real documents at line boundaries, the shipped set, a
short-bucket sweep on a tiny checkpoint (rows, manifest, report, card) and a bucket beyond the position limit."""

from __future__ import annotations

import json

import pytest

from mtpbench.errors import UserError
from mtpbench.sweep.axes import BY_NAME, COMPARED, GROUP_KEYS, context_buckets, context_label, read_sweep_file
from mtpbench.sweep.longctx import DATA_FILE, Document, cut, load_documents
from mtpbench.sweep.store import read_table


def test_context_buckets_parse_k_suffixes_plain_counts_and_native():
    assert context_buckets("1k,4k,16k,32k") == (1024, 4096, 16384, 32768)
    assert context_buckets("128, 64,128") == (128, 64)
    assert context_buckets(["native", "1k"]) == (0, 1024)
    assert context_buckets(256) == (256,)
    for bad in ("x", "1.5k", "8", ""):
        with pytest.raises(UserError):
            context_buckets(bad)
    assert [context_label(n) for n in (0, 1024, 4096, 200, None)] == ["native", "1k", "4k", "200", "native"]
    axis = BY_NAME["context"]
    assert axis.default == (0,) and "context" in GROUP_KEYS and axis in COMPARED
    assert read_sweep_file({"context": ["1k", 4096]}, "s.toml").given["context"] == (1024, 4096)
    with pytest.raises(UserError, match="s.toml: context"):
        read_sweep_file({"context": "lots"}, "s.toml")


def test_the_native_context_leaves_spec_and_cell_identities_as_they_were(tiny_agree):
    """Sweeps without --context keep their results dir name and cell ids (resume works across the upgrade)."""
    from mtpbench.sweep.prompts import Prompt
    from mtpbench.sweep.spec import SweepSpec, plan

    native = SweepSpec.of(model=str(tiny_agree), prompts="code", repeats=1)
    assert "context" not in native.to_dict()
    bucketed = SweepSpec.of(model=str(tiny_agree), prompts="code", repeats=1, context="native,1k")
    assert bucketed.to_dict()["context"] == [0, 1024] and bucketed.digest() != native.digest()
    p = Prompt("s", "p1", "c", "text", None, None)
    long = Prompt("longctx", "p1", "c", "long text", None, None)
    cells = plan(bucketed, [p], {(str(tiny_agree), 1024): [long]})
    ids = {b: {c.cell_id for c in cells if c["context"] == b} for b in (0, 1024)}
    assert ids[0] == {c.cell_id for c in plan(native, [p])} and not ids[0] & ids[1024]
    assert all(c.prompt is long for c in cells if c["context"] == 1024)


def _doc(lines: int = 40) -> Document:
    text = "".join(f"line {i} " + "w " * (i % 7) + "\n" for i in range(lines))
    return Document("d-01", "long_test", text, "\nTask: summarise.", False, ("Lib/x.py",))


def _words(p) -> int:
    return len(p.raw_text().split())


def test_cut_keeps_the_longest_line_prefix_that_fits_and_the_task_at_the_end():
    doc = _doc()
    lines = doc.text.splitlines(keepends=True)
    previous = ""
    for bucket in (20, 50, 120):
        p = cut(doc, bucket, _words)
        body = p.text[: -len(doc.task)]
        assert p.text.endswith(doc.task) and _words(p) <= bucket
        n = len(body.splitlines())
        assert body == "".join(lines[:n])  # a line boundary of the document
        assert _words(doc.prompt(n + 1)) > bucket  # one more line would not fit
        assert body.startswith(previous) and len(body) > len(previous)  # longer buckets extend the same text
        previous = body
    assert cut(doc, 50, _words).digest != cut(doc, 120, _words).digest  # content is part of the identity
    with pytest.raises(UserError, match="too short"):
        cut(doc, 10_000, _words)
    with pytest.raises(UserError, match="alone is longer"):
        cut(doc, 1, _words)


def test_shipped_long_context_set_is_real_stdlib_text_with_its_licence():
    docs = load_documents()
    assert len(docs) >= 4 and len({d.id for d in docs}) == len(docs)
    raw = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    for d, r in zip(docs, raw):
        assert d.text.startswith("# file: Lib/") and d.sources and d.task.strip()
        assert len(d.text) >= 100_000  # a 32k-token bucket at ~3-4 characters per token
        assert "PSF" in r["license"] and r["python"]
    assert {d.category for d in docs} == {"long_continue", "long_summarize", "long_question", "long_edit"}


def test_builder_regenerates_a_loadable_set_from_this_machines_stdlib(tmp_path):
    from mtpbench.builders.longctx import DOCUMENTS, build

    out = build(tmp_path / "longctx.jsonl", target=3000)
    docs = load_documents(out)
    assert len(docs) == len(DOCUMENTS) and all(3000 <= len(d.text) < 3000 + 2000 for d in docs)


def test_context_sweep_on_a_tiny_checkpoint(cli, tmp_path, tiny_agree):
    out = tmp_path / "ctx"
    res = cli("sweep", "-m", tiny_agree, "--context", "256,512", "--k", "1..2", "--temp", "0", "--repeats", "1",
              "--prompt-limit", "1", "--max-tokens", "12", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert set(runs["context"]) == {256, 512} and set(runs["prompt_set"]) == {"longctx"}
    assert len(runs) == 2 * 3 and (runs["status"] == "ok").all()
    for bucket, g in runs.groupby("context"):
        assert (g["prompt_tokens"] <= bucket).all() and g["prompt_digest"].nunique() == 1
    assert runs.groupby("context")["prompt_tokens"].first().is_monotonic_increasing
    for _, g in runs.groupby("cell_id"):
        assert g["output_hash"].nunique() == 1  # greedy MTP == greedy AR at every context
    kv = runs[runs["mode"] == "mtp"].groupby(["context", "k"])["kv_bytes_per_step"].first()
    assert kv[(512, 1)] > kv[(256, 1)] > 0 and kv[(256, 2)] > kv[(256, 1)]
    assert (runs["ttft_s"] > 0).all() and (runs["peak_memory_bytes"] > 0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = {k: v["digest"] for m in manifest["context_prompts"].values() for k, v in m.items()}
    assert set(recorded) == {"longctx/longctx-01@256", "longctx/longctx-01@512"}
    assert set(recorded.values()) == set(runs["prompt_digest"])
    html_path = tmp_path / "ctx.html"
    assert cli("report", out, "-o", html_path).exit_code == 0
    html = html_path.read_text()
    assert 'id="context"' in html and 'id="compare-context"' in html and "S / S₀" in html
    card = cli("card", out)
    assert card.exit_code == 0 and "**Against context**" in card.stdout and "τ / τ₀" in card.stdout


def test_a_bucket_beyond_the_position_limit_is_refused_in_one_line(cli, tmp_path, tiny_agree):
    out = tmp_path / "too-long"
    res = cli("sweep", "-m", tiny_agree, "--context", "256,4k", "--k", "1", "--out", out, "--no-report")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--context 4k needs" in res.stderr
    assert "context of 4096" in res.stderr and not out.exists()
    res = cli("sweep", "-m", tiny_agree, "--context", "12", "--out", out, "--no-report")
    assert res.exit_code == 2 and "at least 16 tokens" in res.stderr and not out.exists()


def test_the_split_tells_a_dearer_verify_step_from_falling_acceptance():
    """Same drafts at two contexts, MTP steps twice as slow at the longer one (AR unchanged): the whole speedup
    change is cost (c0/c = 0.5), none of it acceptance (tau/tau0 = 1)."""
    import pandas as pd

    from mtpbench.report import tables
    from tests.synthetic import Spec, build_runs

    runs, _ = build_runs(Spec(failed_runs=0, settings=("greedy",)))
    long = []
    for r in runs:
        r2 = {**r, "context": 4096, "run_id": r["run_id"] + "-4k", "cell_id": r["cell_id"] + "-4k"}
        if r["mode"] == "mtp":
            r2.update(decode_s=2 * r["decode_s"], decode_tok_s=r["decode_tok_s"] / 2)
        long.append(r2)
    frame = pd.DataFrame([{**r, "context": 1024, "source": "s"} for r in runs] + [{**r, "source": "s"} for r in long])
    ctx = tables.context_table(frame)
    assert set(ctx["context"]) == {1024, 4096} and len(ctx) == 2 * 3
    at_4k = ctx[ctx["context"] == 4096]
    assert (at_4k["acceptance_factor"] == 1).all()
    assert at_4k["cost_factor"].round(9).eq(0.5).all() and at_4k["speedup_change"].round(9).eq(0.5).all()
    assert at_4k["residual"].round(9).eq(1).all()
    assert (ctx[ctx["context"] == 1024][["speedup_change", "acceptance_factor", "cost_factor"]] == 1).all().all()
