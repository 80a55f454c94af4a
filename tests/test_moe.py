"""Qwen3.5/3.6 MoE checkpoints (qwen3_5_moe) with their MoE MTP heads: every expert layout, quantized experts,
greedy identity with both rollbacks, inspect, the roofline's active-expert bound, and bad MoE input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mtpbench.builders.tiny import TinySpec, make_tiny
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.model.checkpoint import load
from mtpbench.sampling import SamplingConfig

PROMPTS = ["def add(a, b):\n    return a", "The quick brown fox"]
MOE_LAYOUTS = {
    "per-expert": TinySpec(moe=True, seed=1, agree=0.9),
    "fused-hf-sidecar": TinySpec(moe=True, seed=2, agree=0.9, mtp_experts="fused",
                                 mtp_layout="sidecar", mtp_prefix="model.mtp."),
    "switch-sharded": TinySpec(moe=True, seed=3, agree=0.9, layout="mlx", mtp_experts="switch", shards=2, experts=8,
                               experts_per_token=3),
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_tiny(root / name, spec) for name, spec in MOE_LAYOUTS.items()}


def _quantized_copy(src: Path, out: Path, bits: int = 4, group: int = 32) -> Path:
    """`src` with trunk and head quantized as MLX conversions store them (switch layers with scales and biases)."""
    b = load(src)
    shutil.copytree(src, out)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    pred = lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0  # noqa: E731
    nn.quantize(b.model, group_size=group, bits=bits, class_predicate=pred)
    nn.quantize(b.mtp, group_size=group, bits=bits, class_predicate=pred)
    tensors = dict(tree_flatten(b.model.parameters()))
    tensors.update({"mtp." + k: v for k, v in tree_flatten(b.mtp.parameters())})
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"] = {"group_size": group, "bits": bits}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _greedy_identity(path: Path, prompts: list[str], n: int = 64) -> int:
    b = load(path)
    assert b.mtp_source is not None and b.mtp_source.expert_layout is not None
    accepted = 0
    for text in prompts:
        prompt = b.tokenizer.encode(text)
        ar = generate_ar(b, prompt, SamplingConfig(), n, ignore_eos=True)
        for k in (1, 2, 3, 4):
            for rollback, fast in (("capture", True), ("reforward", True), ("capture", False)):
                r = generate_mtp(b, prompt, SamplingConfig(), k, n, ignore_eos=True, rollback=rollback,
                                 greedy_fast_path=fast)
                assert r.tokens == ar.tokens, (path.name, text, k, rollback, fast)
                accepted += r.accepted_tokens
    return accepted


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_greedy_mtp_equals_greedy_ar_on_moe_checkpoints(moe_dirs, layout):
    assert _greedy_identity(moe_dirs[layout], PROMPTS) > 0, "no draft accepted: rollback-free steps not exercised"


def test_quantized_experts_load_and_keep_greedy_identity(moe_dirs, tmp_path):
    q = _quantized_copy(moe_dirs["per-expert"], tmp_path / "q4")
    b = load(q)
    assert b.mtp_source.expert_layout == "switch"
    q4 = b.mtp_source.quantized["layers.0.mlp.switch_mlp.gate_proj"]
    assert {k: q4[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert _greedy_identity(q, PROMPTS[:1]) > 0


def test_moe_trunk_gives_mlx_lm_logits_on_both_paths(moe_dirs):
    """The compiled decode layers with a sparse MoE block compute mlx_lm's logits bit for bit."""
    import mlx_lm.models.cache as mlx_cache

    b = load(moe_dirs["switch-sharded"])
    trunk, model = b.trunk, b.trunk.model
    rng = np.random.default_rng(0)
    theirs, ours = mlx_cache.make_prompt_cache(model), trunk.make_cache()
    for n, capture in [(7, False), (1, False), (1, True), (3, True), (2, False), (5, True)]:
        ids = mx.array(rng.integers(0, 200, (1, n)))
        want = model(ids, cache=theirs)
        got = trunk.forward_capturing(ids, ours)[0] if capture else trunk(ids, ours)
        assert np.array_equal(np.asarray(got.logits), np.asarray(want)), (n, capture)


def test_every_expert_layout_loads_the_same_head(tmp_path):
    """Per-expert, fused and switch files of one head give the same module weights."""
    heads = {}
    for layout in ("per-expert", "fused", "switch"):
        b = load(make_tiny(tmp_path / layout, TinySpec(moe=True, seed=5, mtp_experts=layout)))
        assert b.mtp_source.expert_layout == layout
        heads[layout] = dict(tree_flatten(b.mtp.parameters()))
    for layout in ("fused", "switch"):
        assert heads[layout].keys() == heads["per-expert"].keys()
        for k, v in heads["per-expert"].items():
            assert np.array_equal(np.asarray(heads[layout][k]), np.asarray(v)), (layout, k)


