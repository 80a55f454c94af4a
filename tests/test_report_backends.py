"""Backends side by side: the reference decoder against a server's AR and MTP endpoints, in the report and the card.

Expected numbers are recomputed here from the parquet files with plain pandas (not through mtpbench.stats), and
the server rows are written in shuffled order with one prompt missing from the AR endpoint at concurrency 2, so a
speedup paired by row order, across concurrency levels or across prompts would come out different.
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import (
    SETTINGS,
    Spec,
    add_server_runs,
    build_results,
    build_runs,
    server_rows,
)

from mtpbench.report import backends, render_card, render_report, tables
from mtpbench.report.load import load
from mtpbench.stats import summary
from tests.test_card import md_tables
from tests.test_report import Resources, browser_page

SPEC = Spec(name="mixed", backend="reference", seed=11)
SPEEDUP = {"code": 2.0, "chat": 1.3, "math": 1.6}  # the MTP endpoint's gain per prompt category (with noise)
MISSING = ("math-1", 2)  # (prompt, concurrency) the AR endpoint has no rows for
CELLS = [(s, c) for s in SETTINGS for c in (1, 2)]


def _server_parts(spec: Spec) -> dict[str, list[dict]]:
    ar = [r for r in server_rows(spec, "srv-ar", "ar", seed=1)
          if (r["prompt_id"], r["concurrency"]) != MISSING]
    mtp = server_rows(spec, "srv-mtp", "mtp", positions=3, speedup=SPEEDUP, failed=1, seed=2)
    return {"srv-ar": ar, "srv-mtp": mtp}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """mixed: reference + both endpoints in one results dir; ref: the same reference rows alone; srv: servers alone."""
    root = tmp_path_factory.mktemp("backends")
    out = {"mixed": build_results(root / "mixed", SPEC), "ref": build_results(root / "ref", SPEC)}
    srv_spec = Spec(name="servers", backend="reference", seed=11)
    for i, (name, rows) in enumerate(_server_parts(SPEC).items()):
        add_server_runs(out["mixed"], SPEC, rows, name, shuffle_seed=i)
        out["srv"] = add_server_runs(root / "srv", srv_spec, rows, name, shuffle_seed=10 + i)
    return out


@pytest.fixture(scope="module")
def runs(dirs) -> pd.DataFrame:
    """Straight from parquet with pandas, in file order (shuffled server rows)."""
    return pd.read_parquet(dirs["mixed"] / "runs")


@pytest.fixture(scope="module")
def html(dirs, tmp_path_factory) -> Path:
    return render_report([dirs["mixed"]], tmp_path_factory.mktemp("out") / "mixed.html")


class Tables(HTMLParser):
    """Every <table> of an HTML fragment as rows of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def section_tables(html: str, sid: str) -> list[list[dict[str, str]]]:
    """The tables of section `sid` as lists of {header: cell} rows."""
    parser = Tables()
    parser.feed(html.split(f'<section id="{sid}">')[1].split("</section>")[0])
    return [[dict(zip(t[0], row)) for row in t[1:]] for t in parser.tables]


def per_prompt(runs: pd.DataFrame, backend: str, setting: str, concurrency: int) -> pd.Series:
    ok = runs[(runs["status"] == "ok") & (runs["backend"] == backend) & (runs["setting"] == setting)
              & (runs["concurrency"] == concurrency)]
    return ok.groupby("prompt_id")["decode_tok_s"].mean()


def paired_ratios(runs: pd.DataFrame, setting: str, concurrency: int) -> pd.Series:
    """Per prompt: mean MTP-endpoint tok/s / mean AR-endpoint tok/s at one concurrency (prompts both have)."""
    mtp, ar = per_prompt(runs, "srv-mtp", setting, concurrency), per_prompt(runs, "srv-ar", setting, concurrency)
    common = mtp.index.intersection(ar.index)
    return (mtp[common] / ar[common]).sort_index()


def geomean(x) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(x, dtype=float)))))


