"""The physical limit next to a decode tok/s: weight bytes read per token, and the machine's memory bandwidth.

Decoding one token reads every trunk weight once (AR); an MTP step reads the trunk once plus K draft steps of the
head and the lm head (drafts use the trunk's), and emits tau tokens. Weight bytes per token x tok/s is the achieved
weight bandwidth; over the machine's copy bandwidth it says how close a figure is to what memory allows.

Mixture-of-experts layers read only the experts their tokens are routed to. A forward over T tokens is counted
with the upper bound min(E, T x experts-per-token) of its E experts per layer (as if no two tokens shared an
expert): AR reads k of E per layer, a K+1-token verify at most (K+1) x k. Everything else (attention, GatedDeltaNet,
router, shared expert, embedding, lm head) is read whole.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import Bundle


def nbytes(module) -> int:
    """Bytes of every parameter of a module, quantized weights' scales and biases included."""
    return int(sum(v.nbytes for _, v in tree_flatten(module.parameters())))


def expert_bytes(module) -> int:
    """Bytes of the routed experts (mlx_lm switch layers, quantized or not) of a module."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return sum(nbytes(m) for _, m in module.named_modules() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)))


def _read_bytes(bundle: Bundle, module, tokens: int) -> int:
    """A module's bytes read by one forward over `tokens` tokens: routed experts at the bound above."""
    total, experts = nbytes(module), expert_bytes(module)
    args = bundle.trunk.lm.args
    if not experts or not args.num_experts:
        return total
    touched = min(args.num_experts, tokens * args.num_experts_per_tok)
    return total - experts + experts * touched // args.num_experts


def weight_bytes(bundle: Bundle, tokens: int = 1) -> int:
    """Trunk weight bytes one forward over `tokens` tokens reads (the whole mlx_lm model: embedding, layers, norms,
    lm head; for MoE, the routed experts at most tokens x experts-per-token per layer)."""
    return _read_bytes(bundle, bundle.model, tokens)


def draft_step_bytes(bundle: Bundle) -> int:
    """One draft step: the MTP head (its experts for one token) plus the lm head it shares with the trunk (the
    embedding table when tied)."""
    lm = bundle.trunk.lm
    lm_head = lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head
    return _read_bytes(bundle, bundle.require_mtp(), 1) + nbytes(lm_head) if bundle.mtp is not None else 0


def bytes_per_token(trunk_bytes: int, draft_bytes: int, k: int, tau: float) -> float:
    """Weight bytes read per emitted token: AR (k = 0) reads the trunk; MTP reads trunk + k drafts per tau tokens.
    `trunk_bytes` is what the step's trunk forward reads (`weight_bytes(bundle, k + 1)`)."""
    if k == 0:
        return float(trunk_bytes)
    return (trunk_bytes + k * draft_bytes) / tau if tau and math.isfinite(tau) else float("nan")


@lru_cache(maxsize=4)
def copy_bandwidth(mb: int = 256, best_of: int = 5) -> float:
    """Machine memory bandwidth in GB/s: the best large numpy copy, read + write bytes counted (once per process)."""
    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(best_of):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


# ------------------------------------------------------------------------------------------ KV-cache bytes per step
# Apart from the weights, a decode step reads the attention KV cache: every full-attention layer reads a key and a
# value vector per KV head per cached position. The GatedDeltaNet layers keep a fixed-size state instead, so only
# the attention layers grow with context.


def kv_bytes_per_position(attention_layers: int, kv_heads: int, head_dim: int, bytes_per_element: float) -> float:
    """Bytes one cached position costs a step that attends over it: layers x 2 (key, value) x KV heads x head dim
    x bytes per element."""
    return float(attention_layers * 2 * kv_heads * head_dim * bytes_per_element)


def kv_element_bytes(bits: int, group_size: int, dtype_bytes: int) -> float:
    """Bytes per cached element: the model's dtype unquantized; bits / 8 plus a scale and a bias (in the model's
    dtype) per group when quantized (mlx_lm's QuantizedKVCache)."""
    return float(dtype_bytes) if not bits else bits / 8 + 2 * dtype_bytes / group_size


def kv_layout(bundle: Bundle, bits: int = 0, group_size: int = 64) -> tuple[float, float]:
    """(trunk, MTP head) KV bytes per cached position for this checkpoint; the head's own cache is never
    quantized (model/kvcache.py)."""
    text = bundle.text_config
    layers = bundle.trunk.lm.model.layers
    attention = sum(1 for layer in layers if not getattr(layer, "is_linear", False))
    kv_heads = int(text.get("num_key_value_heads") or text.get("num_attention_heads") or 0)
    head_dim = int(text.get("head_dim") or 0) or int(text.get("hidden_size", 0)) // max(
        int(text.get("num_attention_heads") or 1), 1)
    floats = [v.dtype.size for _, v in tree_flatten(bundle.model.parameters()) if "float" in str(v.dtype)]
    dtype_bytes = floats[0] if floats else 2
    head_layers = len(bundle.mtp.layers) if bundle.mtp is not None else 0
    return (kv_bytes_per_position(attention, kv_heads, head_dim, kv_element_bytes(bits, group_size, dtype_bytes)),
            kv_bytes_per_position(head_layers, kv_heads, head_dim, dtype_bytes))


def kv_bytes_per_step(layout: tuple[float, float], k: int, context: float) -> float:
    """KV-cache bytes one decode step reads at `context` cached positions: the trunk's attention layers once (an
    AR token, or a verify of K+1 positions), plus K draft steps over the MTP head's own cache (same length)."""
    trunk, head = layout
    return (trunk + k * head) * context
