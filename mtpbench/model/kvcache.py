"""KV-cache precision as a benchmark axis: mlx_lm's QuantizedKVCache for the trunk's attention layers.

Quantized KV quantizes every position's key and value vectors on their own (groups run along the head
dimension), so writing K+1 positions during verify and trimming the rejected ones leaves the kept positions
bit-identical to a cache that never saw the drafts: rollback stays exact (tested against a fresh prefill). The
MTP head's own one-layer cache stays unquantized: it is tiny, and runtimes keep it apart from the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..errors import UserError

KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVCacheSpec:
    """How the trunk's attention KV cache stores keys and values: bits 0 is the model's own dtype."""

    bits: int = 0
    group_size: int = 0  # 0: 64, or the largest of 32/64/128 that divides the head dim when 64 does not

    def __post_init__(self) -> None:
        if self.bits and self.bits not in KV_BITS:
            raise UserError(f"KV-cache bits must be 0 (unquantized) or one of {', '.join(map(str, KV_BITS))}, "
                            f"got {self.bits}")
        if self.group_size not in (0, *GROUP_SIZES):
            raise UserError(f"KV-cache group size must be 32, 64 or 128, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def label(self) -> str:
        """`kv8` / `kv4g32`; empty for the unquantized cache (so existing labels and ids do not change)."""
        if not self.quantized:
            return ""
        return f"kv{self.bits}" + (f"g{self.group_size}" if self.group_size else "")

    def resolved_group_size(self, head_dim: int) -> int:
        if self.group_size:
            if head_dim % self.group_size:
                raise UserError(f"KV-cache group size {self.group_size} does not divide the attention head dim "
                                f"{head_dim}")
            return self.group_size
        fits = [g for g in (64, 128, 32) if head_dim % g == 0]
        if not fits:
            raise UserError(f"attention head dim {head_dim} is not a multiple of 32: its KV cache cannot be quantized")
        return fits[0]


FULL_KV = KVCacheSpec()


def quantize_kv(cache: list, spec: KVCacheSpec, head_dim: int) -> list:
    """Swap every (empty) attention KVCache for a QuantizedKVCache; GatedDeltaNet states stay as they are."""
    if not spec.quantized:
        return cache
    group = spec.resolved_group_size(head_dim)
    return [QuantizedKVCache(group_size=group, bits=spec.bits) if type(c) is KVCache else c
            for c in cache]