def server_survival(runs: pd.DataFrame, setting: str) -> list[float]:
    """Accepted per position summed over the batches that carry counters, over the drafts of those batches."""
    g = runs[(runs["status"] == "ok") & (runs["backend"] == "srv-mtp") & (runs["setting"] == setting)
             & runs["accepted_at_depth"].notna()]
    return [sum(int(a[d]) for a in g["accepted_at_depth"]) / g["verify_steps"].sum() for d in range(3)]


def reference_survival(runs: pd.DataFrame, setting: str, k: int) -> list[float]:
    g = runs[(runs["status"] == "ok") & (runs["backend"] == "reference") & (runs["setting"] == setting)
             & (runs["k"] == k)]
    return [sum(int(a[d]) for a in g["accepted_at_depth"]) / g["verify_steps"].sum() for d in range(k)]


def test_backends_section_names_reference_and_both_servers(html):
    text = html.read_text()
    assert text.count('<section id="backends">') == 1 and 'href="#backends"' in text
    table, _ = section_tables(text, "backends")
    assert {r["Backend"] for r in table} == {"reference", "srv-ar", "srv-mtp"}
    for setting in SETTINGS:
        ref = [r for r in table if r["Backend"] == "reference" and r["Setting"] == setting]
        assert [(r["Mode"], r["K"]) for r in ref] == [("AR", "—"), ("MTP", "1"), ("MTP", "2"), ("MTP", "3")]
        assert all(r["AR baseline"] == "own AR mode" for r in ref[1:])
        srv = [r for r in table if r["Backend"] == "srv-mtp" and r["Setting"] == setting]
        assert [(r["Mode"], r["K"], r["Concurrency"], r["AR baseline"]) for r in srv] == [
            ("MTP", "3", "1", "srv-ar"), ("MTP", "3", "2", "srv-ar")]
        ar = [r for r in table if r["Backend"] == "srv-ar" and r["Setting"] == setting]
        assert [r["Speedup over AR [95% CI]"] for r in ar] == ["1.00× (baseline)"] * 2
    # The failed request is counted on its row and excluded from the numbers.
    failed = [r for r in table if r["Backend"] == "srv-mtp" and r["Setting"] == "greedy" and r["Concurrency"] == "1"]
    assert failed[0]["Runs ok / failed"] == "12 / 1"


@pytest.mark.parametrize(("setting", "concurrency"), CELLS)
def test_server_speedup_is_the_geometric_mean_of_paired_per_prompt_ratios(dirs, runs, html, setting, concurrency):
    ratios = paired_ratios(runs, setting, concurrency)
    expected = geomean(ratios)
    assert len(ratios) == (5 if concurrency == MISSING[1] else 6)
    if concurrency == MISSING[1]:  # the data tells pairings apart: by row order it would come out different
        ok = runs[(runs["status"] == "ok") & (runs["setting"] == setting) & (runs["concurrency"] == concurrency)]
        m, a = (ok[ok["backend"] == b]["decode_tok_s"].to_numpy() for b in ("srv-mtp", "srv-ar"))
        assert abs(geomean(m[:len(a)] / a[:len(m)]) / expected - 1) > 0.05

    sp = backends.comparison(load([dirs["mixed"]]).runs)
    (row,) = sp[(sp["backend"] == "srv-mtp") & (sp["setting"] == setting) & (sp["concurrency"] == concurrency)
                ].to_dict("records")
    assert row["speedup"] == pytest.approx(expected, rel=1e-12)
    assert row["n_prompts"] == len(ratios) and row["baseline"] == "srv-ar"
    # The CI resamples exactly these per-prompt ratios (a bijective mispairing keeps the mean, not the spread).
    assert (row["speedup_lo"], row["speedup_hi"]) == pytest.approx(
        summary.bootstrap_ci(ratios.to_numpy(), summary.geomean), rel=1e-12)

    table, _ = section_tables(html.read_text(), "backends")
    (shown,) = [r for r in table if r["Backend"] == "srv-mtp" and r["Setting"] == setting
                and r["Concurrency"] == str(concurrency)]
    assert shown["Speedup over AR [95% CI]"].startswith(f"{expected:.2f}× [")
    assert shown["Prompts"] == str(len(ratios))
    tok_s = runs[(runs["status"] == "ok") & (runs["backend"] == "srv-mtp") & (runs["setting"] == setting)
                 & (runs["concurrency"] == concurrency)]["decode_tok_s"].mean()
    assert shown["Decode tok/s"] == f"{tok_s:.1f}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_server_survival_by_position_is_counters_over_drafts_beside_reference_k3(runs, html, setting):
    _, surv = section_tables(html.read_text(), "backends")
    assert list(surv[0]) == ["Setting", "K", "Depth", "reference", "srv-mtp"]
    rows = [r for r in surv if r["Setting"] == setting]
    assert [(r["K"], r["Depth"]) for r in rows] == [("3", "1"), ("3", "2"), ("3", "3")]
    for r, srv, ref in zip(rows, server_survival(runs, setting), reference_survival(runs, setting, 3)):
        assert r["srv-mtp"].startswith(f"{srv:.3f} [")
        assert r["reference"].startswith(f"{ref:.3f} [")
    acc = summary.acceptance_by_depth(runs[runs["setting"] == setting])
    got = acc[acc["backend"] == "srv-mtp"].sort_values("depth")
    assert list(got["k"]) == [3, 3, 3]
    assert list(got["survival"]) == pytest.approx(server_survival(runs, setting), rel=1e-12)


