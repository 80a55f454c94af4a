"""The one sampling transform: logits -> probabilities, used for target and draft alike.

Speculative sampling is exact only if p (target) and q (draft) come from the *same* transform applied in the
*same* order. Keeping a single function here is what makes that true by construction. The order mirrors
mlx_lm's sampler (top-p, min-p, top-k on the untempered log-probs, then temperature), so our AR baseline samples
what `mlx_lm.generate` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise UserError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_temperature(self, temperature: float) -> "SamplingConfig":
        return replace(self, temperature=temperature)

    def label(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"T={self.temperature:g}"]
        if self.top_p < 1:
            parts.append(f"top_p={self.top_p:g}")
        if self.top_k:
            parts.append(f"top_k={self.top_k}")
        if self.min_p:
            parts.append(f"min_p={self.min_p:g}")
        return " ".join(parts)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def sampling_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Probabilities (float64, rows sum to 1) that `cfg` samples from, for each row of `logits`.

    Greedy is a point mass on the argmax (ties broken by the lowest id, as `argmax` does).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if cfg.greedy:
        out = np.zeros_like(logits)
        np.put_along_axis(out, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return out
    logprobs = _log_softmax(logits)
    keep = np.ones(logprobs.shape, dtype=bool)
    vocab = logprobs.shape[-1]
    if cfg.top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (ties at the threshold kept).
        sorted_lp = np.sort(logprobs, axis=-1)
        sorted_p = np.exp(sorted_lp)
        mass_above = np.cumsum(sorted_p[..., ::-1], axis=-1)[..., ::-1] - sorted_p
        n_dropped = np.sum(mass_above >= cfg.top_p * sorted_p.sum(-1, keepdims=True), axis=-1, keepdims=True)
        threshold = np.take_along_axis(sorted_lp, np.minimum(n_dropped, vocab - 1), axis=-1)
        keep &= logprobs >= threshold
    if cfg.min_p > 0:
        top = np.max(logprobs, axis=-1, keepdims=True)
        keep &= logprobs >= top + np.log(cfg.min_p)
    if 0 < cfg.top_k < vocab:
        kth = -np.partition(-np.where(keep, logprobs, -np.inf), cfg.top_k - 1, axis=-1)[..., cfg.top_k - 1 : cfg.top_k]
        keep &= logprobs >= kth
    scaled = np.where(keep, logprobs / cfg.temperature, -np.inf)
    scaled -= np.max(scaled, axis=-1, keepdims=True)
    probs = np.exp(scaled)
    return probs / probs.sum(axis=-1, keepdims=True)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a probability vector by inverse CDF (one uniform per draw)."""
    cdf = np.cumsum(probs)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(idx, len(probs) - 1)
