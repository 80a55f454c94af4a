"""What one bench run measures and on what prompt: its sizes (`BenchSettings`) and the pattern prompts every term
is timed on (the checkpoint's own encoding of held-out-looking code text)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
Log = Callable[[str], None]
# Held-out-looking code text: tiled to build prompts of any length from the checkpoint's own tokenizer.
PROMPT_TEXT = (
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]\n\n"
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens and verifies them.\n"
)


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one bench run; `quick()` is for smoke tests, where only the plumbing matters."""

    ks: tuple[int, ...] = (1, 2, 3)
    max_tokens: int = 128
    repeats: int = 5
    contexts: tuple[int, ...] = (512, 2048, 8192)
    context_repeats: int = 1
    prompt_tokens: int = 64
    warmup: int = 2
    copy_mb: int = 256
    blas: bool = True  # also measure with the reference BLAS (Linux with OpenBLAS preloaded only)

    @classmethod
    def large(cls, ks: Sequence[int] = (1, 2, 3)) -> BenchSettings:
        """Sizes for the ~118M-parameter checkpoint, where one token costs ~100x the demo's: a few minutes in all."""
        return cls(ks=tuple(ks), max_tokens=48, repeats=3, contexts=(512, 2048), warmup=1)

    @classmethod
    def quick(cls, ks: Sequence[int] = (1, 2), contexts: Sequence[int] = (64, 128)) -> BenchSettings:
        return cls(ks=tuple(ks), max_tokens=12, repeats=2, contexts=tuple(contexts), prompt_tokens=24, warmup=1,
                   copy_mb=16, blas=False)


def pattern_prompt(bundle: Bundle, length: int) -> list[int]:
    """About `length` tokens: the checkpoint's own encoding of PROMPT_TEXT, repeated (never empty)."""
    pattern = [int(t) for t in bundle.tokenizer.encode(PROMPT_TEXT)] or [0]
    reps = -(-max(1, length) // len(pattern))
    return (pattern * reps)[: max(1, length)]


def bench_prompt(bundle: Bundle, s: BenchSettings) -> list[int]:
    """The prompt every cost term is timed on: `s.prompt_tokens` of the pattern, capped so generation still fits."""
    return pattern_prompt(bundle, min(s.prompt_tokens, context_cap(bundle, s.max_tokens, s.ks)))


def context_cap(bundle: Bundle, max_tokens: int, ks: Sequence[int]) -> int:
    """The longest prompt that still leaves room for the decode and the verify window in the position budget."""
    return max(1, bundle.context_length - max_tokens - max(ks, default=0) - 2)