def test_reference_rows_are_unchanged_by_server_rows(dirs):
    mixed, ref = load([dirs["mixed"]]).runs, load([dirs["ref"]]).runs
    only = mixed[mixed["backend"] == "reference"]

    def same(f):
        a, b = f(mixed), f(ref)
        a = a[a["backend"] == "reference"].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b.reset_index(drop=True), check_dtype=False)

    same(tables.acceptance)
    same(tables.mode_table)
    same(lambda r: summary.speedup_table(r, tables.BY))
    sp = summary.speedup_table(ref, tables.BY)
    cmp = backends.comparison(mixed)
    cmp = cmp[(cmp["backend"] == "reference") & (cmp["mode"] == "mtp")].sort_values(["setting", "k"])
    assert list(cmp["speedup"]) == pytest.approx(list(sp.sort_values(["setting", "k"])["speedup"]), rel=1e-12)
    assert len(only) == len(ref)


def test_card_has_the_backend_comparison(dirs, runs):
    md = render_card(dirs["mixed"])
    assert "**Backends side by side**" in md
    tabs = md_tables(md)
    (comp,) = [t for t in tabs if "AR baseline" in t[0]]
    rows = [dict(zip(comp[0], r)) for r in comp[1:]]
    assert {r["Backend"] for r in rows} == {"reference", "srv-ar", "srv-mtp"}
    for setting, c in CELLS:
        (r,) = [r for r in rows if r["Backend"] == "srv-mtp" and r["Setting"] == setting
                and r["Concurrency"] == str(c)]
        assert r["Speedup over AR [95% CI]"].startswith(f"{geomean(paired_ratios(runs, setting, c)):.2f}× [")
        assert r["AR baseline"] == "srv-ar" and r["K"] == "3"
    (surv,) = [t for t in tabs if t[0] == ["Setting", "K", "Depth", "reference", "srv-mtp"]]
    for setting, k, depth, ref, srv in surv[1:]:
        assert srv.startswith(f"{server_survival(runs, setting)[int(depth) - 1]:.3f} [")
        assert ref.startswith(f"{reference_survival(runs, setting, int(k))[int(depth) - 1]:.3f} [")
    card = json.loads(render_card(dirs["mixed"], fmt="json"))
    srv = [r for r in card["backends"] if r["backend"] == "srv-mtp"]
    assert {(r["setting"], r["concurrency"]): r["speedup"] for r in srv} == pytest.approx(
        {(s, c): geomean(paired_ratios(runs, s, c)) for s, c in CELLS}, rel=1e-12)
    # The sampling line still names the reference decoder's draft temperature (servers leave it empty).
    assert "`greedy` = temperature 0, top_p 1, top_k off, min_p 0, draft temperature 0," in md


