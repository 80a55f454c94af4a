"""Published MTP checkpoint formats, each reproduced on a tiny checkpoint exactly as its authors' code writes it
(file names, key names and nesting, dtypes, quantization metadata, contract files), and read as they meant it:
the head equals a native-layout twin (bit for bit, or within quantization tolerance), `inspect` shows what the
authors declared and where, and greedy MTP equals greedy AR.

Sources, read for the layouts below (cited per fixture):
- MTPLX 2.12.2 (PyPI `mtplx`): `mtplx/mtp_patch.py` (`MTPContract`, `to_dict`, `with_metadata`),
  `mtplx/commands/forge.py` (`_stamp_runtime_metadata`: `mtp_contract` at the top of `mtplx_runtime.json` and
  again under `forge_provenance`; `_patch_config_for_mtp`: `mlx_lm_extra_tensors.mtp_file`;
  `_patch_config_for_mtp_contract`: `mtplx_mtp_contract`; `_extract_embedded_mtp`: sidecar keys normalized to
  `mtp.*`), `mtplx/artifacts.py` (`expected_mtp_file`: the sidecar search order).
- AirRunner/mlx-lm `feat/mtp-batched` `mlx_lm/models/qwen3_5.py`: converted heads keep `language_model.mtp.*`,
  every linear quantized (fc too; MoE routers at 8 bits as per-module entries), norms shifted at conversion.
- Blaizzy/mlx-vlm `speculative/drafters/mtp_split.py` + `qwen3_5_mtp/split.py`: a standalone drafter is
  `config.json {block_size, model_type: qwen3_5_mtp, text_config, tie_word_embeddings[, quantization,
  quantization_config]}` and `model.safetensors` with the head's tensors at the root (no `mtp.`), format mlx.
- vLLM `model_executor/models/qwen3_5_mtp.py`: the head's input is concat([embedding, hidden]); `mtp.*` tensors load
  as the predictor's own modules (its `embed_tokens` when the config asks for dedicated embeddings).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mtpbench.builders.tiny import TinySpec, make_tiny
from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.errors import UserError
from mtpbench.model import checkpoint
from mtpbench.model.checkpoint import load
from mtpbench.sampling import SamplingConfig
from mtpbench.sweep.store import read_table

PROMPT = "def add(a, b):\n    return a"
IDS = [5, 9, 31, 7, 11, 40, 2, 66, 13, 8, 21]

# MTPLX 2.12.2 `MTPContract().to_dict()` as `_normalize_mtp_contract_for_config` writes it (every field present).
MTPLX_DEFAULT_CONTRACT = {"base_hidden_variant": "post_norm", "hidden_variant": "post_norm",
                          "concat_order": "embedding_hidden", "mtp_position_mode": "cache",
                          "mtp_quant_group_size": 64, "mtp_quant_mode": "affine"}


# ------------------------------------------------------------------------------------------------------- builders


@pytest.fixture(scope="session")
def twin(ckpt_root) -> Path:
    """The native-layout twin: MLX layout (`layout="mlx"`, as mlx_lm.convert writes), MTP inline under `mtp.`, norms
    shifted, fp32; conftest's agreeing checkpoint (seed 1, agree 0.9) but not in make_tiny's default HF layout."""
    return make_tiny(ckpt_root / "fmt-twin", TinySpec(seed=1, agree=0.9, layout="mlx"))


@pytest.fixture(scope="session")
def trunk_only(ckpt_root) -> Path:
    """The twin's very trunk without a head, in the twin's MLX layout (what community conversions that strip
    `mtp.*` look like: mlx_lm's sanitizer drops the head)."""
    return make_tiny(ckpt_root / "fmt-trunk-only", TinySpec(seed=1, agree=0.9, mtp=False, layout="mlx"))


def _head_tensors(twin: Path) -> dict[str, mx.array]:
    """The twin's head, relative to `mtp.` (shifted norms, MLX layout)."""
    return {k[len("mtp."):]: v for k, v in mx.load(str(twin / "model.safetensors")).items() if k.startswith("mtp.")}


def _pack(root: Path, trunk_only: Path, name: str) -> Path:
    """A copy of the head-less trunk whose config declares one MTP layer (what a sidecar pack starts from)."""
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trunk_only, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key == "text_config":
            config["text_config"].update(value)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config, indent=2))


