"""The embedded default checkpoint: present, the default everywhere, real acceptance, held-out prompts."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from mtpbench.model.checkpoint import load
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.defaults import DEMO_MODEL, DEMO_PROMPT_SET
from mtpbench.sweep.prompts import encode, load_set
from mtpbench.sampling import SamplingConfig
from mtpbench.builders.demo import is_held_out


def test_inspect_without_model_describes_the_embedded_default(cli):
    res = cli("inspect", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert Path(info["path"]) == DEMO_MODEL
    assert info["model_type"] == "qwen3_5" and info["mtp"]["tensors"] == 15
    assert "G" in info["layer_pattern"] and "A" in info["layer_pattern"]
    assert (DEMO_MODEL / "CARD.md").exists()
    assert sum(f.stat().st_size for f in DEMO_MODEL.iterdir()) < 25 * 2**20


def test_default_prompt_set_is_held_out_stdlib_code():
    prompts = load_set(DEMO_PROMPT_SET)
    assert len(prompts) >= 12 and all(p.completion for p in prompts)
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "prompts" / "stdlib.jsonl").read_text().splitlines()]
    assert all(is_held_out(root / r["source"]) for r in rows)


def test_demo_drafts_are_accepted_and_greedy_mtp_equals_ar():
    b = load(DEMO_MODEL)
    p = load_set(DEMO_PROMPT_SET)[0]
    ids = encode(b.tokenizer, p, None)
    ar = generate_ar(b, ids, SamplingConfig(), 48, ignore_eos=True)
    mtp = generate_mtp(b, ids, SamplingConfig(), 3, 48, ignore_eos=True)
    assert mtp.tokens == ar.tokens
    assert mtp.accepted_at_depth[0] / mtp.verify_steps > 0.3  # a trained head, not chance


def test_make_demo_never_removes_a_directory_it_did_not_write(tmp_path):
    """A non-empty --out without an earlier build's recipe.json is refused before any training, in one line; the
    user's files stay."""
    import subprocess
    import sys

    (tmp_path / "mine.txt").write_text("keep")
    res = subprocess.run([sys.executable, "-m", "mtpbench", "make-demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "not an earlier make-demo output" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine.txt").read_text() == "keep"