def test_one_backend_has_no_backends_section(dirs, tmp_path):
    html = render_report([dirs["ref"]], tmp_path / "ref.html").read_text()
    assert 'id="backends"' not in html and "Backends side by side" not in html
    assert "Backends side by side" not in render_card(dirs["ref"])


def test_merged_results_dirs_compare_backends(dirs, runs, tmp_path):
    """The usual case: a reference sweep and a server sweep in two directories, merged by the report."""
    html = render_report([dirs["ref"], dirs["srv"]], tmp_path / "merged.html").read_text()
    table, surv = section_tables(html, "backends")
    assert {(r["Source"], r["Backend"]) for r in table} == {("mixed", "reference"), ("servers", "srv-ar"),
                                                             ("servers", "srv-mtp")}
    for setting, c in CELLS:
        (r,) = [r for r in table if r["Backend"] == "srv-mtp" and r["Setting"] == setting
                and r["Concurrency"] == str(c)]
        assert r["Speedup over AR [95% CI]"].startswith(f"{geomean(paired_ratios(runs, setting, c)):.2f}× [")
    assert list(surv[0])[3:] == ["reference", "srv-mtp"]


def _endpoint(model: str, backend: str, mode: str) -> list[dict]:
    spec = Spec(model=model, settings=("greedy",), prompts_per_category=1, repetitions=1)
    return server_rows(spec, backend, mode, concurrency=(1,), speedup=1.5, seed=len(backend))


def test_pairing_rule_same_model_else_the_only_ar_endpoint():
    ref = pd.DataFrame(build_runs(Spec(model="x", backend="reference", settings=("greedy",), seed=4))[0])
    four = pd.DataFrame(_endpoint("x", "ar-x", "ar") + _endpoint("y", "ar-y", "ar") + _endpoint("x", "mtp-x", "mtp")
                        + _endpoint("z", "mtp-z", "mtp"))
    sp = summary.server_speedup_table(pd.concat([ref, four], ignore_index=True))
    # mtp-x pairs with the AR endpoint serving its model; mtp-z has none and two AR endpoints: no speedup stated;
    # the reference decoder (both modes) is never a server's baseline nor paired with one.
    assert list(zip(sp["backend"], sp["baseline_backend"])) == [("mtp-x", "ar-x")]
    one_ar = four[four["backend"] != "ar-x"]
    sp = summary.server_speedup_table(pd.concat([ref, one_ar], ignore_index=True))
    assert sorted(zip(sp["backend"], sp["baseline_backend"], sp["baseline_model"])) == [
        ("mtp-x", "ar-y", "y"), ("mtp-z", "ar-y", "y")]
    assert (sp["n_prompts"] == 3).all()


def test_report_with_backends_is_self_contained_and_renders_in_headless_browser(html):
    parser = Resources()
    parser.feed(html.read_text())
    assert all(ref.startswith("#") for ref in parser.refs)
    assert len(parser.ids) == len(set(parser.ids))
    with browser_page(html, 800) as (page, errors, requests):
        section = page.locator("section#backends")
        assert section.count() == 1 and section.is_visible()
        assert section.locator("table").count() == 2
        assert page.evaluate("document.documentElement.scrollWidth") <= 800
    assert errors == [] and requests == [html.resolve().as_uri()]


def test_sweep_console_summary_lists_servers_and_their_speedup(dirs):
    """The summary printed at the end of a sweep names each endpoint and the MTP-over-AR endpoint speedup."""
    from mtpbench.report.console import sweep_summary
    from mtpbench.sweep.store import read_table

    for name in ("mixed", "srv"):
        text = sweep_summary(read_table(dirs[name], "runs"))
        assert "Server endpoints:" in text and "srv-ar" in text and "srv-mtp" in text
        assert "srv-mtp over srv-ar" in text
