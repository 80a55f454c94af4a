"""A verify forward that keeps every position's GatedDeltaNet state, so rollback commits instead of re-forwarding.

After a verify over [last, d1..dK] with j drafts accepted, the trunk must hold the state after `last` + d1..dj.
Attention KV caches get there by trimming. GatedDeltaNet layers are recurrent: the plain forward keeps only the
state after all K+1 tokens, so the fallback restores a snapshot and forwards the j+1 accepted tokens again (about
one more decode step per rejected step). Here each GatedDeltaNet layer runs the same recurrence as mlx_lm's CPU
path (`gated_delta_ops`, one `_gated_delta_step_ops` per token) and keeps the state after every token, plus the
conv window after every token; committing position j is then a pointer swap.

The layer code mirrors mlx_lm's `qwen3_5.GatedDeltaNet.__call__` (no padding mask, no lengths: the decoder runs
batch 1). A test holds the logits and committed states equal to mlx_lm's forward and to a fresh prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gated_delta import _gated_delta_step_ops, compute_g, normalize_qk


@dataclass(frozen=True)
class LayerStates:
    """Per-position (conv window, recurrent state) of one GatedDeltaNet layer: index t = after token t."""

    conv: tuple[mx.array, ...]
    recurrent: tuple[mx.array, ...]


def gated_delta_net_capturing(layer: nn.Module, x: mx.array, cache) -> tuple[mx.array, LayerStates]:
    """mlx_lm's GatedDeltaNet forward on `cache`, returning its output and the state after every position."""
    B, S, _ = x.shape
    qkv = layer.in_proj_qkv(x)
    z = layer.in_proj_z(x).reshape(B, S, layer.num_v_heads, layer.head_v_dim)
    b = layer.in_proj_b(x)
    a = layer.in_proj_a(x)
    n_keep = layer.conv_kernel_size - 1
    conv_state = cache[0] if cache[0] is not None else mx.zeros((B, n_keep, layer.conv_dim), dtype=x.dtype)
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    conv_windows = tuple(mx.contiguous(conv_input[:, t + 1: t + 1 + n_keep, :]) for t in range(S))
    conv_out = nn.silu(layer.conv1d(conv_input))
    q, k, v = (t.reshape(B, S, h, d) for t, h, d in zip(
        mx.split(conv_out, [layer.key_dim, 2 * layer.key_dim], -1),
        [layer.num_k_heads, layer.num_k_heads, layer.num_v_heads],
        [layer.head_k_dim, layer.head_k_dim, layer.head_v_dim]))
    q, k = normalize_qk(q, k, inv_scale=layer.head_k_dim ** -0.5, eps=1e-6)
    beta = mx.sigmoid(b)
    g = compute_g(layer.A_log, a, layer.dt_bias)
    state = cache[1]
    if state is None:
        state = mx.zeros((B, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim), dtype=mx.float32)
    if (repeat := layer.num_v_heads // layer.num_k_heads) > 1:
        q, k = mx.repeat(q, repeat, -2), mx.repeat(k, repeat, -2)
    ys, states = [], []
    for t in range(S):
        y, state = _gated_delta_step_ops(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, None)
        ys.append(y)
        states.append(state)
    cache[0], cache[1] = conv_windows[-1], state
    cache.advance(S)
    out = layer.norm(mx.stack(ys, axis=1), z)
    return layer.out_proj(out.reshape(B, S, -1)), LayerStates(conv_windows, tuple(states))


def decoder_layer_capturing(layer: nn.Module, x: mx.array, cache) -> tuple[mx.array, LayerStates]:
    """mlx_lm's `DecoderLayer.__call__` for a linear-attention layer, with the capturing GatedDeltaNet."""
    r, states = gated_delta_net_capturing(layer.linear_attn, layer.input_layernorm(x), cache)
    h = x + r
    return h + layer.mlp(layer.post_attention_layernorm(h)), states


@dataclass(frozen=True)
class Captured:
    """What a capturing verify kept: per-position states of every GDN layer, pre-verify offsets of KV layers."""

    layers: dict[int, LayerStates]
    kv_offsets: dict[int, int]

    def commit(self, cache: list, position: int) -> None:
        """Set `cache` to "after verify token `position`": GDN layers take that position's states, KV caches are
        trimmed to their pre-verify offset + position + 1."""
        for i, c in enumerate(cache):
            if i in self.layers:
                c[0], c[1] = self.layers[i].conv[position], self.layers[i].recurrent[position]
            else:
                c.trim(c.offset - (self.kv_offsets[i] + position + 1))
