"""Tiny random Qwen3.5 checkpoints with an MTP head, in every on-disk layout users meet.

Tests need real checkpoints without a hub: by default this writes a directory laid out exactly as Qwen publishes
Qwen3.5 on Hugging Face (config.json with `text_config`, `model.language_model.*` / `lm_head.*` / `mtp.*` tensors,
conv1d as (C, 1, K), norms stored as offsets, a locally built tokenizer), which `mlx_lm.load` and `mtpbench.load`
both read through their sanitizers. The options reproduce the other layouts seen in the wild: MLX conversions
(`layout="mlx"`: mlx_lm's key names, conv axis order and already-shifted norms), MTP tensors under each known
prefix or in a `mtp.safetensors` sidecar, sharded weights with an index.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..model.mtp import EXPERT_LAYOUTS, EXPERT_PROJS, FUSED, MTP_NORM_SUFFIXES, PER_EXPERT
from .net import Net
from .tokenizer import pad_vocab, train_bpe, write_tokenizer

MTP_PREFIXES = ("mtp.", "model.mtp.", "language_model.mtp.", "model.language_model.mtp.")
# Trunk norms that raw HF checkpoints store as offsets (mlx_lm's sanitize adds 1 to exactly these).
TRUNK_OFFSET_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                      ".q_norm.weight", ".k_norm.weight")

_TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "for i in range(10):\n    print(i * i)\n",
    "import numpy as np\nx = np.zeros((3, 4))\n",
    "Speculative decoding drafts tokens and verifies them with one forward pass. ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs. ",
    "What is 12 times 7? Let us think step by step: 12 * 7 = 84.\n",
]


@dataclass(frozen=True)
class TinySpec:
    """What to build. Defaults give a 4-layer (GDN, attention, GDN, attention) model in under a second."""

    seed: int = 0
    layers: int = 4
    hidden: int = 64
    vocab: int = 320  # tokenizer size
    vocab_size: int = 0  # model vocabulary (embedding and lm head rows); 0: `vocab`. Wider ids decode to placeholders
    mtp: bool = True
    mtp_layout: str = "inline"  # inline | sidecar
    mtp_prefix: str = "mtp."
    layout: str = "hf"  # hf: as Qwen publishes on Hugging Face | mlx: as mlx_lm.convert writes (shifted norms)
    shards: int = 1
    tie_embeddings: bool = False
    agree: float = 0.0  # 0..1: build the head to predict what the trunk predicts (drafts get accepted)
    dtype: str = "float32"  # or bfloat16, the dtype of real releases
    head_dim: int = 16  # attention and GatedDeltaNet head dim (heads = hidden / head_dim); 32+ lets mlx quantize
    # the KV cache (its groups are 32, 64, 128)
    moe: bool = False  # qwen3_5_moe: every layer's MLP (the head's too) is a sparse MoE block with a shared expert
    experts: int = 4
    experts_per_token: int = 2
    mtp_experts: str = PER_EXPERT  # how the head's experts are stored: per-expert | fused | switch (MLX)

    @property
    def model_vocab(self) -> int:
        return self.vocab_size or self.vocab


LAYOUTS = ("hf", "mlx")


def hf_text_fields(layers: int, interval: int, head_dim: int, dtype: str, rope_theta: float) -> dict:
    """The text_config fields Qwen3.5's published configs carry beside the shapes (Qwen/Qwen3.5-0.8B's config.json):
    the explicit layer pattern, gated attention, the MTP head's own embedding flag, dtypes and rope_parameters with
    the interleaved M-RoPE sections (equal positions for text, so plain RoPE; vLLM and llama.cpp read them)."""
    pairs = int(head_dim * 0.25) // 2  # rotary pairs: the sections split them 3 ways, as [11, 11, 10] does 32
    section = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    return {
        "layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
        "full_attention_interval": interval,
        "attn_output_gate": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mtp_use_dedicated_embeddings": False,
        "mamba_ssm_dtype": "float32",
        "dtype": dtype,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.25,
                            "mrope_interleaved": True, "mrope_section": section},
    }


def text_config(spec: TinySpec) -> dict:
    heads = max(2, spec.hidden // spec.head_dim)
    return {
        "model_type": "qwen3_5_text",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.hidden * 2,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": spec.head_dim,
        "rms_norm_eps": 1e-6,
        "vocab_size": spec.model_vocab,
        "linear_num_value_heads": heads,
        "linear_num_key_heads": max(1, heads // 2),
        "linear_key_head_dim": spec.head_dim,
        "linear_value_head_dim": spec.head_dim,
        "linear_conv_kernel_dim": 4,
        "tie_word_embeddings": spec.tie_embeddings,
        "max_position_embeddings": 4096,
        "mtp_num_hidden_layers": 1 if spec.mtp else 0,
        **hf_text_fields(spec.layers, 2, spec.head_dim, spec.dtype, 10000.0),
        **({"model_type": "qwen3_5_moe_text", "num_experts": spec.experts,
            "num_experts_per_tok": spec.experts_per_token, "moe_intermediate_size": spec.hidden // 2,
            "shared_expert_intermediate_size": spec.hidden, "norm_topk_prob": True} if spec.moe else {}),
    }


def checkpoint_config(text: dict) -> dict:
    moe = bool(text.get("num_experts"))
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def _perturb_norms(params: dict[str, mx.array], rng: np.random.Generator) -> dict[str, mx.array]:
    """Random init leaves every norm at exactly 1, which would hide a missing or doubled offset shift."""
    out = {}
    for k, v in params.items():
        if v.ndim == 1 and k.endswith("norm.weight"):
            v = mx.array(1.0 + 0.2 * rng.standard_normal(v.shape).astype(np.float32))
        out[k] = v
    return out


def _perturbed(module, rng: np.random.Generator) -> None:
    module.update(tree_unflatten(list(_perturb_norms(dict(tree_flatten(module.parameters())), rng).items())))


def _agree(net, strength: float) -> None:
    """Make drafts agree with the trunk, instantly and by construction (random heads almost never agree).

    Shrinking every residual branch's output by (1 - strength) makes the trunk nearly a bigram model,
    logits(t) ~ lm_head(norm(embed(x[t]))). A head whose fc passes the embedding half through (and whose own layer
    is shrunk alike, its final norm equal to the trunk's) then computes nearly the same function of x[t+1] that
    the trunk will compute one position later. `strength` near 1 gives acceptance near 1; lower values less.
    """
    keep = 1.0 - strength
    for module in (net.model, net.mtp):
        for path, m in module.named_modules():
            if path.endswith(("o_proj", "out_proj", "down_proj")):
                m.weight = m.weight * keep
    hidden = net.mtp.fc.weight.shape[0]
    net.mtp.fc.weight = mx.concatenate([mx.eye(hidden), mx.zeros((hidden, hidden))], axis=1)
    net.mtp.pre_fc_norm_embedding.weight = mx.ones((hidden,))
    net.mtp.norm.weight = net.model.language_model.model.norm.weight


def random_weights(spec: TinySpec) -> tuple[dict, dict[str, mx.array], dict[str, mx.array]]:
    """(config, trunk tensors in MLX layout, MTP tensors without prefix), seeded."""
    mx.random.seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    config = checkpoint_config(text_config(spec))
    net = Net(config)
    _perturbed(net.model, rng)
    _perturbed(net.mtp, rng)
    if spec.agree:  # shapes the trunk too, so a --no-mtp twin has the very same trunk (for graft tests)
        _agree(net, spec.agree)
    dtype = getattr(mx, spec.dtype)
    trunk = {k: v.astype(dtype) for k, v in tree_flatten(net.model.parameters())}
    mtp = {k: v.astype(dtype) for k, v in tree_flatten(net.mtp.parameters())} if spec.mtp else {}
    return config, trunk, mtp


def to_hf_layout(trunk: dict[str, mx.array], mtp: dict[str, mx.array]) -> tuple[dict, dict]:
    """MLX layout -> raw Hugging Face layout: key names, conv1d axis order, norms as offsets."""
    hf = {}
    for k, v in trunk.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model."):
            k = k[len("language_model."):]
        if "conv1d.weight" in k:
            v = v.moveaxis(2, 1)
        if any(k.endswith(s) for s in TRUNK_OFFSET_NORMS):
            v = v - 1.0
        hf[k] = v
    for k in [k for k in hf if k.endswith(".mlp.switch_mlp.gate_proj.weight")]:  # HF MoE trunks fuse gate and up
        p = k[: -len("switch_mlp.gate_proj.weight")]
        hf[p + "experts.gate_up_proj"] = mx.concatenate([hf.pop(k), hf.pop(p + "switch_mlp.up_proj.weight")], axis=1)
        hf[p + "experts.down_proj"] = hf.pop(p + "switch_mlp.down_proj.weight")
    mtp_hf = {k: (v - 1.0 if any(k.endswith(s) for s in MTP_NORM_SUFFIXES) else v) for k, v in mtp.items()}
    return hf, mtp_hf


def expert_layout(mtp: dict[str, mx.array], layout: str) -> dict[str, mx.array]:
    """An MoE head's experts (MLX switch layers) in the layout checkpoints ship: per-expert, fused or switch."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"--mtp-experts must be one of {', '.join(EXPERT_LAYOUTS)}")
    out = dict(mtp)
    for k in [k for k in mtp if ".mlp.switch_mlp.gate_proj." in k]:
        p = k[: k.index("switch_mlp.")]
        if layout == PER_EXPERT:
            for proj in EXPERT_PROJS:
                stacked = out.pop(f"{p}switch_mlp.{proj}.weight")
                out.update({f"{p}experts.{e}.{proj}.weight": stacked[e] for e in range(stacked.shape[0])})
        elif layout == FUSED:
            gate, up = out.pop(p + "switch_mlp.gate_proj.weight"), out.pop(p + "switch_mlp.up_proj.weight")
            out[p + "experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
            out[p + "experts.down_proj"] = out.pop(p + "switch_mlp.down_proj.weight")
    return out


def write_weights(out: Path, tensors: dict[str, mx.array], shards: int, sidecar: dict[str, mx.array],
                  fmt: str = "mlx") -> None:
    """Write `model.safetensors` or N shards plus an index; the sidecar (if any) as `mtp.safetensors`. `fmt` is the
    safetensors header's format tag: "pt" as Hugging Face releases carry, "mlx" as mlx_lm conversions do."""
    names = sorted(tensors)
    if shards <= 1:
        mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": fmt})
    else:
        groups = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(str(out / fname), {n: tensors[n] for n in group}, metadata={"format": fmt})
            weight_map.update({n: fname for n in group})
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if sidecar:
        mx.save_safetensors(str(out / "mtp.safetensors"), sidecar, metadata={"format": fmt})


def make_tiny(out: str | Path, spec: TinySpec = TinySpec(), force: bool = False) -> Path:
    """Build a tiny checkpoint directory at `out` and return its path. A non-empty `out` is refused unless `force`
    (then its old weights and index go, so no stale shard is loaded beside the new ones; nothing else is removed)."""
    if spec.mtp_prefix not in MTP_PREFIXES:
        raise ValueError(f"--mtp-prefix must be one of {', '.join(MTP_PREFIXES)}")
    if spec.layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}")
    if spec.mtp_layout not in ("inline", "sidecar"):
        raise ValueError("--mtp-layout must be inline or sidecar")
    if spec.moe and not 1 <= spec.experts_per_token <= spec.experts:
        raise ValueError(f"--experts-per-token must be between 1 and --experts ({spec.experts})")
    if spec.vocab_size and spec.vocab_size < spec.vocab:
        raise ValueError(f"--vocab-size must be at least the tokenizer's --vocab ({spec.vocab}), got {spec.vocab_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force or not out.is_dir():
            raise ValueError(f"{out} already exists and is not empty; choose another directory"
                             + ("" if not out.is_dir() else " or pass --force to overwrite a checkpoint there"))
        for old in (*out.glob("*.safetensors"), out / "model.safetensors.index.json"):
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    config, trunk, mtp = random_weights(spec)
    if spec.layout == "hf":
        trunk, mtp = to_hf_layout(trunk, mtp)
    if spec.moe:
        mtp = expert_layout(mtp, spec.mtp_experts)
    prefixed = {spec.mtp_prefix + k: v for k, v in mtp.items()}
    inline = spec.mtp_layout == "inline"
    write_weights(out, {**trunk, **(prefixed if inline else {})}, spec.shards, {} if inline else prefixed,
                  "pt" if spec.layout == "hf" else "mlx")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    random.seed(spec.seed)
    tok = train_bpe(_TOKENIZER_TEXT * 4, spec.vocab)
    write_tokenizer(pad_vocab(tok, spec.vocab_size) if spec.vocab_size > spec.vocab else tok, out)
    return out
