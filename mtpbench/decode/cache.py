"""Rollback of the trunk's hybrid cache (GatedDeltaNet conv + recurrent states, attention KV).

KV caches roll back by moving their offset; GatedDeltaNet states are recurrent and cannot be "un-applied", so a
snapshot taken before verify is restored and the accepted tokens are forwarded again (or, with per-position
capture, the state after the last accepted token is committed directly). mx arrays are immutable, so a snapshot
is a list of references, not a copy of the data.

Quantized KV caches (see `mtpbench.model.kvcache`) roll back exactly the same way; caches whose trim is not exact
(mlx_lm's rotating window once it has wrapped) are refused, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from ..errors import UserError


@dataclass(frozen=True)
class Snapshot:
    arrays: tuple[tuple[mx.array | None, ...] | None, ...]  # per layer: GDN states, or None for KV layers
    offsets: tuple[int | None, ...]  # per layer: KV offset, or None for GDN layers


def _is_kv(c) -> bool:
    return isinstance(c, (KVCache, QuantizedKVCache))


def require_exact_rollback(cache: list) -> None:
    """Refuse, before decoding, any cache layer whose rollback would not be exact."""
    for c in cache:
        if not isinstance(c, ArraysCache) and not _is_kv(c):
            raise UserError(f"{type(c).__name__} cannot be rolled back exactly after a rejected draft; the reference "
                            f"decoder supports KVCache, QuantizedKVCache and GatedDeltaNet state caches")


def snapshot(cache: list) -> Snapshot:
    require_exact_rollback(cache)
    arrays = tuple(tuple(c.cache) if isinstance(c, ArraysCache) else None for c in cache)
    offsets = tuple(None if isinstance(c, ArraysCache) else c.offset for c in cache)
    return Snapshot(arrays, offsets)


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
        elif isinstance(c, QuantizedKVCache):  # dequantized: what attention reads
            for packed in (c.keys, c.values):
                parts = [x[..., : c.offset, :] for x in packed]
                out.append(mx.dequantize(*parts, group_size=c.group_size, bits=c.bits))
        else:
            out.append(c.keys[..., : c.offset, :])
            out.append(c.values[..., : c.offset, :])
    return out
