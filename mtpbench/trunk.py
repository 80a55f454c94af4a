"""A thin view of mlx_lm's qwen3_5 model that also hands out the hidden states the MTP head needs.

mlx_lm's forward returns only logits (or the post-norm hidden); the MTP head needs the trunk hidden at every
position, and the pre-norm variant needs it before the final norm. This runs mlx_lm's own layers, masks and
caches in the same order as `Qwen3_5TextModel.__call__`, so logits are identical to mlx_lm's.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from .mtp import HiddenVariant


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

    def make_cache(self) -> list:
        return self.model.make_cache()

    def embed(self, tokens: mx.array) -> mx.array:
        return self.body.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.lm.args.tie_word_embeddings:
            return self.body.embed_tokens.as_linear(hidden)
        return self.lm.lm_head(hidden)

    def __call__(self, tokens: mx.array, cache: list) -> TrunkOutput:
        h = self.body.embed_tokens(tokens)
        layers = self.body.layers
        fa_mask = create_attention_mask(h, cache[self.body.fa_idx])
        ssm_mask = create_ssm_mask(h, cache[self.body.ssm_idx])
        for layer, c in zip(layers, cache):
            h = layer(h, mask=ssm_mask if layer.is_linear else fa_mask, cache=c)
        normed = self.body.norm(h)
        hidden = normed if self.variant is HiddenVariant.POST_NORM else h
        return TrunkOutput(logits=self.lm_head(normed), hidden=hidden)