def mtplx_pack(root: Path, trunk_only: Path, twin: Path, name: str, contract: dict, runtime: str = "stamped",
               head: dict[str, mx.array] | None = None) -> Path:
    """An MTPLX 2.12.2 forge pack: the converted trunk, `mtp.safetensors` with `mtp.*` keys (forge
    `_extract_embedded_mtp` normalizes to `mtp.`), `config.json` with `mlx_lm_extra_tensors.mtp_file` and
    `mtplx_mtp_contract`, and `mtplx_runtime.json` as `_stamp_runtime_metadata` writes it (`runtime="stamped"`),
    or as the streaming-audit lane writes it (`"streaming"`: no `mtp_contract` at all), or none (`"none"`)."""
    out = _pack(root, trunk_only, name)
    tensors = head if head is not None else _head_tensors(twin)
    mx.save_safetensors(str(out / "mtp.safetensors"), {f"mtp.{k}": v for k, v in tensors.items()})
    full = {**MTPLX_DEFAULT_CONTRACT, **contract}
    _edit_config(out, mlx_lm_extra_tensors={"mtp_file": "mtp.safetensors"}, mtplx_mtp_contract=full,
                 mtplx_mtp_payload_audit={"passed": True, "problems": [], "mtp_file": str(out / "mtp.safetensors"),
                                          "tensor_count": len(tensors)})
    provenance = {"source_repo": "Qwen/Qwen3.6-27B", "source_sha": None, "source_format": "hf_safetensors",
                  "forge_recipe": {"mtp_policy": "keep_bf16"}, "forge_inputs": {"lane": "build"},
                  "forged_at": "2026-11-30T10:00:00Z", "mtplx_version": "2.12.2", "forged_locally": True,
                  "published_to_hf": None}
    if runtime == "stamped":
        doc = {"mtplx_version": "2.12.2", "arch_id": "qwen3_5", "mtp_depth_max": 3, "recommended_profile": "turbo",
               "sampler": {"temperature": 0.6, "top_p": 0.95, "top_k": 20},
               "verified_on": {"timestamp": "2026-11-30T10:00:00Z", "hardware": "macOS-15", "machine_arch": "arm64",
                               "macos": "15.1", "model": name},
               "verification": {"mode": "full-load", "status": "verified", "full_load_verified": True},
               "exactness_baseline": {}, "speed_evidence": {"depth": 2, "verdict": "mtp_depth_wins"},
               "mtp_contract": dict(full), "mtp_sidecar": "mtp.safetensors", "base_trunk": "Qwen/Qwen3.6-27B",
               "artifact_role": "forge-local", "forge_provenance": {**provenance, "mtp_contract": dict(full)}}
        (out / "mtplx_runtime.json").write_text(json.dumps(doc, indent=2))
    elif runtime == "streaming":
        doc = {"mtplx_version": "2.12.2", "arch_id": "qwen3_5", "mtp_depth_max": 3, "verified_on": {},
               "verification": {"mode": "streaming", "status": "streaming-audited", "full_load_verified": False},
               "forge_provenance": provenance}
        (out / "mtplx_runtime.json").write_text(json.dumps(doc, indent=2))
    return out


