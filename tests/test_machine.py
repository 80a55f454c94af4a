"""The machine's state in every row: what `snapshot` reads here, when a state counts as busy, when two ABBA blocks
drift apart, that a sweep's rows keep the states, that the summary and the report warn about busy or drifting cells,
and that results written before the columns existed still load, without a warning."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mtpbench import machine
from mtpbench.cli.main import main
from mtpbench.machine import MachineState, busy_reasons, drift_warning, row_fields, states_from_row
from mtpbench.report.console import summary_of
from mtpbench.report.html import render_report
from mtpbench.sweep.store import RUNS, part_name, parts, read_results, read_table, write_part

QUIET = MachineState(load_1m=0.5, cores=8, cores_usable=8, governor="performance", cpu_freq_mhz=3000.0,
                     cpu_freq_max_mhz=3500.0, temp_c=55.0)


def test_snapshot_reads_this_machine():
    s = machine.snapshot()
    assert s.cores >= 1 and 1 <= s.cores_usable <= s.cores
    assert s.load_1m is None or s.load_1m >= 0
    assert s.cpu_freq_mhz is None or s.cpu_freq_mhz > 0
    assert s.temp_c is None or 0 < s.temp_c < 150
    assert isinstance(s.notes, tuple) and all(isinstance(n, str) and n for n in s.notes)
    # every reading it could not take is named in the notes
    if s.temp_c is None:
        assert any("temperature" in n for n in s.notes)
    if s.cpu_freq_mhz is None:
        assert any("frequency" in n for n in s.notes)
    assert len(machine.describe(s)) >= 4


def test_a_quiet_machine_gives_no_reason():
    assert busy_reasons(QUIET) == [] and busy_reasons(QUIET, QUIET) == []


@pytest.mark.parametrize("change, words", [
    ({"load_1m": 9.5}, "load 9.5 above 8 cores"),
    ({"thermal_pressure": "thermal warning level 2"}, "thermal pressure (thermal warning level 2)"),
    ({"low_power_mode": True}, "low-power mode on"),
    ({"cpu_freq_mhz": 1200.0}, "CPU at 1200 of 3500 MHz"),
    ({"temp_c": 97.0}, "CPU at 97 C"),
])
def test_busy_reasons(change, words):
    assert any(words in r for r in busy_reasons(QUIET, replace(QUIET, **change)))
    assert any(words in r for r in busy_reasons(replace(QUIET, **change)))


def test_a_nominal_pressure_and_unknown_readings_are_quiet():
    unknown = MachineState(None, 2, 2)
    assert busy_reasons(replace(QUIET, thermal_pressure="nominal"), unknown) == []
    assert busy_reasons(unknown) == []


def test_drift_warning():
    first = [100.0, 200.0, 150.0, 120.0]
    assert "30% slower" in drift_warning(first, [x * 0.7 for x in first])  # heat soak: every run 30% slower
    assert "faster" in drift_warning(first, [x * 1.3 for x in first])
    assert drift_warning(first, [101.0, 197.0, 152.0, 119.0]) is None  # noise
    assert drift_warning(first, [130.0, 140.0, 195.0, 84.0]) is None  # mean moves 0%, pairs spread ~35%
    assert drift_warning([100.0], [97.0]) is None  # under MIN_DRIFT
    assert drift_warning([100.0], [80.0]) is not None
    assert drift_warning([], []) is None and drift_warning([float("nan")], [1.0]) is None


def test_pmset_parsing():
    quiet = "Note: No thermal warning level has been recorded\nNote: No performance warning level has been recorded\n"
    assert machine.parse_pmset_therm(quiet) == "nominal"
    assert machine.parse_pmset_therm("Thermal warning level set to 2.\n") == "thermal warning level 2"
    assert machine.parse_pmset_therm("CPU_Scheduler_Limit = 100\nCPU_Speed_Limit = 70\n") == "speed limit 70%"
    assert machine.parse_pmset_therm("") is None
    assert machine.parse_pmset_low_power("Currently in use:\n lowpowermode         1\n") is True
    assert machine.parse_pmset_low_power(" lowpowermode 0\n") is False
    assert machine.parse_pmset_low_power("nothing") is None


def test_row_fields_round_trip():
    hot = replace(QUIET, load_1m=9.0, temp_c=96.0, cpu_freq_mhz=1000.0)
    row = row_fields(QUIET, hot)
    assert set(row) == set(machine.COLUMNS) and set(machine.COLUMNS) <= set(RUNS.names)
    assert row["load_start"] == 0.5 and row["load_end"] == 9.0 and row["temp_c"] == 96.0
    assert row["cpu_freq_mhz"] == 1000.0  # the worse (lower) of the two
    start, end = states_from_row(row)
    assert busy_reasons(start, end) == busy_reasons(QUIET, hot)
    assert states_from_row({"load_start": 1.0}) is None  # a row written before the columns existed


# --------------------------------------------------------------------------------------- rows, summary, report


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_agree) -> Path:
    tmp = tmp_path_factory.mktemp("machine")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": f"def f{i}(x):\n    return"})
                               + "\n" for i in range(2)))
    out = tmp / "results"
    res = CliRunner().invoke(main, ["sweep", "-m", str(tiny_agree), "--k", "1,2", "--temp", "0", "--prompts",
                                    str(prompts), "--repeats", "2", "--max-tokens", "8", "--out", str(out),
                                    "--no-report"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def test_every_row_keeps_the_machine_state(swept):
    runs = read_table(swept, "runs")
    assert runs["cores"].notna().all() and (runs["cores"] >= 1).all()
    assert runs["load_start"].notna().all() and runs["load_end"].notna().all()
    for _, cell in runs.groupby("cell_id"):  # one state per cell, on each of its runs
        assert cell["load_start"].nunique() == 1 and cell["load_end"].nunique() == 1


def _rewrite(src: Path, dest: Path, change) -> Path:
    """A copy of a results directory whose runs rows went through `change(rows)`."""
    shutil.copytree(src, dest)
    for f in parts(dest, "runs"):
        rows = pq.read_table(f).to_pylist()
        change(rows)
        write_part(dest, "runs", part_name(f), rows)
    return dest


def _quiet(rows):
    """A quiet machine, and steady speeds (this machine's own may drift: tests run beside other work)."""
    for r in rows:
        r.update(load_start=0.1, load_end=0.2, thermal_pressure=None, temp_c=None, cpu_freq_max_mhz=None,
                 decode_tok_s=100.0 + 10 * r["k"])


def test_the_summary_and_report_warn_about_a_busy_machine(swept, tmp_path):
    def busy(rows):
        _quiet(rows)
        for r in rows:
            if r["repetition"] == 1:
                r["load_end"] = r["cores"] * 2 + 0.5
    d = _rewrite(swept, tmp_path / "busy", busy)
    text = summary_of(d)
    lines = [x for x in text.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "2 of 4 cells ran on a busy machine (load" in lines[0], text
    html = render_report([d], tmp_path / "r.html").read_text()
    assert "cells ran on a busy machine" in html

    quiet = _rewrite(swept, tmp_path / "quiet", _quiet)
    assert "warning:" not in summary_of(quiet)
    assert "busy machine" not in render_report([quiet], tmp_path / "q.html").read_text()


def test_the_summary_warns_when_the_last_abba_block_drifts(swept, tmp_path):
    def soak(rows):
        _quiet(rows)
        for r in rows:
            if r["repetition"] == 1:
                r["decode_tok_s"] *= 0.6
    text = summary_of(_rewrite(swept, tmp_path / "soak", soak))
    assert "warning:" in text and "the last ABBA block ran 40% slower than the first" in text, text


def test_thermal_pressure_in_rows_warns(swept, tmp_path):
    def hot(rows):
        _quiet(rows)
        for r in rows:
            r["thermal_pressure"] = "speed limit 70%"
    text = summary_of(_rewrite(swept, tmp_path / "hot", hot))
    assert "4 of 4 cells ran on a busy machine (thermal pressure (speed limit 70%))" in text, text


def test_results_without_the_machine_columns_load_without_warning(swept, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(swept, old)
    for f in parts(old, "runs"):  # as written before the columns existed
        t = pq.read_table(f)
        pq.write_table(t.drop_columns([c for c in machine.COLUMNS if c in t.column_names]), f)
    runs = read_results([old])["runs"]
    assert len(runs) == len(read_table(swept, "runs")) and runs["cores"].isna().all()
    assert "warning:" not in summary_of(old)
    schema1 = read_results([Path(__file__).parent / "data" / "schema1-sweep"])["runs"]
    assert len(schema1) and schema1["load_start"].isna().all()
    assert pa.types.is_int32(RUNS.field("cores").type)
