"""Loading real checkpoint layouts with their MTP head; inspect; the AR baseline against mlx_lm; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate

from mtpbench.model.checkpoint import load
from mtpbench.errors import UserError
from mtpbench.builders.tiny import TinySpec, make_tiny

from .conftest import LAYOUTS


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_inspect_finds_all_15_mtp_tensors_in_every_layout(cli, layout_dirs, layout):
    spec = LAYOUTS[layout]
    res = cli("inspect", layout_dirs[layout], "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["mtp"]["tensors"] == 15
    assert info["mtp"]["prefix"] == spec.mtp_prefix
    expected_files = ["mtp.safetensors"] if spec.mtp_layout == "sidecar" else None
    if expected_files:
        assert info["mtp"]["files"] == expected_files
    else:
        assert all(f.startswith("model") for f in info["mtp"]["files"])
    assert info["mtp"]["norm_convention"] == ("offset" if spec.layout == "hf" else "shifted")
    assert info["layer_pattern"] == "GAGA"
    assert Path(info["path"]) == layout_dirs[layout].resolve()


def test_every_layout_loads_the_same_head_and_trunk(layout_dirs):
    """Same seed, different layouts: identical weights after loading, so norm offsets are shifted exactly once."""
    ref = load(layout_dirs["inline-mtp"])
    ref_head = dict(tree_flatten(ref.mtp.parameters()))
    ids = mx.array([[5, 9, 31, 7]])
    ref_logits = ref.trunk(ids, ref.trunk.make_cache()).logits
    for name, path in layout_dirs.items():
        b = load(path)
        bf16 = LAYOUTS[name].dtype == "bfloat16"
        tol = 2e-2 if bf16 else 1e-6  # bf16 keeps ~3 significant digits; a missing or doubled shift is off by 1
        for k, v in tree_flatten(b.mtp.parameters()):
            np.testing.assert_allclose(np.asarray(v.astype(mx.float32)), np.asarray(ref_head[k]), atol=tol, rtol=tol,
                                       err_msg=f"{name}: {k}")
        logits = b.trunk(ids, b.trunk.make_cache()).logits.astype(mx.float32)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=0.3 if bf16 else 1e-5, err_msg=name)


def test_greedy_ar_equals_mlx_lm_generate(cli, tiny_agree):
    prompt = "def add(a, b):\n    return"
    res = cli("generate", "--model", tiny_agree, "--ar", "--temp", "0", "--json", "--prompt", prompt, "--max-tokens", 40)
    assert res.exit_code == 0, res.stderr
    ours = json.loads(res.stdout.splitlines()[0])
    model, tokenizer = mlx_lm_load(str(tiny_agree))
    theirs = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=40)]
    assert ours["tokens"] == theirs
    assert ours["generated_tokens"] == len(theirs) > 1
    for key in ("text", "prompt_tokens", "prefill_s", "decode_s", "decode_tok_s"):
        assert key in ours


def test_num_samples_draws_independent_seeded_samples(cli, tiny):
    res = cli("generate", "-m", tiny, "-p", "hello", "--temp", "1", "--num-samples", "3", "--json", "--max-tokens", 12,
              "--seed", 5)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["seed"] for r in rows] == [5, 6, 7]
    assert len({tuple(r["tokens"]) for r in rows}) > 1
    again = cli("generate", "-m", tiny, "-p", "hello", "--temp", "1", "--json", "--max-tokens", 12, "--seed", 6)
    assert json.loads(again.stdout)["tokens"] == rows[1]["tokens"]


def _hub_cache(root: Path, repo: str, src: Path) -> Path:
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    snap = base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(snap.name)
    return root


def test_repo_id_resolves_from_local_hub_cache_only(tmp_path, tiny):
    cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-mtp", tiny)
    b = load("tiny-org/tiny-mtp", cache_dir=cache)
    assert b.mtp is not None and b.name == "tiny-org/tiny-mtp"
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*hf download"):
        load("tiny-org/not-cached", cache_dir=cache)


def _one_line_error(res) -> str:
    assert res.exit_code != 0
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def _broken(tmp_path: Path, src: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_give_one_readable_line(cli, tmp_path, tiny, tiny_no_mtp):
    assert "no such directory" in _one_line_error(cli("inspect", tmp_path / "missing"))
    assert "hf download" in _one_line_error(cli("inspect", "some-org/uncached-model-xyz"))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _one_line_error(cli("inspect", empty))

    no_weights = _broken(tmp_path, tiny, "no-weights")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    assert "no *.safetensors" in _one_line_error(cli("inspect", no_weights))

    truncated = _broken(tmp_path, tiny, "truncated")
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "truncated or corrupt" in _one_line_error(cli("inspect", truncated))

    garbage = _broken(tmp_path, tiny, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "truncated or corrupt" in _one_line_error(cli("inspect", garbage))

    wrong_type = _broken(tmp_path, tiny, "wrong-type")
    cfg = json.loads((wrong_type / "config.json").read_text())
    cfg["model_type"] = "llama"
    (wrong_type / "config.json").write_text(json.dumps(cfg))
    assert "unsupported model_type 'llama'" in _one_line_error(cli("inspect", wrong_type))

    no_layers = _broken(tmp_path, tiny, "no-mtp-layers")
    cfg = json.loads((no_layers / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 0
    (no_layers / "config.json").write_text(json.dumps(cfg))
    assert "declares no MTP layers" in _one_line_error(cli("inspect", no_layers))

    msg = _one_line_error(cli("generate", "-m", tiny_no_mtp, "-p", "x", "--k", 2))
    assert "strip mtp.*" in msg and "graft" in msg


def test_mtp_shape_mismatch_is_refused(cli, tmp_path):
    src = make_tiny(tmp_path / "src", TinySpec(mtp_layout="sidecar"))
    other = make_tiny(tmp_path / "other", TinySpec(hidden=32, mtp_layout="sidecar"))
    shutil.copy(other / "mtp.safetensors", src / "mtp.safetensors")
    assert "has shape" in _one_line_error(cli("inspect", src))


@pytest.mark.parametrize("args, needle", [
    (["--temp", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
])
def test_invalid_sampling_values(cli, tiny, args, needle):
    assert needle in _one_line_error(cli("generate", "-m", tiny, "-p", "x", *args))
