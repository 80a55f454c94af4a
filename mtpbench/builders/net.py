"""The network both checkpoint writers build: an mlx_lm Qwen3.5 model and an MTP head in one module.

`tiny` draws its random weights from it and the demo recipe trains it (one optimizer and one value_and_grad cover
trunk and head), so it lives apart from both.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.qwen3_5 import Model, ModelArgs

from ..model.mtp import MTPHead


class Net(nn.Module):
    """Trunk + head in one module so one optimizer and one value_and_grad cover both."""

    def __init__(self, config: dict):
        super().__init__()
        self.model = Model(ModelArgs.from_dict(copy.deepcopy(config)))  # mlx_lm rewrites rope_parameters in place
        self.mtp = MTPHead(self.model.language_model.args)

    def logits(self, h: mx.array) -> mx.array:
        lm = self.model.language_model
        return lm.model.embed_tokens.as_linear(h) if lm.args.tie_word_embeddings else lm.lm_head(h)

    def trunk(self, x: mx.array) -> tuple[mx.array, mx.array]:
        h = self.model.language_model.model(x)  # post-norm hidden
        return h, self.logits(h)

    def head_logits(self, h: mx.array, next_tokens: mx.array) -> tuple[mx.array, mx.array]:
        z = self.mtp(h, self.model.language_model.model.embed_tokens(next_tokens))
        return z, self.logits(z)
