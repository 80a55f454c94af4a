"""The sweep: exact rows, readable by pandas/pyarrow/DuckDB, consistent tables, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtpbench.model.checkpoint import load
from mtpbench.sweep.store import SCHEMA_VERSION, read_table


def _prompt_file(tmp_path: Path, n: int = 2, name: str = "mini") -> Path:
    f = tmp_path / f"{name}.jsonl"
    rows = [{"id": f"p{i}", "category": "code" if i % 2 else "chat", "prompt": f"def f{i}(x):\n    return x +"}
            for i in range(n)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, tiny_agree, tiny_agree2):
    """2 models x K 1..3 x temps 0, 0.7 x 2 prompts x 2 repeats."""
    from click.testing import CliRunner

    from mtpbench.cli.main import main

    tmp = tmp_path_factory.mktemp("sweep")
    prompts = _prompt_file(tmp)
    out = tmp / "results"
    res = CliRunner().invoke(main, ["sweep", "-m", str(tiny_agree), "-m", str(tiny_agree2), "--k", "1..3",
                                    "--temp", "0,0.7", "--prompts", str(prompts), "--repeats", "2",
                                    "--max-tokens", "24", "--out", str(out), "--no-report"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res


def test_sweep_writes_exactly_the_expected_rows(small_sweep, tiny_agree, tiny_agree2):
    out, res = small_sweep
    runs = read_table(out, "runs")
    assert len(runs) == 2 * 2 * 2 * 2 * (1 + 3)
    assert runs["run_id"].is_unique
    assert (runs["status"] == "ok").all()
    assert sorted(runs["k"].unique()) == [0, 1, 2, 3]
    assert set(runs.loc[runs["mode"] == "ar", "k"]) == {0}
    counts = runs.groupby(["model", "temperature", "prompt_id", "repetition", "mode"]).size()
    assert set(counts.xs("ar", level="mode")) == {1} and set(counts.xs("mtp", level="mode")) == {3}
    for col in ("run_id", "model", "mode", "k", "temperature", "top_p", "top_k", "draft_temperature", "prompt_set",
                "prompt_id", "repetition", "seed", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s",
                "decode_tok_s", "drafted_tokens", "accepted_tokens", "verify_steps", "mean_acceptance_length",
                "peak_memory_bytes"):
        assert col in runs.columns, col
    assert (runs["decode_tok_s"] > 0).all() and runs["blas"].notna().all() and runs["git_sha"].notna().all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == 2 and manifest["provenance"]["mlx_version"]
    assert set(runs["model"]) == {"agree", "agree2"}  # short names; the full path is in model_path
    assert set(runs["model_path"]) == {str(tiny_agree.resolve()), str(tiny_agree2.resolve())}
    assert "results:" in res.output and "speedup" in res.output


def test_roofline_columns(small_sweep, tiny_agree):
    """Weight bytes per token: the trunk's for AR, trunk + K draft steps over tau for MTP; the machine's bandwidth."""
    from mtpbench.model.roofline import draft_step_bytes, weight_bytes

    b = load(tiny_agree)
    trunk, draft = weight_bytes(b), draft_step_bytes(b)
    runs = read_table(small_sweep[0], "runs")
    ok = runs[(runs["status"] == "ok") & (runs["model_path"] == str(tiny_agree.resolve()))]
    ar, mtp = ok[ok["mode"] == "ar"], ok[ok["mode"] == "mtp"]
    assert (ar["weight_bytes_per_token"] == trunk).all()
    want = (trunk + mtp["k"] * draft) / mtp["mean_acceptance_length"]
    assert np.allclose(mtp["weight_bytes_per_token"], want)
    assert (ok["memory_gb_s"] > 0).all() and ok["memory_gb_s"].nunique() == 1


def test_results_read_with_pandas_pyarrow_and_duckdb(small_sweep):
    out, _ = small_sweep
    for table in ("runs", "steps", "tokens", "verdicts"):
        n_pandas = len(pd.read_parquet(out / table))
        n_arrow = pq.read_table(out / table).num_rows
        n_duck = duckdb.connect().execute(f"select count(*) from read_parquet('{out / table}/*.parquet')").fetchall()[0][0]
        assert n_pandas == n_arrow == n_duck > 0, table


def test_acceptance_columns_agree_with_steps_table(small_sweep):
    out, _ = small_sweep
    runs = read_table(out, "runs")
    steps = read_table(out, "steps")
    tokens = read_table(out, "tokens")
    mtp = runs[runs["mode"] == "mtp"].set_index("run_id")
    acc = steps.groupby("run_id")["accepted"].sum()
    assert (acc.reindex(mtp.index, fill_value=0) == mtp["accepted_tokens"]).all()
    per_depth = steps[steps["accepted"]].groupby(["run_id", "depth"]).size()
    for run_id, row in mtp.iterrows():
        for d, a in enumerate(row["accepted_at_depth"], start=1):
            assert per_depth.get((run_id, d), 0) == a
        # K drafts per step, capped at the tokens left: only the last steps (left < K, at most K - 1) draft fewer
        k, steps_n, depths = row["k"], row["verify_steps"], list(row["drafted_at_depth"])
        assert row["drafted_tokens"] == sum(depths) and depths[0] == steps_n and len(depths) == k
        assert 0 <= k * steps_n - row["drafted_tokens"] <= k * (k - 1) // 2
        assert row["mean_acceptance_length"] == pytest.approx(1 + row["accepted_tokens"] / row["verify_steps"])
    generated = runs.set_index("run_id")["generated_tokens"]
    assert (tokens.groupby("run_id").size().reindex(generated.index) == generated).all()
    assert mtp["accepted_tokens"].sum() > 0


def test_greedy_rows_match_ar_and_sampled_cells_get_verdicts(small_sweep):
    out, _ = small_sweep
    runs = read_table(out, "runs")
    greedy = runs[runs["temperature"] == 0]
    for _, g in greedy.groupby("cell_id"):
        assert g["output_hash"].nunique() == 1
    verdicts = read_table(out, "verdicts")
    assert set(verdicts["test"]) == {"greedy_identity", "pit_ks", "logprob_score", "acceptance_calibration",
                                     "support", "fresh_pit_ks", "fresh_logprob_score", "pit_accepted", "pit_residual",
                                     "pit_bonus", "acceptance_excess", "acceptance_given_draft", "drift", "oracle"}
    sampled = verdicts[verdicts["temperature"] > 0]
    assert set(sampled.loc[sampled["family"] == "diagnostic", "test"]) == {"pit_ks", "logprob_score", "drift"}
    # the preservation family decides the verdict: never rejected for the exact rule. The other 40-odd tests
    # (acceptance, diagnostics; no correction across them) reject by chance under some seeds: with seeds derived
    # from the cells' identity (issue 32), seed 0 gives three (diagnostics of K=1 cells of both models, which share
    # the random stream) and seed 2 one, seeds 1 and 3 none
    assert not verdicts.loc[verdicts["family"] == "preservation", "rejected"].any()
    assert verdicts["rejected"].sum() <= 3


def _sweep_cmd(model: Path, prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mtpbench", "sweep", "-m", str(model), "--k", "1..2", "--temp", "0,0.7",
            "--prompts", str(prompts), "--repeats", "3", "--max-tokens", "24", "--out", str(out), "--quiet",
            "--no-report"]


def test_sigkill_then_rerun_gives_the_same_run_ids_without_duplicates(tmp_path, tiny_agree):
    prompts = _prompt_file(tmp_path, n=3)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_sweep_cmd(tiny_agree, prompts, full), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_sweep_cmd(tiny_agree, prompts, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "runs").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # somewhere in a later cell, maybe mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_table(killed, "runs")
    assert 0 < len(partial) < len(read_table(full, "runs")), "the kill should land mid-sweep"
    rerun = subprocess.run(_sweep_cmd(tiny_agree, prompts, killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    a, b = read_table(full, "runs"), read_table(killed, "runs")
    assert b["run_id"].is_unique and set(a["run_id"]) == set(b["run_id"])
    for table in ("steps", "tokens"):
        t = read_table(killed, table)
        assert not t.duplicated(["run_id", "step", "depth"] if table == "steps" else ["run_id", "index"]).any()
        assert set(t["run_id"]) <= set(b["run_id"])
    greedy = a[a["temperature"] == 0].set_index("run_id")["output_hash"]
    assert (b.set_index("run_id").loc[greedy.index, "output_hash"] == greedy).all()
    assert not list(killed.rglob(".tmp-*"))


def test_rerun_resumes_and_a_different_spec_is_refused(cli, tmp_path, tiny_agree):
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "r"
    base = ["sweep", "-m", tiny_agree, "--k", "1", "--temp", "0", "--prompts", prompts, "--repeats", "1",
            "--max-tokens", "8", "--out", out, "--no-report"]
    assert cli(*base).exit_code == 0
    again = cli(*base)
    assert again.exit_code == 0 and "resumed: 2 of 2 cells were already done" in again.stdout
    assert len(read_table(out, "runs")) == 4
    other = cli(*base[:-3], "--max-tokens", "9", "--out", out, "--no-report")
    assert other.exit_code != 0 and "holds a different sweep (differs in: max_tokens)" in other.stderr


def test_toml_sweep_file_with_cli_override(cli, tmp_path, tiny_agree):
    prompts = _prompt_file(tmp_path)
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'model = ["{tiny_agree}"]\nk = "1..2"\ntemp = [0.0]\nprompts = ["{prompts}"]\n'
                   f'repeats = 1\nmax_tokens = 12\n')
    out = tmp_path / "toml"
    res = cli("sweep", "--config", cfg, "--max-tokens", "6", "--out", out, "--no-report", "--quiet")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert sorted(runs["k"].unique()) == [0, 1, 2] and (runs["max_tokens"] == 6).all()


def _bad(cli, tmp_path, tiny_agree, *args):
    out = tmp_path / "bad-out"
    res = cli("sweep", "-m", tiny_agree, "--out", out, "--no-report", *args)
    assert res.exit_code != 0
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists(), "a failed sweep must leave no results dir behind"
    return res.stderr


def test_bad_sweep_input(cli, tmp_path, tiny_agree):
    prompts = str(_prompt_file(tmp_path))
    assert "empty range" in _bad(cli, tmp_path, tiny_agree, "--k", "1..0", "--prompts", prompts)
    assert "expected a depth" in _bad(cli, tmp_path, tiny_agree, "--k", "x", "--prompts", prompts)
    assert "out of range" in _bad(cli, tmp_path, tiny_agree, "--k", "0", "--prompts", prompts)
    assert "unknown prompt set 'nope'" in _bad(cli, tmp_path, tiny_agree, "--prompts", "nope")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty prompt file" in _bad(cli, tmp_path, tiny_agree, "--prompts", str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "b", "category": \n')
    assert f"{broken}:2: malformed JSON" in _bad(cli, tmp_path, tiny_agree, "--prompts", str(broken))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "l", "category": "c", "prompt": "x y " * 3000}) + "\n")
    assert "context of 4096" in _bad(cli, tmp_path, tiny_agree, "--prompts", str(long))
    assert "--repeats must be >= 1" in _bad(cli, tmp_path, tiny_agree, "--repeats", "-1", "--prompts", prompts)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = cli("sweep", "-m", tiny_agree, "--prompts", prompts, "--out", blocker / "sub", "--no-report")
    assert res.exit_code != 0 and "cannot write results" in res.stderr and "Traceback" not in res.stderr


def test_policy_axis_sweep_renders_one_report_comparing_policies(cli, tmp_path, tiny_agree):
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "policies"
    res = cli("sweep", "-m", tiny_agree, "--policy", "as-is,q8,q4+mtp-int4", "--k", "1..2", "--temp", "0",
              "--prompts", prompts, "--repeats", "1", "--max-tokens", "16", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert set(runs["policy"]) == {"as-is", "q8", "q4+mtp-int4"} and len(runs) == 3 * 2 * 3
    for _, g in runs[runs["temperature"] == 0].groupby("cell_id"):
        assert g["output_hash"].nunique() == 1  # greedy MTP == greedy AR under every policy
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("q4 g64" in str(m["formats"]) for m in manifest["models"].values())
    report = cli("report", out, "-o", tmp_path / "p.html")
    assert report.exit_code == 0
    html = (tmp_path / "p.html").read_text()
    assert 'id="compare-policy"' in html and "q4+mtp-int4" in html


def test_kv_cache_bits_axis_compares_quantized_caches(cli, tmp_path, tiny_kv, tiny_agree):
    """--kv-bits 0,8,4: one policy point per cache precision, greedy MTP == AR in each, one report comparing them."""
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "kv"
    res = cli("sweep", "-m", tiny_kv, "--kv-bits", "0,8,4", "--k", "1..2", "--temp", "0", "--prompts", prompts,
              "--repeats", "1", "--max-tokens", "24", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert set(zip(runs["policy"], runs["kv_bits"])) == {("as-is", 0), ("as-is", 8), ("as-is", 4)}  # its own axis
    assert runs["cell_id"].nunique() == 3 * runs["prompt_id"].nunique()
    for _, g in runs.groupby("cell_id"):
        assert g["output_hash"].nunique() == 1  # greedy MTP == greedy AR with every cache precision
    assert runs[runs["mode"] == "mtp"]["accepted_tokens"].sum() > 0
    report = cli("report", out, "-o", tmp_path / "kv.html")
    html = (tmp_path / "kv.html").read_text()
    assert report.exit_code == 0 and 'id="compare-kv_bits"' in html and "KV-cache bits" in html
    # Refused up front, one line, exit 2, nothing written: bits mlx cannot store, heads it cannot group.
    assert "KV-cache bits must be 0" in _bad(cli, tmp_path, tiny_kv, "--kv-bits", "7", "--prompts", str(prompts))
    assert "not a multiple of 32" in _bad(cli, tmp_path, tiny_agree, "--kv-bits", "8", "--prompts", str(prompts))


def test_thinking_is_an_axis_of_the_chat_template(cli, tmp_path, tiny_agree):
    prompts = tmp_path / "chatty.jsonl"
    prompts.write_text(json.dumps({"id": "c1", "category": "chat",
                                   "messages": [{"role": "user", "content": "Say hi"}]}) + "\n")
    out = tmp_path / "thinking"
    res = cli("sweep", "-m", tiny_agree, "--thinking", "on,off", "--k", "1", "--temp", "0", "--prompts", prompts,
              "--repeats", "1", "--max-tokens", "8", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    runs = read_table(out, "runs")
    assert set(runs["thinking"]) == {"on", "off"} and len(runs) == 4
    lengths = runs.groupby("thinking")["prompt_tokens"].first()
    assert lengths["off"] > lengths["on"]  # "off" closes an empty <think></think> block in the prompt


def test_ctrl_c_during_a_write_leaves_the_whole_part_and_no_temporary_file(tmp_path):
    """An interrupt landing mid-write is held until the rename is done, then delivered as KeyboardInterrupt."""
    from mtpbench.atomic import write_json

    real_dumps = json.dumps

    def interrupted_dump(obj):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the temporary file is open
        return real_dumps(obj)

    target = tmp_path / "out" / "manifest.json"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    json.dumps = lambda obj, **kw: interrupted_dump(obj) if obj == {"a": 1} else real_dumps(obj, **kw)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_json(target, {"a": 1})
    finally:
        json.dumps = real_dumps
        signal.signal(signal.SIGINT, previous)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]
