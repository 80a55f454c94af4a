"""Snapshot and restore of the trunk's hybrid cache (GatedDeltaNet conv + recurrent states, attention KV).

KV caches roll back by moving their offset; GatedDeltaNet states are recurrent and cannot be "un-applied", so a
snapshot taken before verify is restored and the accepted tokens are forwarded again. mx arrays are immutable,
so a snapshot is a list of references, not a copy of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache


@dataclass(frozen=True)
class Snapshot:
    arrays: tuple[tuple[mx.array | None, ...] | None, ...]  # per layer: GDN states, or None for KV layers
    offsets: tuple[int | None, ...]  # per layer: KV offset, or None for GDN layers


def snapshot(cache: list) -> Snapshot:
    arrays, offsets = [], []
    for c in cache:
        if isinstance(c, ArraysCache):
            arrays.append(tuple(c.cache))
            offsets.append(None)
        elif isinstance(c, KVCache):
            arrays.append(None)
            offsets.append(c.offset)
        else:
            raise TypeError(f"unsupported cache type for rollback: {type(c).__name__}")
    return Snapshot(tuple(arrays), tuple(offsets))


def restore(cache: list, snap: Snapshot) -> None:
    """Put every layer back to the snapshot: GDN states by reference, KV caches trimmed to the saved offset."""
    for c, arrays, offset in zip(cache, snap.arrays, snap.offsets):
        if arrays is not None:
            c.cache = list(arrays)
        else:
            c.trim(c.offset - offset)


def state_arrays(cache: list) -> list[mx.array]:
    """Every array that determines future outputs (valid KV prefix and GDN states), for exactness tests."""
    out = []
    for c in cache:
        if isinstance(c, ArraysCache):
            out.extend(a for a in c.cache if a is not None)
        else:
            out.append(c.keys[..., : c.offset, :])
            out.append(c.values[..., : c.offset, :])
    return out