def test_inspect_shows_experts_and_active_parameters(cli, moe_dirs):
    res = cli("inspect", moe_dirs["switch-sharded"], "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    moe = info["moe"]
    assert (moe["experts"], moe["experts_per_token"]) == (8, 3)
    assert moe["total_parameters"] == info["parameters"] > moe["active_parameters"]
    spec, text = MOE_LAYOUTS["switch-sharded"], info
    expert = 3 * spec.hidden * (spec.hidden // 2)  # gate, up, down of one expert
    assert moe["total_parameters"] - moe["active_parameters"] == spec.layers * (8 - 3) * expert
    assert info["mtp"]["expert_layout"] == "switch"
    assert info["mtp"]["parameters"] - info["mtp"]["active_parameters"] == (8 - 3) * expert
    assert "experts" in info["formats"] and "router" in info["formats"]
    text = cli("inspect", moe_dirs["per-expert"]).stdout
    assert "4 per layer, 2 per token" in text and "experts stored per-expert" in text


def test_roofline_counts_the_routed_experts(moe_dirs):
    from mtpbench.model.roofline import draft_step_bytes, expert_bytes, nbytes, weight_bytes

    b = load(moe_dirs["switch-sharded"])  # 8 experts, 3 per token
    total, experts = nbytes(b.model), expert_bytes(b.model)
    assert 0 < experts < total
    assert weight_bytes(b, 1) == total - experts + experts * 3 // 8
    assert weight_bytes(b, 2) == total - experts + experts * 6 // 8
    assert weight_bytes(b, 3) == weight_bytes(b, 9) == total  # 9 > 8: every expert at most once
    head = b.mtp
    assert draft_step_bytes(b) < nbytes(head) + nbytes(b.trunk.lm.lm_head)


def _sidecar_moe(tmp_path: Path, name: str, **kw) -> tuple[Path, dict]:
    path = make_tiny(tmp_path / name, TinySpec(moe=True, mtp_layout="sidecar", **kw))
    return path, dict(mx.load(str(path / "mtp.safetensors")))


def _one_line_error(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_bad_moe_checkpoints_end_in_one_line(cli, tmp_path):
    path, t = _sidecar_moe(tmp_path, "missing")
    del t["mtp.layers.0.mlp.experts.3.up_proj.weight"]
    mx.save_safetensors(str(path / "mtp.safetensors"), t)
    assert "expert missing: mtp.layers.0.mlp.experts.3.up_proj.weight" in _one_line_error(cli("inspect", path))

    path, t = _sidecar_moe(tmp_path, "router")
    t["mtp.layers.0.mlp.gate.weight"] = mx.zeros((3, 64))
    mx.save_safetensors(str(path / "mtp.safetensors"), t)
    msg = _one_line_error(cli("inspect", path))
    assert "mtp.layers.0.mlp.gate.weight has shape (3, 64)" in msg and "(4, 64)" in msg

    path, t = _sidecar_moe(tmp_path, "unknown", mtp_experts="switch")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        t[f"mtp.layers.0.mlp.experts.w_{proj}"] = t.pop(f"mtp.layers.0.mlp.switch_mlp.{proj}.weight")
    mx.save_safetensors(str(path / "mtp.safetensors"), t)
    assert "unknown layout (mtp.layers.0.mlp.experts.w_" in _one_line_error(cli("inspect", path))

    path, t = _sidecar_moe(tmp_path, "beyond")
    t["mtp.layers.0.mlp.experts.4.up_proj.weight"] = t["mtp.layers.0.mlp.experts.0.up_proj.weight"]
    mx.save_safetensors(str(path / "mtp.safetensors"), t)
    assert "beyond the 4 experts" in _one_line_error(cli("inspect", path))

    path, t = _sidecar_moe(tmp_path, "fused-no-down", mtp_experts="fused")
    del t["mtp.layers.0.mlp.experts.down_proj"]
    mx.save_safetensors(str(path / "mtp.safetensors"), t)
    assert "experts.down_proj is missing" in _one_line_error(cli("inspect", path))

    path, _ = _sidecar_moe(tmp_path, "config")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["num_experts_per_tok"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    assert "routes 9 experts per token but declares only 4" in _one_line_error(cli("inspect", path))
    out = tmp_path / "never"
    res = cli("sweep", "-m", path, "--out", out, "--no-report")
    assert res.exit_code == 2 and not out.exists()

    cfg["model_type"] = "qwen3_next"
    (path / "config.json").write_text(json.dumps(cfg))
    assert "Qwen3-Next (qwen3_next) is not supported" in _one_line_error(cli("inspect", path))

    res = cli("make-tiny", tmp_path / "bad-tiny", "--moe", "--experts", "2", "--experts-per-token", "3")
    assert res.exit_code == 2 and "--experts-per-token" in res.stderr


def test_sweep_over_a_dense_and_an_moe_checkpoint(cli, tmp_path, tiny_agree, moe_dirs):
    prompts = tmp_path / "mini.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    out = tmp_path / "mixed"
    res = cli("sweep", "-m", tiny_agree, "-m", moe_dirs["per-expert"], "--k", "1..2", "--temp", "0,0.6",
              "--prompts", prompts, "--repeats", "1", "--max-tokens", "16", "--out", out, "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    from mtpbench.sweep.store import read_table

    runs = read_table(out, "runs")
    assert set(runs["model"]) == {"agree", "per-expert"} and (runs["status"] == "ok").all()
    moe = runs[runs["model"] == "per-expert"]
    ar, k1 = (moe[(moe["mode"] == m) & (moe["k"] == k)]["weight_bytes_per_token"] for m, k in (("ar", 0), ("mtp", 1)))
    assert (ar > 0).all() and (k1 > 0).all()
    for _, g in runs[runs["temperature"] == 0].groupby("cell_id"):
        assert g["output_hash"].nunique() == 1
    report = cli("report", out, "-o", tmp_path / "r.html")
    assert report.exit_code == 0 and "per-expert" in (tmp_path / "r.html").read_text()
    card = cli("card", out, "-m", "per-expert", "-o", tmp_path / "card.md")
    assert card.exit_code == 0, card.stderr
    assert "per-expert" in (tmp_path / "card.md").read_text()


def test_policies_reach_the_experts_and_keep_routers_at_8_bits(moe_dirs, tmp_path):
    """`q4+mtp-int4` on an MoE checkpoint quantizes the routed experts (trunk and head) to 4 bits and the routers to
    8, as mlx_lm's conversions do; the result loads in mlx_lm and keeps greedy identity."""
    import mlx_lm

    from mtpbench.builders.quantize import quantize_checkpoint
    from mtpbench.model.describe import describe

    src = make_tiny(tmp_path / "moe64", TinySpec(moe=True, seed=4, agree=0.9, hidden=64, head_dim=32))
    out = quantize_checkpoint(src, tmp_path / "q4", "q4+mtp-int4", group_size=32)
    info = describe(load(out))
    assert "q4 g32" in info["formats"]["experts"] and "q8 g32" in info["formats"]["router"], info["formats"]
    assert "q4 g32" in info["mtp"]["formats"]["mtp.experts"], info["mtp"]["formats"]
    assert "q8 g32" in info["mtp"]["formats"]["mtp.router"], info["mtp"]["formats"]
    model, tok = mlx_lm.load(str(out))
    ids = mx.array([tok.encode(PROMPTS[0])])
    assert mx.array_equal(model(ids), load(out).model(ids))
    _greedy_identity(out, PROMPTS[:1], n=32)


def test_an_moe_head_grafts_onto_its_trunk_and_a_dense_trunk_is_refused(moe_dirs, tmp_path, tiny_agree):
    from mtpbench.builders.quantize import graft
    from mtpbench.errors import UserError

    spec = MOE_LAYOUTS["per-expert"]
    trunk = make_tiny(tmp_path / "moe-trunk", TinySpec(**{**spec.__dict__, "mtp": False}))
    out = graft(trunk, moe_dirs["per-expert"], tmp_path / "grafted", mtp_policy="mtp-int4")
    b = load(out)
    assert b.mtp_source is not None and b.mtp_source.expert_layout is not None
    _greedy_identity(out, PROMPTS[:1], n=32)
    with pytest.raises(UserError, match="cannot graft: num_experts differs"):
        graft(tiny_agree, moe_dirs["per-expert"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_bench_roofline_reads_more_experts_per_deeper_verify(moe_dirs):
    """`bench`'s roofline counts each mode's own trunk bytes: a K+1-token verify of an MoE trunk reads more routed
    experts than an AR step, so the same tok/s and tau give more bytes per token at larger K."""
    from mtpbench.perf.roofline import roofline
    from mtpbench.model.roofline import bytes_per_token, draft_step_bytes, weight_bytes

    b = load(moe_dirs["switch-sharded"])  # 8 experts, 3 per token
    r = roofline(b, {0: 100.0, 1: 100.0, 2: 100.0}, {1: 1.5, 2: 2.0}, copy_mb=8)
    per_token = {m["k"]: m["bytes_per_token"] for m in r["modes"]}
    head = draft_step_bytes(b)
    assert per_token[0] == weight_bytes(b, 1)
    for k, tau in ((1, 1.5), (2, 2.0)):
        assert per_token[k] == bytes_per_token(weight_bytes(b, k + 1), head, k, tau)
    assert weight_bytes(b, 2) > weight_bytes(b, 1)
