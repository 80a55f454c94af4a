"""The Qwen3.5/3.6 MTP head as an `mlx.nn.Module`, and the names of its tensors.

One MTP step predicts the token two ahead of a trunk position t from the trunk hidden at t and the embedding
of token t+1 (see shared/MTP.md). The decoder layer is the trunk's own gated full-attention layer class from
mlx_lm, so the head computes exactly what the checkpoint's architecture defines.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from enum import Enum
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx.utils import tree_flatten
from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs

from .compiled import AttentionLayer, compiles
from .conventions import CHAINS, EMBEDDING, EMBEDDING_HIDDEN, FC, NORMED, POST_NORM, PRE_NORM, PRENORM, PREV, \
    chain_mix


class HiddenVariant(str, Enum):
    """Which trunk hidden feeds the head: after the final norm (vLLM, the default) or before it."""

    POST_NORM = POST_NORM
    PRE_NORM = PRE_NORM


# The norm weights stored as offsets (used as 1 + w) in raw Hugging Face checkpoints.
MTP_NORM_SUFFIXES = (
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
    "norm.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


# How checkpoints store the experts of an MoE head's MLP: one tensor per expert and projection (Qwen3.5 releases),
# a fused gate_up_proj with a stacked down_proj (Qwen3.6 releases), or MLX's stacked switch layers (conversions).
PER_EXPERT, FUSED, SWITCH = "per-expert", "fused", "switch"
EXPERT_LAYOUTS = (PER_EXPERT, FUSED, SWITCH)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


# A head with its own embedding table and lm head (`mtp_use_dedicated_embeddings: true` in the text config):
# `mtp.embed_tokens.weight` (vLLM's Qwen3_5MTP loads `mtp.*` as its predictor's own `embed_tokens`) and
# `mtp.lm_head.weight` (absent when the config ties word embeddings: the dedicated table is the head's lm head).
DEDICATED = ("embed_tokens.weight", "lm_head.weight")


def mtp_tensor_names(num_layers: int = 1, moe: bool = False, dedicated: bool = False,
                     tied: bool = False) -> list[str]:
    """The tensor names of an MTP head as the module holds them (15 for one dense layer), relative to the `mtp.`
    prefix; an MoE head's MLP is the router, the experts as switch layers, and the gated shared expert; a head
    with dedicated embeddings adds its table (and its lm head unless tied)."""
    names = ["fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight"]
    if dedicated:
        names += list(DEDICATED[:1] if tied else DEDICATED)
    for i in range(num_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        if moe:
            names += [p + "mlp.gate.weight", p + "mlp.shared_expert_gate.weight"]
            names += [p + f"mlp.{part}.{n}.weight" for part in ("switch_mlp", "shared_expert") for n in EXPERT_PROJS]
        else:
            names += [p + f"mlp.{n}.weight" for n in EXPERT_PROJS]
    return names


class MTPHead(nn.Module):
    """fc(concat(norm(embed(x[t+1])), norm(h[t]))) -> gated-attention decoder layer(s) -> final norm.

    `__call__` returns the head's normed output hidden; logits come from the trunk's lm head, and the same
    normed hidden is what a chained (depth > 1) step feeds back in as its "trunk hidden".
    """

    def __init__(self, args: TextModelArgs, num_layers: int = 1, dedicated: bool = False):
        super().__init__()
        hidden = args.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        attention_index = args.full_attention_interval - 1  # makes DecoderLayer a full-attention layer
        self.layers = [DecoderLayer(args, layer_idx=attention_index) for _ in range(num_layers)]
        self.norm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.dedicated = dedicated
        self.tied = bool(args.tie_word_embeddings)
        if dedicated:
            self.embed_tokens = nn.Embedding(args.vocab_size, hidden)
            if not self.tied:
                self.lm_head = nn.Linear(hidden, args.vocab_size, bias=False)
        self.concat = EMBEDDING_HIDDEN  # the order of fc's input halves (conventions.CONCATS)

    def with_concat(self, order: str) -> MTPHead:
        """The same weights read with the other input order (a new module tree sharing the arrays; cheap)."""
        if order == self.concat:
            return self
        view = copy.deepcopy(self, memo={id(v): v for _, v in tree_flatten(self.parameters())})
        view.concat = order
        return view

    def embed(self, tokens: mx.array) -> mx.array:
        """The head's own embedding (dedicated heads only; others use the trunk's)."""
        return self.embed_tokens(tokens)

    def logits(self, hidden: mx.array) -> mx.array:
        """The head's own lm head (dedicated heads only; others use the trunk's)."""
        return self.embed_tokens.as_linear(hidden) if self.tied else self.lm_head(hidden)

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        return self.both(hidden, embeddings, cache)[1]

    def both(self, hidden: mx.array, embeddings: mx.array,
             cache: list[KVCache] | None = None) -> tuple[mx.array, mx.array]:
        """The last layer's output before the final norm and after it (the `prenorm` chain feeds the first)."""
        z = self.fuse(hidden, embeddings)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(z, cache[0])
        for layer, c in zip(self.layers, cache):
            z = layer(z, mask=mask, cache=c)
        return z, self.norm(z)

    def fuse(self, hidden: mx.array, embeddings: mx.array) -> mx.array:
        """The head's input: fc(concat(norm(embedding of t+1), norm(hidden at t))), halves in `self.concat` order."""
        e, h = self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)
        return self.fc(mx.concatenate([e, h] if self.concat == EMBEDDING_HIDDEN else [h, e], -1))

    def step(self, hidden: mx.array, embeddings: mx.array, cache: list[KVCache] | None,
             chain: str) -> tuple[mx.array, mx.array]:
        """(the hidden a deeper draft is fed under any chain convention, the normed output the logits come from):
        the fc output, the embedding or the hidden fed, either output, or a blend of two (MTPLX's `mix:`)."""
        x = self.fuse(hidden, embeddings)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(x, cache[0])
        z = x
        for layer, c in zip(self.layers, cache):
            z = layer(z, mask=mask, cache=c)
        normed = self.norm(z)
        sources = {NORMED: normed, PRENORM: z, FC: x, EMBEDDING: embeddings, PREV: hidden}
        mix = chain_mix(chain)
        if mix is None:
            return sources[chain], normed
        a, b, alpha = mix
        return sources[a] * alpha + sources[b] * (1.0 - alpha), normed

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


