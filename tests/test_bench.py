"""`mtpbench bench` on a tiny checkpoint: every section is written, finite and rendered. Never asserts a timing."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from mtpbench.perf.bench import run_bench
from mtpbench.perf.settings import BenchSettings, context_cap, pattern_prompt
from mtpbench.cli.bench import bench_cmd
from mtpbench.report.bench_section import render_bench_html, render_bench_page

SECTIONS = ("costs", "ar_parity", "mtp", "cost_model", "records_overhead", "roofline", "context_scaling", "provenance", "blas")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tiny_agree, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(tiny_agree, out, ks=(1, 2), settings=BenchSettings.quick(contexts=(32, 48)))
    return out, result


def test_bench_json_has_every_section(bench):
    out, result = bench
    written = json.loads((out / "bench.json").read_text())
    assert written["schema"] == result["schema"] and written["complete"] is True
    assert all(s in written for s in SECTIONS)
    assert written["blas"] == written["provenance"]["blas"]
    assert [e["k"] for e in written["mtp"]] == [1, 2]
    assert [r["k"] for r in written["records_overhead"]] == [0, 1, 2]


def test_costs_positive_and_finite(bench):
    c = bench[1]["costs"]
    assert _finite_positive(c["ar_step_s"]) and _finite_positive(c["draft_step_s"]) and _finite_positive(c["rollback_s"])
    assert [v["k"] for v in c["verify_s"]] == [1, 2]
    assert all(_finite_positive(v["seconds"]) for v in c["verify_s"])
    assert len(c["rollback_by_j_s"]) == 2 and all(_finite_positive(s) for s in c["rollback_by_j_s"])


def test_ratios_finite(bench):
    b = bench[1]
    p = b["ar_parity"]
    assert _finite_positive(p["ratio"]) and len(p["ours_tok_s"]) == len(p["mlx_lm_tok_s"]) == p["repeats"]
    for e in b["mtp"]:
        for key in ("predicted_speedup", "realized_speedup", "efficiency", "tau", "step_overhead"):
            assert _finite_positive(e[key]), (e["k"], key, e[key])
        assert len(e["survival"]) == e["k"] and all(0 <= s <= 1 for s in e["survival"])
        assert math.isnan(e["break_even_acceptance"]) or 0 <= e["break_even_acceptance"] <= 1
    assert all(math.isfinite(r["overhead"]) for r in b["records_overhead"])
    roof = b["roofline"]
    assert _finite_positive(roof["machine_gb_s"]) and roof["trunk_bytes"] > 0
    assert all(_finite_positive(m["achieved_gb_s"]) for m in roof["modes"])


def test_context_scaling_rows(bench):
    rows = bench[1]["context_scaling"]
    assert [r["prompt_tokens"] for r in rows] == [32, 48] and not any(r["capped"] for r in rows)
    assert all(_finite_positive(r["ar_tok_s"]) and len(r["mtp"]) == 2 for r in rows)


def test_long_prompts_capped_at_position_budget(bundle_agree):
    cap = context_cap(bundle_agree, max_tokens=12, ks=(1, 2))
    assert 0 < cap < bundle_agree.context_length
    prompt = pattern_prompt(bundle_agree, min(100_000, cap))
    assert len(prompt) == cap and len(set(prompt)) > 1


def test_report_renders_self_contained(bench):
    out, result = bench
    fragment = render_bench_html(result)
    assert fragment.lstrip().startswith("<section") and "<svg" in fragment
    page = render_bench_page(out / "bench.json", out / "bench.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "http" not in page
    assert page.count("<table") >= 6


def test_cli_bench_two_checkpoints_one_page(tiny_agree, tiny_kv, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(bench_cmd, ["--model", str(tiny_agree), "--model", str(tiny_kv), "--quick", "--k", "1",
                                         "--contexts", "32", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (out / "agree" / "bench.json").exists() and (out / "kv" / "bench.json").exists()
    page = (out / "bench.html").read_text()
    assert 'id="bench-0"' in page and 'id="bench-1"' in page and "side by side" in page
    assert "AR parity" in res.output and "snapshot + re-forward" in res.output


def test_costs_cover_both_rollbacks(bench):
    c = bench[1]["costs"]
    assert len(c["reforward_by_j_s"]) == len(c["rollback_by_j_s"]) == 2
    assert all(_finite_positive(v["plain_seconds"]) for v in c["verify_s"])
    assert all(_finite_positive(e["predicted_speedup_reforward"]) for e in bench[1]["mtp"])


def test_sweep_report_shows_bench_kept_with_the_results(bench, tmp_path):
    """A results dir holding bench/<model>/bench.json (sweep --bench) gets a performance section in its report."""
    import shutil

    from mtpbench.report import render_report
    from tests.synthetic import build_results

    root = build_results(tmp_path / "res")
    shutil.copytree(bench[0], root / "bench" / "tiny")
    html = render_report([root], tmp_path / "r.html").read_text()
    assert 'id="performance"' in html and "Where the time goes" in html and "AR decode parity" in html


def test_cli_bench_bad_contexts_is_one_line(tiny_agree, tmp_path):
    res = CliRunner().invoke(bench_cmd, ["--model", str(tiny_agree), "--quick", "--contexts", "a,b"])
    assert res.exit_code != 0 and "--contexts" in res.output


def test_sampling_section_measures_both_paths_and_renders(bench):
    s = bench[1]["sampling"]
    assert {r["vocab"] for r in s["rows"]} >= {248_320}
    for r in s["rows"]:
        assert _finite_positive(r["host_ms"]) and _finite_positive(r["dense_oracle_ms"]) and r["support_size"] >= 1
        assert ("device_ms" in r) == ("top_k" in r["setting"])
    assert [d["k"] for d in s["decode"]] == [0, 2]
    for d in s["decode"]:
        assert _finite_positive(d["greedy_s"]) and _finite_positive(d["sampled_s"]) and _finite_positive(d["ratio"])
        assert d["read_back_bytes_sampled"] > d["read_back_bytes_greedy"] > 0
    assert "Sampled decoding" in render_bench_html(bench[1])


def test_large_checkpoint_never_deletes_what_it_did_not_write(tmp_path):
    """An incomplete directory at the bench checkpoint's path (someone's files) is refused in one line and kept;
    a complete one is used as it is."""
    import hashlib
    from dataclasses import asdict

    from mtpbench.perf.large import LARGE, large_checkpoint
    from mtpbench.errors import UserError

    key = hashlib.sha1(json.dumps(asdict(LARGE), sort_keys=True).encode()).hexdigest()[:10]
    out = tmp_path / f"bench-large-{key}"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a complete bench checkpoint"):
        large_checkpoint(tmp_path)
    assert (out / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".tmp-large-*"))
    (out / "config.json").write_text("{}")
    assert large_checkpoint(tmp_path) == out and (out / "notes.txt").exists()


def test_cost_model_prices_each_setting_with_its_own_terms(bench):
    cm = bench[1]["cost_model"]
    settings = [(e["setting"], e["k"]) for e in cm["settings"]]
    sampled_label = "T=0.6 top_p=0.95 top_k=20"
    assert settings == [("greedy", 1), ("greedy", 2), (sampled_label, 1), (sampled_label, 2)]
    (terms,) = bench[1]["sampled_terms"]  # top level, where a sweep's cost_model.json keeps them
    assert terms["setting"] == sampled_label
    sampled = {v["k"]: v["seconds"] for v in terms["verify_s"]}
    for e in cm["settings"]:
        assert _finite_positive(e["predicted_speedup"]) and math.isfinite(e["error"])
        assert len(e["error_rounds"]) == e["rounds"] >= 1  # terms and runs timed in the same rounds
        if e["setting"] != "greedy":  # its verify term is the sampled one, not the greedy path's
            assert e["verify_s"] == sampled[e["k"]] and e["model_step_s"] >= sampled[e["k"]]
    page = render_bench_html(bench[1])
    assert "The cost model per setting" in page and sampled_label in page