def _swap_fc(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """A head trained on concat([hidden, embedding]): the twin's fc with its input halves swapped."""
    w = tensors["fc.weight"]
    h = w.shape[1] // 2
    return {**tensors, "fc.weight": mx.concatenate([w[:, h:], w[:, :h]], axis=1)}


# -------------------------------------------------------------------------------------------------------- checks


def head_logits(bundle, ids=IDS) -> np.ndarray:
    """Teacher-forced draft logits of every position, with the head's conventions as loaded."""
    x = mx.array(ids)[None]
    out = bundle.trunk(x, bundle.trunk.make_cache())
    head = bundle.draft_head
    z = head(out.hidden[:, :-1], head.embed(x[:, 1:]), head.make_cache())
    return np.asarray(head.lm_head(z).astype(mx.float32))


def assert_greedy_identity(bundle, chain: str = "normed", ks=(1, 2, 3), tokens: int = 24) -> None:
    prompt = bundle.tokenizer.encode(PROMPT)
    ar = generate_ar(bundle, prompt, SamplingConfig(), tokens, ignore_eos=True)
    for k in ks:
        for rollback, fast in (("capture", True), ("reforward", False)):
            r = generate_mtp(bundle, prompt, SamplingConfig(), k, tokens, ignore_eos=True, rollback=rollback,
                             greedy_fast_path=fast, chain=chain)
            assert r.tokens == ar.tokens, (bundle.name, k, rollback, chain)


# ------------------------------------------------------------------------------------------- MTPLX's runtime contract


def test_mtplx_stamped_pack_is_read_as_declared(cli, ckpt_root, trunk_only, twin):
    """MTPLX's stamped layout with a non-default contract: the head trained on [hidden, embedding] is fed that way,
    the pre-norm trunk hidden, chained on its pre-norm output; inspect names every key's file."""
    contract = {"base_hidden_variant": "pre_norm", "hidden_variant": "pre_norm", "concat_order": "hidden_embedding",
                "mtp_position_mode": "absolute"}
    pack = mtplx_pack(ckpt_root, trunk_only, twin, "mtplx-stamped", contract, head=_swap_fc(_head_tensors(twin)))
    b = load(pack)
    assert b.hidden_variant.value == "pre_norm" and b.concat == "hidden_embedding"
    ref = load(twin).with_hidden_variant("pre_norm")
    np.testing.assert_allclose(head_logits(b), head_logits(ref), atol=1e-4, rtol=1e-4)
    assert_greedy_identity(b, chain="prenorm")
    declared = {d.name: (d.value, d.source) for d in b.declared}
    assert declared["mtp_concat"] == ("hidden_embedding", "mtplx_runtime.json mtp_contract.concat_order")
    assert declared["mtp_chain"] == ("prenorm", "mtplx_runtime.json mtp_contract.hidden_variant")
    assert declared["mtp_position"][0] == "absolute" and declared["mtp_quant_mode"][0] == "affine"
    shown = cli("inspect", pack)
    assert shown.exit_code == 0, shown.stderr
    for line in ("mtp-concat hidden_embedding (mtplx_runtime.json mtp_contract.concat_order)",
                 "mtp-hidden pre_norm (mtplx_runtime.json mtp_contract.base_hidden_variant)",
                 "mtp-position absolute (mtplx_runtime.json mtp_contract.mtp_position_mode)",
                 "hidden fed pre_norm, input hidden_embedding", "in mtp.safetensors"):
        assert line in shown.stdout, (line, shown.stdout)
    # read in the native order the same head drafts worse: the convention reaches the head
    assert not np.allclose(head_logits(b.with_conventions(concat="embedding_hidden")), head_logits(ref), atol=1e-3)


@pytest.mark.parametrize("runtime,where", [("streaming", "config.json mtplx_mtp_contract"),
                                           ("none", "config.json mtplx_mtp_contract")])
def test_mtplx_contract_without_a_runtime_block_comes_from_the_config(ckpt_root, trunk_only, twin, runtime, where):
    """The streaming-audit runtime file has no `mtp_contract` (and `forge_provenance` none either): the config's
    `mtplx_mtp_contract` declares it."""
    pack = mtplx_pack(ckpt_root, trunk_only, twin, f"mtplx-{runtime}", {"concat_order": "hidden_embedding"},
                      runtime=runtime, head=_swap_fc(_head_tensors(twin)))
    b = load(pack)
    assert {d.name: d.source for d in b.declared}["mtp_concat"] == f"{where}.concat_order"
    np.testing.assert_allclose(head_logits(b), head_logits(load(twin)), atol=1e-4, rtol=1e-4)


def test_forge_provenance_contract_is_read_when_the_top_level_one_is_missing(ckpt_root, trunk_only, twin):
    pack = mtplx_pack(ckpt_root, trunk_only, twin, "mtplx-provenance", {"concat_order": "hidden_embedding"},
                      head=_swap_fc(_head_tensors(twin)))
    doc = json.loads((pack / "mtplx_runtime.json").read_text())
    del doc["mtp_contract"]
    (pack / "mtplx_runtime.json").write_text(json.dumps(doc))
    _edit_config(pack, mtplx_mtp_contract=MTPLX_DEFAULT_CONTRACT)  # the runtime file outranks the config
    b = load(pack)
    assert {d.name: d.source for d in b.declared}["mtp_concat"] == \
        "mtplx_runtime.json forge_provenance.mtp_contract.concat_order"
    assert b.concat == "hidden_embedding"


@pytest.mark.parametrize("chain", ["fc", "embedding", "prev", "mix:pre_norm:prev:0p75"])
def test_every_mtplx_chain_is_modelled_and_keeps_greedy_identity(ckpt_root, trunk_only, twin, chain):
    pack = mtplx_pack(ckpt_root, trunk_only, twin, f"mtplx-chain-{chain.replace(':', '-')}", {"hidden_variant": chain})
    b = load(pack)
    value = {d.name: d.value for d in b.declared}["mtp_chain"]
    assert value == ("mix:prenorm:prev:0.75" if chain.startswith("mix") else chain)
    assert_greedy_identity(b, chain=value, ks=(2, 3))


@pytest.mark.parametrize("key,value", [("mtp_position_mode", "rotary"), ("hidden_variant", "mix:fc:prev:2"),
                                       ("concat_order", "interleaved"), ("base_hidden_variant", "mid_norm"),
                                       ("mtp_quant_mode", "int3")])
def test_a_contract_value_mtpbench_cannot_model_is_one_line(cli, ckpt_root, trunk_only, twin, key, value):
    pack = mtplx_pack(ckpt_root, trunk_only, twin, f"mtplx-bad-{key}", {key: value})
    res = cli("inspect", pack)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"mtplx_runtime.json mtp_contract.{key} = {value!r}" in res.stderr


def test_a_sweep_follows_the_declared_conventions_and_says_so(cli, tmp_path, ckpt_root, trunk_only, twin):
    pack = mtplx_pack(ckpt_root, trunk_only, twin, "mtplx-sweep", {"concat_order": "hidden_embedding",
                                                                   "hidden_variant": "pre_norm"},
                      head=_swap_fc(_head_tensors(twin)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": PROMPT}) + "\n")
    res = cli("sweep", "-m", pack, "--k", "2", "--temp", "0", "--prompts", prompts, "--repeats", "1",
              "--max-tokens", "12", "--out", tmp_path / "out", "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    assert "mtp-concat: hidden_embedding, as the checkpoints' MTPLX contract declares" in res.stderr
    runs = read_table(tmp_path / "out", "runs")
    assert set(runs["mtp_concat"]) == {"hidden_embedding"} and set(runs["mtp_chain"]) == {"prenorm"}
    assert set(runs["mtp_history"]) == {"committed"}  # history is no contract field: `mtplx run`'s committed
    assert runs["output_hash"].nunique() == 1


def test_mtplx_load_time_quantization_is_applied_as_declared(ckpt_root, trunk_only, twin):
    """`mtp_quant_bits` on an unquantized head: MTPLX quantizes it at load (`cyankiwi`: the layers only)."""
    pack = mtplx_pack(ckpt_root, trunk_only, twin, "mtplx-qload", {"mtp_quant_bits": 4, "mtp_quant_group_size": 32,
                                                                   "mtp_quant_policy": "cyankiwi"})
    b = load(pack)
    q = b.mtp_source.quantized
    assert q and all(n.startswith("layers.") for n in q) and "fc" not in q
    assert {(v["bits"], v["group_size"], v["mode"]) for v in q.values()} == {(4, 32, "affine")}
    assert isinstance(b.mtp.layers[0].self_attn.q_proj, nn.QuantizedLinear) and isinstance(b.mtp.fc, nn.Linear)
    assert_greedy_identity(b, ks=(2,))


# --------------------------------------------------------------------------------------------------- sidecar files


@pytest.mark.parametrize("rel,declare", [("mtp/weights.safetensors", False), ("model-mtp.safetensors", False),
                                         ("heads/draft.safetensors", True)])
def test_sidecars_are_found_where_mtplx_looks(ckpt_root, trunk_only, twin, rel, declare):
    pack = _pack(ckpt_root, trunk_only, f"sidecar-{rel.replace('/', '-')}")
    (pack / rel).parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(pack / rel), {f"mtp.{k}": v for k, v in _head_tensors(twin).items()})
    if declare:
        _edit_config(pack, mlx_lm_extra_tensors={"mtp_file": rel})
    b = load(pack)
    assert b.mtp_source.files == (rel,)
    np.testing.assert_array_equal(head_logits(b), head_logits(load(twin)))


def test_sidecar_order_and_a_missing_declared_file(cli, ckpt_root, trunk_only, twin):
    pack = _pack(ckpt_root, trunk_only, "sidecar-order")
    good = {f"mtp.{k}": v for k, v in _head_tensors(twin).items()}
    mx.save_safetensors(str(pack / "mtp.safetensors"), good)
    mx.save_safetensors(str(pack / "model-mtp.safetensors"), {k: v * 0 for k, v in good.items()})
    assert load(pack).mtp_source.files == ("mtp.safetensors",)  # MTPLX: mtp.safetensors before model-mtp
    _edit_config(pack, mlx_lm_extra_tensors={"mtp_file": "gone.safetensors"})
    res = cli("inspect", pack)
    assert res.exit_code == 2 and "mlx_lm_extra_tensors.mtp_file names 'gone.safetensors'" in res.stderr


# ------------------------------------------------------------------------------ standalone heads and --mtp-from


def mlx_vlm_drafter(root: Path, twin: Path, name: str, quantize: bool = False) -> Path:
    """mlx-vlm's `split_qwen3_5_mtp` output: root keys (no `mtp.`), format mlx, the config it writes."""
    out = root / name
    out.mkdir(exist_ok=True)
    tensors = _head_tensors(twin)
    quantization = None
    if quantize:  # `_affine_quantize`: every 2-D .weight but routers, groups of 64
        for key in [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]:
            wq, scales, biases = mx.quantize(tensors[key], group_size=64, bits=4)
            tensors.update({key: wq, key[:-7] + ".scales": scales, key[:-7] + ".biases": biases})
        quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    text = json.loads((twin / "config.json").read_text())["text_config"]
    config = {"block_size": 3, "model_type": "qwen3_5_mtp", "text_config": text,
              "tie_word_embeddings": bool(text.get("tie_word_embeddings", True))}
    if quantization:
        config.update(quantization=quantization, quantization_config=quantization)
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    return out


def test_a_standalone_head_repo_drafts_for_a_stripped_trunk(cli, tmp_path, ckpt_root, trunk_only, twin):
    head = mlx_vlm_drafter(ckpt_root, twin, "drafter-bf")
    b = load(trunk_only, mtp_from=head)
    assert b.mtp_source.prefix == "" and b.mtp_source.directory == str(head)
    assert b.mtp_source.norm_convention == "shifted"
    np.testing.assert_array_equal(head_logits(b), head_logits(load(twin)))
    assert_greedy_identity(b, ks=(2,))
    shown = cli("inspect", trunk_only, "--mtp-from", head)
    assert shown.exit_code == 0 and f"read from {head} (--mtp-from)" in shown.stdout
    own = cli("inspect", head)
    assert own.exit_code == 2 and "--mtp-from" in own.stderr
    ar = cli("generate", "-m", trunk_only, "--ar", "--temp", "0", "-p", PROMPT, "--max-tokens", 16)
    mtp = cli("generate", "-m", trunk_only, "--mtp-from", head, "--k", 2, "--temp", "0", "-p", PROMPT,
              "--max-tokens", 16)
    assert mtp.exit_code == 0 and mtp.stdout == ar.stdout
    files_before = sorted(p.name for p in trunk_only.iterdir())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": PROMPT}) + "\n")
    res = cli("sweep", "-m", trunk_only, "--mtp-from", head, "--k", "2", "--temp", "0", "--prompts", prompts,
              "--repeats", "1", "--max-tokens", "12", "--out", tmp_path / "out", "--quiet", "--no-report")
    assert res.exit_code == 0, res.stderr
    assert read_table(tmp_path / "out", "runs")["output_hash"].nunique() == 1
    assert sorted(p.name for p in trunk_only.iterdir()) == files_before  # nothing copied or written


def test_a_quantized_standalone_head_and_an_incompatible_one(cli, ckpt_root, trunk_only, twin, tiny_kv):
    head = mlx_vlm_drafter(ckpt_root, twin, "drafter-q4", quantize=True)
    b = load(trunk_only, mtp_from=head)
    assert {(q["bits"], q["group_size"], q["mode"], q["source"]) for q in b.mtp_source.quantized.values()} == \
        {(4, 64, "affine", "config.json quantization")}
    ref = load(twin).with_conventions()
    nn.quantize(ref.mtp, group_size=64, bits=4)
    np.testing.assert_allclose(head_logits(b), head_logits(ref), atol=1e-5, rtol=1e-5)
    assert_greedy_identity(b, ks=(2,))
    res = cli("inspect", tiny_kv, "--mtp-from", head)
    assert res.exit_code == 2 and "--mtp-from: the head does not fit: num_attention_heads differs" in res.stderr


# ---------------------------------------------------------------------------- AirRunner mlx-lm fork's conversion


def airrunner_convert(root: Path, twin: Path, moe_twin: Path | None = None, mode: str = "affine") -> Path:
    """`mlx_lm convert -q [--q-mode MODE]` of the AirRunner fork: the model (trunk and head, `language_model.mtp.*`)
    quantized by `quantize_model` with the fork's `quant_predicate` (every linear at the mode's bits and group, 4 / 64
    for affine; routers at 8 bits as per-module entries), saved as one MLX file; norms already shifted."""
    from mlx_lm.utils import quantize_model

    src = moe_twin or twin
    out = root / (("airrunner-moe" if moe_twin else "airrunner") + ("" if mode == "affine" else f"-{mode}"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    b = load(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    model = b.model
    model.language_model.mtp = b.mtp  # the fork's TextModel holds the head as `mtp`

    def predicate(path, _):
        if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
            return {"group_size": 64, "bits": 8}
        return True

    config = json.loads((src / "config.json").read_text())
    model, qconfig = quantize_model(model, config, *((64, 4) if mode == "affine" else (None, None)), mode=mode,
                                    quant_predicate=predicate)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(qconfig, indent=2))
    del model.language_model["mtp"]
    return out


def test_airrunner_quantized_conversion(cli, ckpt_root, twin):
    conv = airrunner_convert(ckpt_root, twin)
    keys = [k for k in mx.load(str(conv / "model.safetensors")) if k.startswith("language_model.mtp.")]
    assert len(keys) == 31  # the fork's 4-bit head: 9 linears x (weight, scales, biases) + 4 norm families
    b = load(conv)
    assert b.mtp_source.tensor_count == 31 and b.mtp_source.prefix == "language_model.mtp."
    assert b.mtp_source.norm_convention == "shifted" and "fc" in b.mtp_source.quantized
    assert all("converted MLX files" in d.reason for d in b.mtp_source.norms.values())
    ref = load(twin)
    nn.quantize(ref.mtp, group_size=64, bits=4)
    x = mx.array(IDS)[None]
    out = b.trunk(x, b.trunk.make_cache())
    emb = b.trunk.embed(x[:, 1:])
    got = b.mtp(out.hidden[:, :-1], emb, b.mtp.make_cache())
    want = ref.mtp(out.hidden[:, :-1], emb, ref.mtp.make_cache())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # same quantization of the same weights
    assert_greedy_identity(b, ks=(1, 3))
    info = json.loads(cli("inspect", conv, "--json").stdout)
    assert info["mtp"]["tensors"] == 31 and info["mtp"]["parameters"] == \
        json.loads(cli("inspect", twin, "--json").stdout)["mtp"]["parameters"]  # logical elements, not packed words


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_trunk_and_head_converted_in_each_fp_mode(cli, ckpt_root, twin, mode):
    """The whole model converted in a floating-point mode (mlx_lm reads the trunk's `quantization.mode`, mtpbench
    the head's): both load quantized in that mode and greedy MTP == AR."""
    conv = airrunner_convert(ckpt_root, twin, mode=mode)
    b = load(conv)
    assert {q["mode"] for q in b.mtp_source.quantized.values()} == {mode}
    assert getattr(b.model.language_model.model.layers[0].linear_attn.in_proj_qkv, "mode", None) == mode
    assert_greedy_identity(b, ks=(2,))
    formats = json.loads(cli("inspect", conv, "--json").stdout)["formats"]
    assert formats["mlp"].startswith(mode), formats


def test_airrunner_moe_conversion_keeps_8_bit_routers(ckpt_root, twin):
    moe = make_tiny(ckpt_root / "fmt-moe", TinySpec(moe=True, seed=5, agree=0.9, mtp_experts="switch"))
    conv = airrunner_convert(ckpt_root, twin, moe_twin=moe)
    b = load(conv)
    q = b.mtp_source.quantized
    assert q["layers.0.mlp.gate"]["bits"] == 8
    assert q["layers.0.mlp.gate"]["source"].endswith("['language_model.mtp.layers.0.mlp.gate']")
    assert q["layers.0.mlp.switch_mlp.up_proj"]["bits"] == 4
    assert_greedy_identity(b, ks=(2,))


# -------------------------------------------------------------------------------------------- quantization modes


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32),
                                             ("affine", 3, 32)])
def test_every_mlx_quantization_mode_on_a_head(ckpt_root, trunk_only, twin, mode, bits, group):
    """A sidecar head quantized in each mode mlx supports, declared in `config.json quantization` as mlx_lm writes
    it; fc kept at 8-bit affine by a per-module entry (the mixed packs people publish)."""
    pack = _pack(ckpt_root, trunk_only, f"mode-{mode}-{bits}")
    head = _head_tensors(twin)
    stored = {}
    for name, v in head.items():
        if v.ndim == 2 and name.endswith(".weight"):
            m, b_, g = ("affine", 8, 64) if name == "fc.weight" else (mode, bits, group)
            parts = mx.quantize(v, group_size=g, bits=b_, mode=m)
            stored.update({name: parts[0], name[:-7] + ".scales": parts[1]})
            if m == "affine":
                stored[name[:-7] + ".biases"] = parts[2]
        else:
            stored[name] = v
    mx.save_safetensors(str(pack / "mtp.safetensors"), {f"mtp.{k}": v for k, v in stored.items()})
    _edit_config(pack, quantization={"group_size": group, "bits": bits, "mode": mode,
                                     "mtp.fc": {"group_size": 64, "bits": 8, "mode": "affine"}})
    b = load(pack)
    q = b.mtp_source.quantized
    assert q["fc"] == {"bits": 8, "group_size": 64, "mode": "affine", "source": "config.json quantization['mtp.fc']"}
    assert q["layers.0.self_attn.q_proj"] == {"bits": bits, "group_size": group, "mode": mode,
                                               "source": "config.json quantization"}
    ref = load(twin)
    nn.quantize(ref.mtp, class_predicate=lambda p, m: (
        {"group_size": 64, "bits": 8, "mode": "affine"} if p == "fc" else
        {"group_size": group, "bits": bits, "mode": mode}) if isinstance(m, nn.Linear) else False)
    np.testing.assert_allclose(head_logits(b), head_logits(ref), atol=1e-5, rtol=1e-5)
    fp = head_logits(load(twin))
    assert np.abs(head_logits(b) - fp).max() < 0.25 * np.abs(fp).max()  # within quantization tolerance
    assert_greedy_identity(b, ks=(2,))


def test_a_quantization_entry_that_does_not_fit_the_tensors_is_one_line(cli, ckpt_root, trunk_only, twin):
    pack = _pack(ckpt_root, trunk_only, "mode-mismatch")
    head = _head_tensors(twin)
    wq, s, bb = mx.quantize(head["fc.weight"], group_size=64, bits=8)
    head.update({"fc.weight": wq, "fc.scales": s, "fc.biases": bb})
    mx.save_safetensors(str(pack / "mtp.safetensors"), {f"mtp.{k}": v for k, v in head.items()})
    _edit_config(pack, quantization={"group_size": 64, "bits": 4, "language_model.mtp.fc": {"group_size": 64,
                                                                                             "bits": 4}})
    res = cli("inspect", pack)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "quantization['language_model.mtp.fc']" in res.stderr and "8 bits" in res.stderr


# ------------------------------------------------------------------------------------------------ norms per family


def test_a_mixed_convention_head_loads_as_stored(cli, ckpt_root, trunk_only, twin):
    """pre_fc norms stored as offsets beside shifted ones (the mixed packs seen in the wild): each family is
    decided on its own and loaded as it is."""
    pack = _pack(ckpt_root, trunk_only, "norms-mixed")
    head = {k: (v - 1.0 if k.startswith("pre_fc_norm") else v) for k, v in _head_tensors(twin).items()}
    mx.save_safetensors(str(pack / "mtp.safetensors"), {f"mtp.{k}": v for k, v in head.items()})
    b = load(pack)
    assert b.mtp_source.norm_convention == "mixed"
    assert {f: d.convention for f, d in b.mtp_source.norms.items()} == {
        "pre_fc_norm_embedding": "offset", "pre_fc_norm_hidden": "offset", "norm": "shifted", "q_norm": "shifted",
        "k_norm": "shifted", "input_layernorm": "shifted", "post_attention_layernorm": "shifted"}
    np.testing.assert_allclose(head_logits(b), head_logits(load(twin)), atol=1e-5, rtol=1e-5)
    shown = cli("inspect", pack).stdout
    assert "pre_fc_norm_embedding, pre_fc_norm_hidden offset (values: " in shown


def test_a_config_marker_outranks_the_values(ckpt_root, trunk_only, twin):
    """MTPLX's `mtplx_mtp_norm_encoding: delta` says every norm is an offset, whatever the values look like."""
    pack = _pack(ckpt_root, trunk_only, "norms-marker")
    head = {k: (v - 1.0 if k.endswith("norm.weight") and v.ndim == 1 else v) for k, v in _head_tensors(twin).items()}
    head["layers.0.self_attn.q_norm.weight"] = head["layers.0.self_attn.q_norm.weight"] + 0.8  # ambiguous value
    mx.save_safetensors(str(pack / "mtp.safetensors"), {f"mtp.{k}": v for k, v in head.items()})
    _edit_config(pack, mtplx_mtp_norm_encoding="delta")
    b = load(pack)
    assert {d.convention for d in b.mtp_source.norms.values()} == {"offset"}
    assert all("mtplx_mtp_norm_encoding = delta" in d.reason for d in b.mtp_source.norms.values())


# --------------------------------------------------------------------------------------------- dedicated embeddings


def test_dedicated_embeddings(ckpt_root, trunk_only, twin):
    """`mtp_use_dedicated_embeddings: true`: the head embeds and scores with its own `mtp.embed_tokens` and
    `mtp.lm_head`; equal to the twin when they copy the trunk's, different drafts when they do not."""
    trunk = mx.load(str(trunk_only / "model.safetensors"))
    emb, lm = trunk["language_model.model.embed_tokens.weight"], trunk["language_model.lm_head.weight"]

    def build(name: str, table: mx.array) -> Path:
        pack = _pack(ckpt_root, trunk_only, name)
        head = {**_head_tensors(twin), "embed_tokens.weight": table, "lm_head.weight": lm}
        mx.save_safetensors(str(pack / "mtp.safetensors"), {f"mtp.{k}": v for k, v in head.items()})
        _edit_config(pack, text_config={"mtp_use_dedicated_embeddings": True})
        return pack

    same = load(build("dedicated-same", emb))
    assert same.mtp_source.dedicated and same.mtp_source.tensor_count == 17
    np.testing.assert_array_equal(head_logits(same), head_logits(load(twin)))
    assert_greedy_identity(same, ks=(2,))
    other = load(build("dedicated-other", emb[::-1]))
    assert not np.allclose(head_logits(other), head_logits(same))
    assert_greedy_identity(other, ks=(2,))
    stripped = _pack(ckpt_root, trunk_only, "dedicated-missing")
    mx.save_safetensors(str(stripped / "mtp.safetensors"), {f"mtp.{k}": v for k, v in _head_tensors(twin).items()})
    _edit_config(stripped, text_config={"mtp_use_dedicated_embeddings": True})
    with pytest.raises(UserError, match="mtp_use_dedicated_embeddings"):
        load(stripped)


# ----------------------------------------------------------------------------------------- raw HF bf16 MoE on CPU


def test_raw_hf_bf16_moe_runs_on_the_cpu_and_says_so_once(ckpt_root, capsys, monkeypatch):
    """Raw Qwen3.5/3.6-35B-A3B layout (bf16, HF keys, fused experts): mlx's CPU GatherMM takes float32 only."""
    path = make_tiny(ckpt_root / "fmt-moe-bf16", TinySpec(moe=True, seed=6, agree=0.9, dtype="bfloat16",
                                                          layout="hf", mtp_experts="fused"))
    monkeypatch.setattr(checkpoint, "_UPCAST_SAID", False)
    b = load(path)
    load(path)
    err = capsys.readouterr().err
    assert err.count("upcast to float32") == 1
    assert b.mtp_source.norm_convention == "offset"
    assert_greedy_identity(b, ks=(2,), tokens=16)


# --------------------------------------------------------------------------------------------- counting, public API


def test_inspect_counts_tensors_as_stored(cli, ckpt_root):
    per_expert = make_tiny(ckpt_root / "fmt-moe-per-expert", TinySpec(moe=True, seed=7))
    info = json.loads(cli("inspect", per_expert, "--json").stdout)
    assert info["mtp"]["tensors"] == 29 and info["mtp"]["expert_layout"] == "per-expert"


def test_every_public_name_the_readme_shows_imports():
    import mtpbench

    from .test_architecture import _resolve_public  # one resolver of documented names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = sorted(set(re.findall(r"`(mtpbench(?:\.[A-Za-z_]+)+)\(", readme)) | {"mtpbench.Bundle"})
    assert "mtpbench.load" in names
    for dotted in names:
        assert callable(_resolve_public(dotted)), dotted
    with pytest.raises(ModuleNotFoundError):  # a stale name fails, it is not skipped
        _resolve_public("mtpbench.sweep.run.run_sweep")
    assert mtpbench.Bundle is checkpoint.Bundle and mtpbench.load is checkpoint.load
