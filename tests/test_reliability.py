"""Hostile and careless use: what a user already has is never deleted or corrupted, and bad input is one line.

Every case here was once a real failure (issue 17): each test reproduces it as a user would meet it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _prompts(tmp_path: Path) -> Path:
    f = tmp_path / "mini.jsonl"
    f.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    return f


@pytest.fixture(scope="module")
def bad_model(tmp_path_factory, tiny) -> Path:
    """A checkpoint whose config no longer matches its weights: the trunk fails to load after the dir is made."""
    import shutil

    bad = tmp_path_factory.mktemp("bad") / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _sweep(cli, model: Path, out: Path, prompts: Path):
    return cli("sweep", "-m", model, "-o", out, "--k", "1", "--temp", "0", "--max-tokens", "8", "--repeats", "1",
               "--prompts", prompts, "--no-report", "--quiet")


def test_a_failed_sweep_never_deletes_a_directory_the_user_had(cli, tmp_path, bad_model):
    prompts = _prompts(tmp_path)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = _sweep(cli, bad_model, mine, prompts)
    assert res.exit_code == 2 and "not an mtpbench results directory" in res.stderr
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"  # an empty directory the user made is taken, and kept when the run fails
    empty.mkdir()
    res = _sweep(cli, bad_model, empty, prompts)
    assert res.exit_code == 2 and "does not load" in res.stderr
    assert empty.is_dir() and not any(empty.iterdir())

    new = tmp_path / "new" / "deeper"  # directories this run created are removed again, and only those
    res = _sweep(cli, bad_model, new, prompts)
    assert res.exit_code == 2 and not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_the_working_directory_and_home_are_refused_as_results_dirs(cli, tmp_path, tiny, monkeypatch):
    prompts = _prompts(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "code.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path / "work")
    res = _sweep(cli, tiny, Path("."), prompts)
    assert res.exit_code == 2 and "choose another --out" in res.stderr and len(res.stderr.splitlines()) == 1
    assert sorted(p.name for p in Path(".").iterdir()) == ["code.py"]