class CompiledHead:
    """`MTPHead.__call__` on a cache, with decode-sized inputs run through compiled layers (`model.compiled`), and
    greedy draft chains with the trunk's embedding, lm head and argmax folded into the same traces.

    Built once per loaded head and reused by every decode, so each input shape is traced once; longer inputs (the
    prompt's catch-up) run the module itself. Results are identical to the module's (tested). Both chain
    conventions (`conventions.CHAINS`) are served: `normed` feeds a deeper draft the head's normed output, `prenorm`
    its output before the final norm; the traces of the second are built on first use."""

    def __init__(self, head: MTPHead, embed: Callable[[mx.array], mx.array], lm_head: Callable[[mx.array], mx.array]):
        self.head, self.embed, self.lm_head = head, embed, lm_head
        self.layers = self._layers(head.norm)
        self._both_layers: list[AttentionLayer] | None = None
        self._greedy: dict[str, AttentionLayer | None] = {}

    def _layers(self, last: Callable[[mx.array], Any]) -> list[AttentionLayer]:
        n = len(self.head.layers)
        return [AttentionLayer(layer, **({"enter": self.head.fuse} if i == 0 else {}),
                               **({"leave": last} if i == n - 1 else {}))
                for i, layer in enumerate(self.head.layers)]

    def _pre_and_normed(self, z: mx.array) -> tuple[mx.array, mx.array]:
        return z, self.head.norm(z)

    def _greedy_layer(self, chain: str) -> AttentionLayer | None:
        """One layer (every released head): a greedy draft is one trace in, one out; it returns the hidden to
        chain (normed or before the norm) and the draft id."""
        if chain not in self._greedy:
            head, embed, lm_head = self.head, self.embed, self.lm_head

            def enter(hidden: mx.array, tokens: mx.array) -> mx.array:
                return head.fuse(hidden, embed(tokens))

            def leave(z: mx.array) -> tuple[mx.array, mx.array]:
                last = head.norm(z)[:, -1:]
                return (last if chain == NORMED else z[:, -1:]), mx.argmax(lm_head(last), axis=-1)

            self._greedy[chain] = (AttentionLayer(head.layers[0], enter=enter, leave=leave)
                                   if len(head.layers) == 1 and chain in CHAINS else None)
        return self._greedy[chain]

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache: list[KVCache]) -> mx.array:
        if not compiles(hidden):
            return self.head(hidden, embeddings, cache)
        return self._run(self.layers, hidden, embeddings, cache)

    def both(self, hidden: mx.array, embeddings: mx.array, cache: list[KVCache]) -> tuple[mx.array, mx.array]:
        """`MTPHead.both` on a cache: the output before the final norm and after it."""
        if not compiles(hidden):
            return self.head.both(hidden, embeddings, cache)
        if self._both_layers is None:
            self._both_layers = self._layers(self._pre_and_normed)
        return self._run(self._both_layers, hidden, embeddings, cache)

    def chained(self, hidden: mx.array, embeddings: mx.array, cache: list[KVCache],
                chain: str = NORMED) -> tuple[mx.array, mx.array]:
        """(the hidden a deeper draft is fed, the normed output the logits come from) under a chain convention;
        the conventions beyond `conventions.CHAINS` run the module (exact, uncompiled)."""
        if chain not in CHAINS:
            return self.head.step(hidden, embeddings, cache, chain)
        if chain == NORMED:
            z = self(hidden, embeddings, cache)
            return z, z
        return self.both(hidden, embeddings, cache)

    @staticmethod
    def _run(layers: list[AttentionLayer], hidden: mx.array, embeddings: mx.array, cache: list[KVCache]) -> Any:
        mask = create_attention_mask(hidden, cache[0])
        z = layers[0](hidden, embeddings, cache=cache[0], mask=mask)
        for layer, c in zip(layers[1:], cache[1:]):
            z = layer(z, cache=c, mask=mask)
        return z

    def greedy_chain(self, hidden: mx.array, tokens: mx.array, cache: list[KVCache], k: int,
                     chain: str = NORMED) -> mx.array:
        """K greedy drafts, all on the device: the first call feeds the true (hidden at t, token t+1) pairs
        `hidden` (1, r, H) / `tokens` (1, r), each later one the head's own output (`chain`) and draft. Returns
        (K,) ids."""
        greedy = self._greedy_layer(chain)
        if greedy is None or not compiles(hidden):
            z, normed = self.chained(hidden, self.embed(tokens), cache, chain)
            z, normed, d = z[:, -1:], normed[:, -1:], None
            drafted = []
            for i in range(k):
                if i:
                    z, normed = self.chained(z, self.embed(d[None]), cache, chain)
                d = mx.argmax(self.lm_head(normed)[0, -1], keepdims=True)
                drafted.append(d)
            return mx.concatenate(drafted)
        z, d = greedy(hidden, tokens, cache=cache[0], mask=create_attention_mask(hidden, cache[0]))
        drafted = [d]
        for _ in range(1, k):
            z, d = greedy(z, d, cache=cache[0], mask=None)
            drafted.append(d)
        return mx.concatenate(drafted, axis=1).reshape(-1)

    def make_cache(self) -> list[KVCache]:
        return self.head.make_cache()
