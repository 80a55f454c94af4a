"""Results written by an older mtpbench (schema 1, checked in under tests/data) still load in `report` and `card`,
converted to today's form; a sweep refuses to resume them with one line naming the schema version; a newer schema
is refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mtpbench.sweep.store import SCHEMA_VERSION, read_results

OLD = Path(__file__).parent / "data" / "schema1-sweep"


def test_schema1_results_load_converted(tmp_path):
    tables = read_results([OLD])
    runs = tables["runs"]
    assert len(runs) > 0 and set(runs["kv_bits"]) == {0}
    assert not runs["policy"].str.contains(r"\+kv").any()
    assert set(runs["model"]) == {"oldckpt"} and set(runs["model_path"]) == {"/tmp/oldckpt"}


def test_schema1_report_and_card_render(cli, tmp_path):
    old = shutil.copytree(OLD, tmp_path / "old")
    res = cli("report", old, "-o", tmp_path / "old.html")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "old.html").read_text()
    assert "oldckpt" in html and "Decode" in html
    card = cli("card", old)
    assert card.exit_code == 0 and "## MTP speculative decoding: oldckpt" in card.output


def test_schema1_dir_is_not_resumed(cli, tmp_path, tiny):
    old = shutil.copytree(OLD, tmp_path / "old")
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    res = cli("sweep", "-m", tiny, "-o", old, "--k", "1", "--temp", "0", "--repeats", "1", "--max-tokens", "4",
              "--no-report", "-q")
    assert res.exit_code == 2 and "schema 1" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before


def test_a_newer_schema_is_refused_in_one_line(cli, tmp_path):
    new = shutil.copytree(OLD, tmp_path / "new")
    manifest = json.loads((new / "manifest.json").read_text())
    (new / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    res = cli("report", new, "-o", tmp_path / "new.html")
    assert res.exit_code != 0 and f"schema {SCHEMA_VERSION + 1}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "new.html").exists()
