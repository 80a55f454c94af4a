"""The sweep summary sets the cost model's predicted speedup and the bandwidth-bound projection beside each
realized speedup, from the bench kept with the results."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from mtpbench.stats.acceptance import (StepCosts, bandwidth_bound_speedup, costs_from_bench, predicted_speedup,
                                      setting_costs)


def test_bandwidth_bound_projection_is_the_cost_model_with_verify_at_one_step():
    for a, share in ((0.0, 0.1), (0.5, 0.05), (0.9, 0.2), (1.0, 0.0)):
        for k in (1, 2, 3):
            survival = [a ** d for d in range(1, k + 1)]
            bound = StepCosts(ar_step=1.0, draft_step=share, verify={k: 1.0})
            assert math.isclose(bandwidth_bound_speedup(1 + sum(survival), k, share),
                                predicted_speedup(survival, bound))


def test_costs_from_bench_reads_what_bench_writes():
    from mtpbench.perf.costs import MeasuredCosts

    m = MeasuredCosts(ar_step=0.01, draft_step=0.004, verify={1: 0.012, 2: 0.015}, rollback=0.001,
                      draft_chain={1: 0.004, 2: 0.007}, rollback_by_j=(0.001, 0.001))
    c = costs_from_bench(json.loads(json.dumps(m.to_dict())))
    assert c == StepCosts(0.01, 0.004, {1: 0.012, 2: 0.015}, 0.001, {1: 0.004, 2: 0.007})


def test_each_setting_is_priced_with_its_own_terms():
    """A sampled setting takes its own drafts and verify (host rows, samples, the rule) beside the shared AR step and
    rollback; a setting whose terms were not measured gets no greedy-path price; a draft temperature reads the
    setting's terms."""
    from mtpbench.perf.costs import MeasuredCosts, SampledTerms

    m = MeasuredCosts(ar_step=0.01, draft_step=0.004, verify={1: 0.012, 2: 0.015}, rollback=0.001,
                      draft_chain={1: 0.004, 2: 0.007}, rollback_by_j=(0.001, 0.001))
    t = SampledTerms("T=0.6 top_p=0.95 top_k=20", drafts={1: 0.006, 2: 0.011}, verify={1: 0.016, 2: 0.02})
    doc = json.loads(json.dumps({"costs": m.to_dict(), "sampled_terms": [t.to_dict()]}))
    assert setting_costs(doc, "greedy") == costs_from_bench(doc["costs"])
    sampled = setting_costs(doc, "T=0.6 top_p=0.95 top_k=20")
    assert sampled == StepCosts(0.01, 0.004, {1: 0.016, 2: 0.02}, 0.001, {1: 0.006, 2: 0.011})
    assert setting_costs(doc, "T=0.6 top_p=0.95 top_k=20 draft_T=1") == sampled
    assert setting_costs(doc, "T=1") is None and setting_costs({}, "greedy") is None
    assert predicted_speedup([0.8, 0.6], sampled) < predicted_speedup([0.8, 0.6], setting_costs(doc, "greedy"))


