"""Quantization policies, written checkpoints (mlx_lm + mtpbench), in-memory policies and MTP grafting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from mtpbench.model.checkpoint import load
from mtpbench.cli.models import graft_cmd, policies_cmd, quantize_cmd
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.decode.teacher import top2_gaps
from mtpbench.model.describe import describe
from mtpbench.errors import UserError
from mtpbench.builders.policies import POLICIES, TRUNK_COMPONENTS, get_policy, policy_lines
from mtpbench.builders.quantize import MANIFEST, apply_policy, graft, quantize_checkpoint
from mtpbench.sampling import SamplingConfig
from mtpbench.stats.preservation import greedy_identity
from mtpbench.builders.tiny import TinySpec, make_tiny

PROMPT = "def add(a, b):\n    return a"
N, K = 64, 2


@pytest.fixture(scope="module")
def qroot(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module")
def stripped(tiny_agree, qroot) -> Path:
    """tiny_agree with its head removed, the way community conversions strip `mtp.*` (same trunk, no MTP)."""
    out = qroot / "stripped"
    shutil.copytree(tiny_agree, out)
    weights = mx.load(str(out / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v for k, v in weights.items() if not k.startswith("mtp.")})
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 0
    (out / "config.json").write_text(json.dumps(config))
    return out


def _greedy(bundle, k: int = K):
    prompt = bundle.tokenizer.encode(PROMPT)
    return generate_mtp(bundle, prompt, SamplingConfig(), k, N, ignore_eos=True)


def _assert_mtp_equals_ar(bundle) -> None:
    prompt = bundle.tokenizer.encode(PROMPT)
    ar = generate_ar(bundle, prompt, SamplingConfig(), N, ignore_eos=True)
    mtp = _greedy(bundle)
    res = greedy_identity(ar.tokens, mtp.tokens, top2_gaps(bundle, prompt, ar.tokens))
    assert res.equal or res.near_tie, f"MTP diverged from AR at token {res.first_divergence} (gap {res.gap:.2e})"


def _expected(rules, component: str, group: int = 64) -> str | None:
    bits = dict(rules).get(component)
    return f"q{bits} g{group}" if bits else None


MOE_ONLY = ("experts", "router")


def _assert_formats(formats: dict[str, str], rules, components, prefix: str = "", group: int = 64) -> None:
    """Each component the checkpoint has is stored as the policy asks; a dense one lacks only the MoE components."""
    assert {c for c in components if prefix + c not in formats} <= set(MOE_ONLY), formats
    for c in (c for c in components if prefix + c in formats):
        want = _expected(rules, c, group)
        shown = formats[prefix + c]
        assert (want in shown) if want else ("q" not in shown), f"{prefix + c}: {shown!r}, policy wants {want}"


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_writes_a_checkpoint_both_loaders_read(name, tiny_agree, qroot):
    policy = POLICIES[name]
    out = quantize_checkpoint(tiny_agree, qroot / name, name)
    bundle = load(out, require_mtp=True)
    model, _ = mlx_lm.load(str(out))
    tokens = mx.array([bundle.tokenizer.encode(PROMPT)])
    assert mx.array_equal(model(tokens), bundle.model(tokens)), "mlx_lm and mtpbench see different trunks"

    info = describe(bundle)
    _assert_formats(info["formats"], policy.trunk_rules, TRUNK_COMPONENTS)
    _assert_formats(info["mtp"]["formats"], policy.mtp_rules, ("attention", "mlp"), prefix="mtp.")
    assert "q" not in info["mtp"]["formats"]["mtp.fc"] and "q" not in info["formats"]["norms"]
    assert info["mtp"]["norm_convention"] == "shifted"
    _assert_mtp_equals_ar(bundle)

    in_memory = apply_policy(load(tiny_agree), name)
    assert in_memory.name.endswith("@" + policy.name)
    assert describe(in_memory)["formats"] == info["formats"]
    assert _greedy(in_memory).tokens == _greedy(bundle).tokens


def test_apply_policy_leaves_the_input_bundle_alone(bundle_agree):
    before = describe(bundle_agree)["formats"]
    q = apply_policy(bundle_agree, "q4+mtp-int4")
    assert describe(bundle_agree)["formats"] == before and "q" not in before["mlp"]
    assert q.fingerprint != bundle_agree.fingerprint and q.mtp_source.quantized
    assert bundle_agree.mtp_source.quantized == {}


def test_manifest_lists_every_tensor_with_bits(tiny_agree, qroot):
    out = quantize_checkpoint(tiny_agree, qroot / "manifest", "mixed-gdn8-mlp4+mtp-int4")
    m = json.loads((out / MANIFEST).read_text())
    written = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            written.update({k: list(st.get_slice(k).get_shape()) for k in st.keys()})
    listed = {e["name"]: e for e in m["tensors"]}
    assert {k: e["shape"] for k, e in listed.items()} == written
    assert m["output_tensor_count"] == len(written)
    assert m["output_size_bytes"] == sum(e["bytes"] for e in m["tensors"]) < m["source_size_bytes"]
    config = json.loads((out / "config.json").read_text())
    for module, q in m["quantized_linears"].items():
        for suffix in (".weight", ".scales", ".biases"):
            assert {k: listed[module + suffix][k] for k in q} == q
        assert module.startswith("mtp.") or config["quantization"][module] == q
    assert m["quantized_linears"]["mtp.layers.0.mlp.down_proj"]["bits"] == 4
    assert m["quantized_linears"]["language_model.model.layers.0.linear_attn.in_proj_qkv"]["bits"] == 8
    assert "bits" not in listed["mtp.fc.weight"] and "bits" not in listed["mtp.norm.weight"]
    assert sum(t["tensors"] for t in m["totals"].values()) == len(written)
    assert m["totals"]["mlp"]["bytes"] < m["totals"]["mlp"]["source_bytes"]
    assert config["quantization_config"] == config["quantization"]


def test_sidecar_layout_group_size_and_lm_head_bits(tiny_agree, qroot):
    out = quantize_checkpoint(tiny_agree, qroot / "sidecar", "q4+mtp-q8", group_size=32, lm_head_bits=8,
                              mtp_layout="sidecar")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as st:
        assert not any(k.startswith("mtp.") for k in st.keys())
    bundle = load(out, require_mtp=True)
    assert bundle.mtp_source.files == ("mtp.safetensors",)
    formats = describe(bundle)["formats"]
    assert formats["lm_head"] == formats["embedding"] == "q8 g32" and formats["mlp"] == "q4 g32"
    assert describe(bundle)["mtp"]["formats"]["mtp.mlp"] == "q8 g32"
    mlx_lm.load(str(out))
    keep = apply_policy(load(tiny_agree), "q4", lm_head_bits=16)
    assert "q" not in describe(keep)["formats"]["lm_head"]


def test_layers_the_group_size_does_not_divide_are_skipped_and_reported(tiny_agree, qroot):
    out = quantize_checkpoint(tiny_agree, qroot / "g128", "q8", group_size=128)
    m = json.loads((out / MANIFEST).read_text())
    assert any("in_proj_qkv (input dim 64 not divisible by 128)" in s for s in m["skipped"])
    assert any(k.endswith("mlp.down_proj") for k in m["quantized_linears"])  # input dim 128
    _assert_mtp_equals_ar(load(out))
    mlx_lm.load(str(out))


def test_refusals_are_one_line(tiny_agree, qroot):
    with pytest.raises(UserError, match="unknown policy 'q3'"):
        get_policy("q3")
    assert get_policy("q4+mtp-bf16").name == "q4"
    q4 = qroot / "q4"  # written by the parametrized test above, or now
    if not q4.exists():
        quantize_checkpoint(tiny_agree, q4, "q4")
    with pytest.raises(UserError, match="already quantized"):
        quantize_checkpoint(q4, qroot / "requant", "q8")
    with pytest.raises(UserError, match="not an empty directory"):
        quantize_checkpoint(tiny_agree, q4, "q8")
    with pytest.raises(UserError, match="group size"):
        quantize_checkpoint(tiny_agree, qroot / "g48", "q4", group_size=48)


def test_graft_restores_the_source_drafts(tiny_agree, stripped, qroot):
    assert load(stripped).mtp is None
    out = graft(stripped, tiny_agree, qroot / "grafted")
    grafted, source = load(out, require_mtp=True), load(tiny_agree)
    assert grafted.mtp_source.files == ("mtp.safetensors",)
    g, s = _greedy(grafted, k=3), _greedy(source, k=3)
    assert g.tokens == s.tokens and g.accepted_at_depth == s.accepted_at_depth
    assert sum(s.accepted_at_depth) > 0
    assert (out / "model.safetensors").read_bytes() == (stripped / "model.safetensors").read_bytes()


def test_graft_with_an_mtp_policy_onto_a_no_mtp_checkpoint(tiny_agree, tiny_no_mtp, qroot):
    out = graft(tiny_no_mtp, tiny_agree, qroot / "grafted-int4", mtp_policy="mtp-int4")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    bundle = load(out, require_mtp=True)
    formats = describe(bundle)["mtp"]["formats"]
    assert formats["mtp.mlp"] == "q4 g64" and "q" not in formats["mtp.fc"]
    _assert_mtp_equals_ar(bundle)


def test_graft_refuses_a_mismatched_head(tiny_agree, qroot):
    small = make_tiny(qroot / "small", TinySpec(hidden=32, mtp=False))
    with pytest.raises(UserError) as e:
        graft(small, tiny_agree, qroot / "bad")
    assert "hidden_size differs" in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(graft_cmd, [str(small), "--mtp-from", str(tiny_agree), str(qroot / "bad2")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "hidden_size" in r.stderr
    assert not (qroot / "bad").exists()


def test_cli_commands(tiny, qroot):
    runner = CliRunner()
    r = runner.invoke(policies_cmd, [])
    assert r.exit_code == 0 and r.output.splitlines() == policy_lines() and len(policy_lines()) == len(POLICIES)
    out = qroot / "cli-q8"
    r = runner.invoke(quantize_cmd, [str(tiny), str(out), "--policy", "q8+mtp-int4", "--mtp-layout", "sidecar"])
    assert r.exit_code == 0, r.output
    path, line = r.stdout.splitlines()
    assert path == str(out) and "q8+mtp-int4" in line and "MiB ->" in line
    r = runner.invoke(quantize_cmd, [str(tiny), str(qroot / "cli-x"), "--policy", "q5"])
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown policy") and r.stderr.count("\n") == 1
