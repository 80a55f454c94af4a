"""The demo and make-tiny's default are laid out exactly as Qwen publishes Qwen3.5 / Qwen3.6 on Hugging Face.

The published layout, written down here as data (not derived from our writer), from:
- transformers `models/qwen3_5/modeling_qwen3_5.py`: `Qwen3_5ForConditionalGeneration` holds `model.language_model`
  and `lm_head` (tied to `model.language_model.embed_tokens` when `tie_word_embeddings`); `Qwen3_5RMSNorm` starts at
  zeros and computes `x * (1 + w)` (layer norms, final norm, q_norm, k_norm); the GatedDeltaNet's
  `Qwen3_5RMSNormGated` starts at ones and computes `x * w`; its `conv1d` is a depthwise `nn.Conv1d`, weight
  (C, 1, K); `mtp.*` is left to the serving runtimes.
- vLLM `model_executor/models/qwen3_5_mtp.py`: `mtp.fc` (hidden x 2 hidden, [embedding, hidden] order),
  `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm` (all `Qwen3_5RMSNorm` = GemmaRMSNorm, 1 + w),
  `mtp.layers.{i}.*` a full-attention decoder layer; the head's embedding is `model.language_model.embed_tokens`.
- llama.cpp `convert_hf_to_gguf` (Qwen3_5TextModel): adds 1 to every `*norm.weight` but `linear_attn.norm.weight`,
  squeezes conv1d, maps `mtp.*` to its nextn layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from safetensors import safe_open
from transformers import AutoConfig

from mtpbench.builders.tiny import TinySpec, make_tiny
from mtpbench.defaults import DEMO_MODEL
from mtpbench.model.checkpoint import load

# Tensor name (after the layer prefix) -> shape in terms of the text config (published Qwen3.5 layout).
MLP = {"mlp.gate_proj.weight": ("inter", "hidden"), "mlp.up_proj.weight": ("inter", "hidden"),
       "mlp.down_proj.weight": ("hidden", "inter")}
LAYER_NORMS = {"input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",)}
LINEAR_ATTENTION = {
    "linear_attn.in_proj_qkv.weight": ("conv_dim", "hidden"),
    "linear_attn.in_proj_z.weight": ("value_dim", "hidden"),
    "linear_attn.in_proj_b.weight": ("v_heads", "hidden"),
    "linear_attn.in_proj_a.weight": ("v_heads", "hidden"),
    "linear_attn.conv1d.weight": ("conv_dim", 1, "kernel"),
    "linear_attn.dt_bias": ("v_heads",),
    "linear_attn.A_log": ("v_heads",),
    "linear_attn.norm.weight": ("v_head_dim",),
    "linear_attn.out_proj.weight": ("hidden", "value_dim"),
}
FULL_ATTENTION = {
    "self_attn.q_proj.weight": ("q_gate", "hidden"),  # query and its output gate, interleaved per head
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.q_norm.weight": ("head_dim",),
    "self_attn.k_norm.weight": ("head_dim",),
}
MTP = {"mtp.fc.weight": ("hidden", "2hidden"), "mtp.pre_fc_norm_embedding.weight": ("hidden",),
       "mtp.pre_fc_norm_hidden.weight": ("hidden",), "mtp.norm.weight": ("hidden",)}
# Stored as offsets (the model uses 1 + w) in the published checkpoints; linear_attn.norm.weight is not.
OFFSET_NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                        "k_norm.weight", "model.language_model.norm.weight", "mtp.norm.weight",
                        "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight")


def published_layout(text: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a Qwen3.5 release with this text config carries (dense, MTP inline)."""
    dims = {"hidden": text["hidden_size"], "2hidden": 2 * text["hidden_size"], "inter": text["intermediate_size"],
            "vocab": text["vocab_size"], "head_dim": text["head_dim"],
            "q": text["num_attention_heads"] * text["head_dim"],
            "q_gate": 2 * text["num_attention_heads"] * text["head_dim"],
            "kv": text["num_key_value_heads"] * text["head_dim"],
            "v_heads": text["linear_num_value_heads"], "v_head_dim": text["linear_value_head_dim"],
            "value_dim": text["linear_num_value_heads"] * text["linear_value_head_dim"],
            "conv_dim": 2 * text["linear_num_key_heads"] * text["linear_key_head_dim"]
            + text["linear_num_value_heads"] * text["linear_value_head_dim"],
            "kernel": text["linear_conv_kernel_dim"], 1: 1}
    names = {"model.language_model.embed_tokens.weight": ("vocab", "hidden"),
             "model.language_model.norm.weight": ("hidden",), **MTP}
    if not text["tie_word_embeddings"]:
        names["lm_head.weight"] = ("vocab", "hidden")
    for i, kind in enumerate(text["layer_types"]):
        mixer = LINEAR_ATTENTION if kind == "linear_attention" else FULL_ATTENTION
        names.update({f"model.language_model.layers.{i}.{k}": v for k, v in {**mixer, **MLP, **LAYER_NORMS}.items()})
    for i in range(text["mtp_num_hidden_layers"]):
        names.update({f"mtp.layers.{i}.{k}": v for k, v in {**FULL_ATTENTION, **MLP, **LAYER_NORMS}.items()})
    return {k: tuple(dims[d] for d in shape) for k, shape in names.items()}