@pytest.fixture(scope="module")
def swept_and_benched(tmp_path_factory, tiny_agree):
    from click.testing import CliRunner

    from mtpbench.perf.bench import run_bench, safe_name
    from mtpbench.perf.settings import BenchSettings
    from mtpbench.cli.main import main

    tmp = tmp_path_factory.mktemp("projection")
    prompts = tmp / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    out = tmp / "results"
    res = CliRunner().invoke(main, ["sweep", "-m", str(tiny_agree), "--k", "1..2", "--temp", "0", "--prompts",
                                    str(prompts), "--repeats", "1", "--max-tokens", "16", "--out", str(out),
                                    "--no-report", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    bench = run_bench(tiny_agree, out / "bench" / safe_name(str(tiny_agree)), ks=(1, 2),
                      settings=BenchSettings.quick(contexts=(32,)))
    return out, bench


def test_sweep_summary_shows_predicted_and_projected_beside_realized(swept_and_benched):
    from mtpbench.report.console import summary_of, sweep_summary
    from mtpbench.stats.summary import acceptance_by_depth, throughput_table
    from mtpbench.sweep.store import read_table

    out, bench = swept_and_benched
    runs = read_table(out, "runs")
    assert "bandwidth-bound projection" not in sweep_summary(runs)  # no bench, no projection
    text = summary_of(out)
    assert "predicted (this machine)" in text and "bandwidth-bound projection" in text and "not a measurement" in text
    acc = acceptance_by_depth(runs, ["model"])
    share = bench["roofline"]["draft_step_bytes"] / bench["roofline"]["trunk_bytes"]
    thr = throughput_table(runs, ["model"])
    ar_token_s = 1.0 / float(thr[thr["mode"] == "ar"].tok_s.iloc[0])  # the AR loop's own time per token
    costs = replace(costs_from_bench(bench["costs"]), ar_step=ar_token_s)
    for k in (1, 2):
        survival = list(acc[acc.k == k].sort_values("depth").survival)
        row = next(line for line in text.splitlines() if line.split()[:1] == [str(k)])
        assert f"{bandwidth_bound_speedup(1 + sum(survival), k, share):.2f}x" in row
        assert f"{predicted_speedup(survival, costs):.2f}x" in row


def test_html_report_has_the_projection_column_with_a_bench(swept_and_benched, tmp_path):
    from mtpbench.report.html import render_report

    out, bench = swept_and_benched
    html = render_report([out], tmp_path / "r.html").read_text()
    assert "bandwidth-bound projection (not measured)" in html and "a projection, not a measurement" in html


def test_a_plain_sweep_times_its_cost_model_and_shows_the_projections(cli, tmp_path, tiny_agree):
    """Without `--bench` the sweep still times each checkpoint's step costs (cost_model.json), so the main job's
    summary sets predicted and projected speedups beside the realized ones; `--no-cost-model` turns it off."""
    from mtpbench.perf.bench import COST_MODEL, safe_name
    from mtpbench.report.html import render_report

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    args = ["sweep", "-m", tiny_agree, "--k", "1", "--temp", "0,0.6", "--top-p", "0.95", "--top-k", "20",
            "--prompts", prompts, "--repeats", "1", "--max-tokens", "12", "--no-report"]
    res = cli(*args, "--out", tmp_path / "with")
    assert res.exit_code == 0, res.stderr
    doc = json.loads((tmp_path / "with" / "bench" / safe_name(str(tiny_agree)) / COST_MODEL).read_text())
    assert doc["costs"]["ar_step_s"] > 0 and doc["roofline"]["draft_step_bytes"] > 0
    assert [t["setting"] for t in doc["sampled_terms"]] == ["T=0.6 top_p=0.95 top_k=20"]  # the sweep's sampled one
    assert "predicted (this machine)" in res.stdout and "bandwidth-bound projection" in res.stdout
    for setting in ("greedy", "T=0.6 top_p=0.95 top_k=20"):  # both priced, each with its own terms
        block = res.stdout.split(setting, 1)[1].split("\n\n")[0]
        row = next(line for line in block.splitlines() if line.split()[:1] == ["1"])
        assert row.count("x") >= 3 and " - " not in row, (setting, row)
    html = render_report([tmp_path / "with"], tmp_path / "r.html").read_text()
    assert "bandwidth-bound projection (not measured)" in html
    card = cli("card", tmp_path / "with")
    assert card.exit_code == 0 and "Bandwidth-bound projection (not measured)" in card.stdout
    share = doc["roofline"]["draft_step_bytes"] / doc["roofline"]["trunk_bytes"]
    rec = json.loads(cli("card", tmp_path / "with", "--format", "json").stdout)["projection"][0]
    assert math.isclose(rec["projected_bw"], bandwidth_bound_speedup(rec["tau"], rec["k"], share))
    res = cli(*args, "--no-cost-model", "--out", tmp_path / "without")
    assert res.exit_code == 0 and "bandwidth-bound projection" not in res.stdout
    assert not (tmp_path / "without" / "bench").exists()
    assert "Bandwidth-bound projection" not in cli("card", tmp_path / "without").stdout
