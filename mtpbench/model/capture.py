"""What a capturing verify keeps, so rollback commits a prefix instead of re-forwarding.

After a verify over [last, d1..dK] with j drafts accepted, the trunk must hold the state after `last` + d1..dj.
Attention KV caches get there by trimming. GatedDeltaNet layers are recurrent: a plain forward keeps only the
state after all K+1 tokens, so the fallback restores a snapshot and forwards the j+1 accepted tokens again (about
one more decode step per rejected step). The compiled GatedDeltaNet layer (`model.compiled.gdn_layer`, the same
recurrence as mlx_lm's CPU path) returns the conv window and recurrent state after every token; committing
position j is then a pointer swap. A test holds the committed states equal to a fresh prefill's.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class LayerStates:
    """Per-position (conv window, recurrent state) of one GatedDeltaNet layer: index t = after token t."""

    conv: tuple[mx.array, ...]
    recurrent: tuple[mx.array, ...]


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