def stored(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("hf") / "tiny", TinySpec(seed=4))


@pytest.fixture(scope="module", params=["demo", "tiny"])
def checkpoint(request, tiny_hf) -> Path:
    return DEMO_MODEL if request.param == "demo" else tiny_hf


def test_names_shapes_and_dtype_are_the_published_layout(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    tensors, meta = stored(checkpoint)
    assert {k: v.shape for k, v in tensors.items()} == published_layout(text)
    assert meta == {"format": "pt"}
    assert {str(v.dtype) for v in tensors.values()} == {text["dtype"]}


def test_config_is_a_qwen3_5_release_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and config["model_type"] == "qwen3_5"
    assert text["model_type"] == "qwen3_5_text" and text["mtp_num_hidden_layers"] == 1
    assert text["mtp_use_dedicated_embeddings"] is False and text["attn_output_gate"] is True
    n, interval = text["num_hidden_layers"], text["full_attention_interval"]
    assert text["layer_types"] == ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                   for i in range(n)]
    rope = text["rope_parameters"]
    assert rope["rope_type"] == "default" and rope["mrope_interleaved"] is True
    assert sum(rope["mrope_section"]) == int(text["head_dim"] * rope["partial_rotary_factor"]) // 2
    hf = AutoConfig.from_pretrained(checkpoint)  # transformers reads it as Qwen3.5 (no vision_config needed)
    assert type(hf).__name__ == "Qwen3_5Config" and hf.text_config.layer_types == text["layer_types"]


def test_norms_are_stored_as_offsets_and_loaders_add_one_once(checkpoint):
    """Loaded weights = 1 + stored for exactly the offset norms (trunk via mlx_lm, head via mtpbench), the
    GatedDeltaNet norm as stored, conv1d moved to MLX's (C, K, 1)."""
    tensors, _ = stored(checkpoint)
    model, _ = mlx_lm_load(str(checkpoint))
    trunk = {k.replace("language_model.model.", "model.language_model.").removeprefix("language_model."): v
             for k, v in tree_flatten(model.parameters())}
    head = {f"mtp.{k}": v for k, v in tree_flatten(load(checkpoint).mtp.parameters())}
    seen = 0
    for name, w in tensors.items():
        got = np.asarray((trunk.get(name) if name in trunk else head[name]).astype(mx.float32))
        if name.endswith(OFFSET_NORM_SUFFIXES):
            np.testing.assert_array_equal(got, w.astype(np.float32) + 1.0, err_msg=name)
            seen += 1
        elif name.endswith("conv1d.weight"):
            np.testing.assert_array_equal(got, np.moveaxis(w, 2, 1), err_msg=name)
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    assert seen == 2 * text["num_hidden_layers"] + text["layer_types"].count("full_attention") * 2 + 1 + 3 + 4


def test_mlx_lm_and_mtpbench_give_identical_logits(checkpoint):
    model, tok = mlx_lm_load(str(checkpoint))
    b = load(checkpoint)
    ids = mx.array([tok.encode("def parse(self, text):\n    return [int(x) for x in text.split(',')]\n")])
    ref = model(ids)
    got = b.trunk(ids, b.trunk.make_cache()).logits
    np.testing.assert_array_equal(np.asarray(got.astype(mx.float32)), np.asarray(ref.astype(mx.float32)))
