"""The model card: markdown tables that parse, numbers equal to aggregates recomputed here from parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import SETTINGS, Spec, build_results, verdict

from mtpbench.errors import UserError
from mtpbench.report import render_card


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return build_results(tmp_path_factory.mktemp("card") / "res", Spec(seed=7))


@pytest.fixture(scope="module")
def runs(results) -> pd.DataFrame:
    """Read straight from parquet with pandas: an independent path from mtpbench.results/summary."""
    r = pd.read_parquet(results / "runs")
    return r[r["status"] == "ok"]


def md_tables(md: str) -> list[list[list[str]]]:
    """Every markdown table as a list of rows of cell texts (header first), via markdown-it-py's table rule."""
    tokens = MarkdownIt().enable("table").parse(md)
    out, table, row = [], None, None
    for t in tokens:
        if t.type == "table_open":
            table = []
        elif t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            table.append(row)
            row = None
        elif t.type == "table_close":
            out.append(table)
    return out


def test_card_tables_parse_and_match_recomputed_numbers(results, runs):
    md = render_card(results)
    tabs = md_tables(md)
    mode_tables = [t for t in tabs if t[0] == ["Mode", "Decode tok/s", "Speedup"]]
    assert len(mode_tables) == len(SETTINGS)
    for setting, table in zip(sorted(SETTINGS, key=lambda s: md.index(f"**Decode throughput, `{s}`**")), mode_tables):
        sub = runs[runs["setting"] == setting]
        ar = sub[sub["mode"] == "ar"]["decode_tok_s"].mean()
        assert table[1][0] == "AR" and table[1][1] == f"{ar:.1f}"
        for row in table[2:]:
            k = int(row[0].split("=")[1])
            mtp = sub[(sub["mode"] == "mtp") & (sub["k"] == k)]
            assert row[1] == f"{mtp['decode_tok_s'].mean():.1f}"
            # Speedup: geometric mean over prompts of per-prompt mean MTP / mean AR tok/s.
            a = sub[sub["mode"] == "ar"].groupby("prompt_id")["decode_tok_s"].mean()
            m = mtp.groupby("prompt_id")["decode_tok_s"].mean()
            ratio = float(np.exp(np.mean(np.log(m / a.loc[m.index]))))
            assert row[2].startswith(f"{ratio:.2f}×"), row
            lo, hi = (float(x) for x in row[2].split("[")[1].rstrip("]").split(","))
            assert lo <= ratio <= hi

    (acc,) = [t for t in tabs if t[0] == ["Setting", "K", "Depth", "Acceptance", "Survival"]]
    for setting, k, depth, acceptance, survival in acc[1:]:
        g = runs[(runs["setting"] == setting) & (runs["k"] == int(k))]
        d = int(depth) - 1
        steps = g["verify_steps"].sum()
        accepted = sum(int(a[d]) for a in g["accepted_at_depth"])
        reached = steps if d == 0 else sum(int(a[d - 1]) for a in g["accepted_at_depth"])
        assert acceptance.startswith(f"{accepted / reached:.3f} [")
        assert survival.startswith(f"{accepted / steps:.3f} [")

    (formats,) = [t for t in tabs if t[0] == ["Component", "Format"]]
    assert ["mlp", "q4 g64"] in formats and ["mtp.fc", "bf16"] in formats


def test_card_lines(results):
    md = render_card(results)
    sampling = next(ln for ln in md.splitlines() if ln.startswith("**Sampling:**"))
    assert "`greedy` = temperature 0, top_p 1, top_k off" in sampling
    assert "`T=0.6 top_p=0.95 top_k=20` = temperature 0.6, top_p 0.95, top_k 20" in sampling
    assert "**Hardware and versions:** cpu on ci-runner" in md and "mlx 0.29.0" in md and "git abc1234" in md
    assert "**Distribution preservation:** not tested" in md
    assert "1 failed run(s)" in md


def test_card_json_has_the_same_numbers(results, runs):
    card = json.loads(render_card(results, fmt="json"))
    ar = next(r for r in card["throughput"] if r["mode"] == "ar" and r["setting"] == "greedy")
    expect = runs[(runs["mode"] == "ar") & (runs["setting"] == "greedy")]["decode_tok_s"].mean()
    assert ar["tok_s"] == pytest.approx(expect)
    d1 = next(r for r in card["acceptance"] if r["setting"] == "greedy" and r["k"] == 2 and r["depth"] == 1)
    g = runs[(runs["setting"] == "greedy") & (runs["k"] == 2)]
    assert d1["acceptance"] == pytest.approx(sum(a[0] for a in g["accepted_at_depth"]) / g["verify_steps"].sum())
    assert card["preservation"]["tested"] is False
    md = render_card(results)
    assert f"{ar['tok_s']:.1f}" in md


def test_unknown_model_raises_user_error(results):
    with pytest.raises(UserError, match="unknown model 'nope'; available: tiny-mtp"):
        render_card(results, model="nope")
    assert "tiny-mtp" in render_card(results, model="tiny-mtp")


def test_several_models_need_a_choice(tmp_path):
    a = build_results(tmp_path / "a", Spec(model="m-a", ks=(1,), settings=("greedy",), seed=1))
    build_results(tmp_path / "b", Spec(model="m-b", ks=(1,), settings=("greedy",), seed=2))
    # Two models in one directory: copy b's runs part next to a's.
    for p in (tmp_path / "b" / "runs").glob("*.parquet"):
        (a / "runs" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(UserError, match="m-a, m-b"):
        render_card(a)
    assert "## MTP speculative decoding: m-b" in render_card(a, model="m-b")


def test_card_reports_verdicts_without_overclaiming(tmp_path):
    spec = Spec(ks=(1, 2), settings=("greedy",), seed=3)
    spec.verdicts = [verdict(spec, 1, "greedy", "pit_ks", 0.4, False),
                     verdict(spec, 1, "greedy", "pit_ks", 1e-9, True, control="argmax_accept")]
    md = render_card(build_results(tmp_path / "v", spec))
    line = next(ln for ln in md.splitlines() if ln.startswith("**Distribution preservation:**"))
    assert "K=1 `greedy`: not rejected (pit_ks" in line
    assert "not tested: K=2 `greedy`" in line
    assert "control tests: 1 of 1 rejected" in line
