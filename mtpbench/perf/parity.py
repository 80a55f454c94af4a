"""Our AR loop against mlx_lm's own (`mlx_lm.stream_generate`) on the same checkpoint, prompt and settings."""

from __future__ import annotations

from typing import Any

from ..model.checkpoint import Bundle
from .runs import abba, decode, geomean_ratio, median




def _mlx_lm_tok_s(model, tokenizer, prompt: list[int], max_tokens: int) -> float:
    """mlx_lm.stream_generate's decode tok/s, put on our definition: tokens after the first / time after the first.

    Its `generation_tps` divides all N tokens by the time after the first, so it reads N/(N-1) high.
    """
    import mlx_lm

    last = None
    for last in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    if last is None or last.generation_tokens < 2:
        return float("nan")
    elapsed = last.generation_tokens / last.generation_tps
    return (last.generation_tokens - 1) / elapsed


def ar_parity(bundle: Bundle, prompt_ids: list[int], max_tokens: int, repeats: int = 5) -> dict[str, Any]:
    """Our AR decode tok/s against mlx_lm's own loop on the same checkpoint, prompt and greedy settings."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(bundle.path))
    tokenizer.eos_token_ids = set()  # ours runs with ignore_eos: both decode exactly max_tokens

    def ours() -> float:
        return decode(bundle, prompt_ids, 0, max_tokens).decode_tok_s

    def theirs() -> float:
        return _mlx_lm_tok_s(model, tokenizer, prompt_ids, max_tokens)

    ours_s, theirs_s = abba([ours, theirs], repeats)
    return {
        "ours_tok_s": ours_s, "mlx_lm_tok_s": theirs_s, "ours_median": median(ours_s),
        "mlx_lm_median": median(theirs_s), "ratio": geomean_ratio(ours_s, theirs_s),
        "max_tokens": max_tokens, "prompt_tokens": len(prompt_ids), "repeats": repeats,
        "note": "decode tok/s excluding the first token on both sides (mlx_lm's generation_tps rescaled by (N-1)/N)",
    }
