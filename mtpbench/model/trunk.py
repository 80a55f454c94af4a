"""A thin view of mlx_lm's qwen3_5 model that also hands out the hidden states the MTP head needs.

mlx_lm's forward returns only logits (or the post-norm hidden); the MTP head needs the trunk hidden at every
position, and the pre-norm variant needs it before the final norm. This runs mlx_lm's masks and caches in the same
order as `Qwen3_5TextModel.__call__`: prefills through mlx_lm's own layers, decode-sized inputs through the same
layers compiled (`model.compiled`), so logits are identical to mlx_lm's (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from .compiled import COMPILED_MAX_TOKENS, AttentionLayer, GatedDeltaLayer, compiles
from .kvcache import FULL_KV, KVCacheSpec, quantize_kv
from .mtp import HiddenVariant
from .capture import Captured, LayerStates

# Prompt tokens per prefill forward: mlx_lm's `generate_step(prefill_step_size=2048)` default (a test holds them
# equal), so TTFT and peak memory by context bucket describe the prompt as mlx_lm runs it.
PREFILL_STEP = 2048

@dataclass(frozen=True)
class TrunkOutput:
    logits: mx.array  # (1, L, V)
    hidden: mx.array  # (1, L, H), the variant the MTP head is fed


class Trunk:
    """Forward passes over the language model of an mlx_lm `qwen3_5` model."""

    def __init__(self, model: nn.Module, variant: HiddenVariant = HiddenVariant.POST_NORM):
        self.model = model
        self.lm = model.language_model
        self.body = self.lm.model
        self.variant = variant
        self._layers: dict[int, AttentionLayer | GatedDeltaLayer] = {}

    def make_cache(self, kv: KVCacheSpec = FULL_KV) -> list:
        """mlx_lm's own hybrid cache, with the attention KV quantized when `kv` asks for it."""
        return quantize_kv(self.model.make_cache(), kv, self.lm.args.head_dim)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.body.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.lm.args.tie_word_embeddings:
            return self.body.embed_tokens.as_linear(hidden)
        return self.lm.lm_head(hidden)

    def __call__(self, tokens: mx.array, cache: list, causal: bool = True) -> TrunkOutput:
        return self._forward(tokens, cache, capture=False, causal=causal)[0]

    def prefill(self, prompt: list[int], cache: list, step: int = PREFILL_STEP,
                on_chunk: Callable[[mx.array, int], None] | None = None) -> TrunkOutput:
        """The prompt's forward in chunks of `step` tokens, each chunk's cache evaluated before the next (as mlx_lm's
        prefill), with the LM head applied to the last position only: at V = 248,320 all-position logits would be
        0.5 MB a token (4 GB at 8k context), and every caller keeps the last row. `on_chunk(hidden, start)` sees
        each chunk's hidden (the MTP head's feed) before the next is computed. Returns the last position's output.
        """
        x = mx.array(prompt)[None]
        out = None
        for start in range(0, x.shape[1], step):
            out = self._forward(x[:, start: start + step], cache, capture=False, last_only=True)[0]
            if on_chunk is not None:
                on_chunk(out.hidden, start)
            mx.eval([c.state for c in cache])
        assert out is not None, "an empty prompt has no prefill"
        return TrunkOutput(logits=out.logits[:, -1:], hidden=out.hidden[:, -1:])

    def forward_capturing(self, tokens: mx.array, cache: list, causal: bool = True) -> tuple[TrunkOutput, Captured]:
        """The same forward, keeping every position's GatedDeltaNet state so any prefix can be committed."""
        out, captured = self._forward(tokens, cache, capture=True, causal=causal)
        assert captured is not None
        return out, captured

    def _forward(self, tokens: mx.array, cache: list, capture: bool, causal: bool = True,
                 last_only: bool = False) -> tuple[TrunkOutput, Captured | None]:
        """`causal=False` exists only for a verification control (a verify forward without the causal mask);
        `last_only` computes logits for the last position only (a prompt chunk)."""
        h = self.body.embed_tokens(tokens)
        layers = self.body.layers
        fa_mask = create_attention_mask(h, cache[self.body.fa_idx]) if causal else None
        ssm_mask = create_ssm_mask(h, cache[self.body.ssm_idx])
        fast = compiles(h) and ssm_mask is None
        if capture and not fast:
            raise ValueError(f"a capturing verify runs batch 1, without padding masks, on at most "
                             f"{COMPILED_MAX_TOKENS} tokens")
        states: dict[int, LayerStates] = {}
        kv_offsets = ({i: c.offset for i, (layer, c) in enumerate(zip(layers, cache)) if not layer.is_linear}
                      if capture else {})
        for i, (layer, c) in enumerate(zip(layers, cache)):
            if not fast:
                h = layer(h, mask=ssm_mask if layer.is_linear else fa_mask, cache=c)
            elif layer.is_linear:
                h, conv, recurrent = self._compiled(i)(h, c)
                if capture:
                    states[i] = LayerStates(tuple(conv), tuple(recurrent))
            else:
                h = self._compiled(i)(h, cache=c, mask=fa_mask)
        logits, hidden = h if isinstance(h, tuple) else self._output(h, last_only)  # a last attention layer folds
        # the output in (decode-sized inputs: a few rows of logits)
        return TrunkOutput(logits=logits, hidden=hidden), Captured(states, kv_offsets) if capture else None

    def _output(self, h: mx.array, last_only: bool = False) -> tuple[mx.array, mx.array]:
        """Final norm and lm head: the logits (of the last position only with `last_only`), and the hidden variant
        the MTP head is fed (every position)."""
        normed = self.body.norm(h)
        logits = self.lm_head(normed[:, -1:] if last_only else normed)
        return logits, normed if self.variant is HiddenVariant.POST_NORM else h

    def _compiled(self, i: int):
        """Layer i's compiled forward, traced on first use (it keeps this model's weights: see model.compiled)."""
        if i not in self._layers:
            layer = self.body.layers[i]
            last = i == len(self.body.layers) - 1
            self._layers[i] = (GatedDeltaLayer(layer) if layer.is_linear
                               else AttentionLayer(layer, **({"leave": self._output} if last else {})))
        return self._layers[i]
