"""Decode-size forwards of mlx_lm's qwen3_5 layers, compiled once per layer and replayed every step.

Decoding a small model is bound by per-operation overhead: each mlx operation is built in Python and dispatched on
its own, and on the CPU `async_eval` returns only when most of the graph has run (200 small operations: 0.69 ms
inside the call, 0.014 ms left after it), so the host barely runs ahead of the device. `mx.compile` traces a
layer once per input shape and replays it with elementwise chains fused: on the demo (fp32, CPU) a GatedDeltaNet
layer went from 0.44 to 0.18 ms and an MLP from 0.105 to 0.034 ms, bit-identical in fp32 and bf16. What depends on the cache position (RoPE offset, KV-cache write, attention over the cache) stays
outside the trace and runs mlx_lm's own code, so one trace serves every step.

The functions mirror mlx_lm's `qwen3_5.DecoderLayer`, `GatedDeltaNet` and `Qwen3NextAttention` for batch 1 without
padding masks; a test holds the logits equal to mlx_lm's forward, bit for bit. Compiled functions keep the weight
arrays they were traced with, so they belong to one loaded (or policy-quantized) model and are built with it.
GatedDeltaNet layers return their state after every token, which is what a capturing verify commits from
(`model.capture`): the states are computed on the way anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.gated_delta import _gated_delta_step_ops, compute_g, normalize_qk

# Longer inputs (prefills) run mlx_lm's layers eagerly: a trace per prompt length would cost more than it saves,
# and the GatedDeltaNet recurrence is unrolled per token in the trace.
COMPILED_MAX_TOKENS = 32


def compiles(x: mx.array) -> bool:
    """Whether an input of this shape takes the compiled path (batch 1, decode-sized)."""
    return x.shape[0] == 1 and x.shape[1] <= COMPILED_MAX_TOKENS


def gdn_layer(layer: nn.Module, x: mx.array, conv_state: mx.array,
              state: mx.array) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """A linear-attention DecoderLayer from (conv window, recurrent state): its output, and both states after every
    token (index t = after token t)."""
    lin = layer.linear_attn
    B, S, _ = x.shape
    xn = layer.input_layernorm(x)
    qkv = lin.in_proj_qkv(xn)
    z = lin.in_proj_z(xn).reshape(B, S, lin.num_v_heads, lin.head_v_dim)
    b, a = lin.in_proj_b(xn), lin.in_proj_a(xn)
    n_keep = lin.conv_kernel_size - 1
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    windows = [mx.contiguous(conv_input[:, t + 1: t + 1 + n_keep, :]) for t in range(S)]
    conv_out = nn.silu(lin.conv1d(conv_input))
    q, k, v = (t.reshape(B, S, h, d) for t, h, d in zip(
        mx.split(conv_out, [lin.key_dim, 2 * lin.key_dim], -1),
        [lin.num_k_heads, lin.num_k_heads, lin.num_v_heads],
        [lin.head_k_dim, lin.head_k_dim, lin.head_v_dim]))
    q, k = normalize_qk(q, k, inv_scale=lin.head_k_dim ** -0.5, eps=1e-6)
    beta = mx.sigmoid(b)
    g = compute_g(lin.A_log, a, lin.dt_bias)
    if (repeat := lin.num_v_heads // lin.num_k_heads) > 1:
        q, k = mx.repeat(q, repeat, -2), mx.repeat(k, repeat, -2)
    ys, states = [], []
    for t in range(S):
        y, state = _gated_delta_step_ops(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, None)
        ys.append(y)
        states.append(state)
    out = lin.norm(mx.stack(ys, axis=1), z)
    h = x + lin.out_proj(out.reshape(B, S, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), windows, states


def attention_in(layer: nn.Module, x: mx.array, offset: mx.array | None = None,
                 ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """A full-attention DecoderLayer up to the KV-cache write: queries, keys, values (heads first) and the output
    gate; with RoPE applied at `offset` when it is given (an array, so one trace serves every position)."""
    attn = layer.self_attn
    B, L, _ = x.shape
    xn = layer.input_layernorm(x)
    queries, gate = mx.split(attn.q_proj(xn).reshape(B, L, attn.num_attention_heads, -1), 2, axis=-1)
    keys, values = attn.k_proj(xn), attn.v_proj(xn)
    queries = attn.q_norm(queries).transpose(0, 2, 1, 3)
    keys = attn.k_norm(keys.reshape(B, L, attn.num_key_value_heads, -1)).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, attn.num_key_value_heads, -1).transpose(0, 2, 1, 3)
    if offset is not None:
        queries, keys = attn.rope(queries, offset=offset), attn.rope(keys, offset=offset)
    return queries, keys, values, gate.reshape(B, L, -1)


def attention_out(layer: nn.Module, x: mx.array, attended: mx.array, gate: mx.array) -> mx.array:
    """The rest of the layer after attention: gated output projection, residual, MLP."""
    B, L, _ = x.shape
    h = x + layer.self_attn.o_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1) * mx.sigmoid(gate))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _identity(x: mx.array) -> mx.array:
    return x


def _entered(layer: nn.Module, enter: Callable[..., mx.array], *args: mx.array, offset: mx.array | None = None):
    x = enter(*args)
    return (x, *attention_in(layer, x, offset))


def _left(layer: nn.Module, leave: Callable[[mx.array], Any], x: mx.array, attended: mx.array, gate: mx.array):
    return leave(attention_out(layer, x, attended, gate))


class AttentionLayer:
    """A full-attention DecoderLayer on a KV cache: compiled before and after the cache write and attention.

    `enter` / `leave` fold what comes right before and after into the same traces (the MTP head's input fusion and
    final norm; the trunk's final norm and lm head), which saves dispatch boundaries; the layer returns what `leave`
    returns. Plain RoPE (`nn.RoPE`, what qwen3_5 configs build) runs inside the first trace with the offset as an
    array: on the CPU its fallback is a dozen small operations per call (0.06 ms for the demo's queries, against
    0.01 ms for one add). Other RoPE variants run outside, as mlx_lm calls them.
    """

    def __init__(self, layer: nn.Module, enter: Callable[..., mx.array] = _identity,
                 leave: Callable[[mx.array], Any] = _identity):
        self.layer = layer
        self.rope_in_trace = type(layer.self_attn.rope) is nn.RoPE
        self.pre: Callable = mx.compile(partial(_entered, layer, enter))
        self.post: Callable = mx.compile(partial(_left, layer, leave))

    def __call__(self, *inputs: mx.array, cache, mask) -> Any:
        """`inputs` are `enter`'s arguments (the layer input itself by default)."""
        attn = self.layer.self_attn
        if self.rope_in_trace:
            x, queries, keys, values, gate = self.pre(*inputs, offset=mx.array(cache.offset, dtype=mx.int32))
        else:
            x, queries, keys, values, gate = self.pre(*inputs)
            queries, keys = attn.rope(queries, offset=cache.offset), attn.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
        attended = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attn.scale, mask=mask)
        return self.post(x, attended, gate)


class GatedDeltaLayer:
    """A linear-attention DecoderLayer on its (conv window, recurrent state) cache, compiled whole."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.fn: Callable = mx.compile(partial(gdn_layer, layer))

    def __call__(self, x: mx.array, cache) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        lin = self.layer.linear_attn
        conv = cache[0] if cache[0] is not None else mx.zeros((1, lin.conv_kernel_size - 1, lin.conv_dim), x.dtype)
        state = cache[1] if cache[1] is not None else mx.zeros(
            (1, lin.num_v_heads, lin.head_v_dim, lin.head_k_dim), dtype=mx.float32)
        h, windows, states = self.fn(x, conv, state)
        cache[0], cache[1] = windows[-1], states[-1]
        cache.advance(x.shape[1])
        return h, windows, states
