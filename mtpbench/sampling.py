"""The one sampling transform: logits -> probabilities, used for target and draft alike.

Speculative sampling is exact only if p (target) and q (draft) come from the *same* transform applied in the
*same* order. Keeping a single function here is what makes that true by construction. The order is a named
profile (`SamplingConfig.order`): `mlx` (the default) mirrors mlx_lm's sampler (top-p, min-p, top-k on the
untempered log-probs, then temperature), so our AR baseline samples what `mlx_lm.generate` samples; `temper-first`
divides the logits by the temperature first and filters the tempered distribution, as vLLM, SGLang and HF
transformers do. The two differ whenever top-p or min-p cut (top-k keeps the same ids either way), so auditing a
server under the wrong profile would report a profile mismatch as a sampler bug. `llama.cpp` is llama-server's
chain (top-k, then top-p over what top-k left, renormalised, min-p, then temperature), and a chain it reports in
another order (`--samplers`, read from /props) is `llama.cpp[a>b>...]`; both run `chain_probs`, one step at a
time. Every profile is data in `PROFILE_TABLE`, with the source it was read from.

The decoder uses `support`: the row as a `Support` (ids with non-zero probability, ascending, and their
probabilities), found in a few float32 passes over the vocabulary, so a row of Qwen's 248,320 ids costs well
under a millisecond at top-k. `sampling_probs`, the dense float64 transform, is kept as the test oracle
(tests/test_sampling.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import UserError

MLX, TEMPER_FIRST, LLAMA_CPP, VLLM, HF = "mlx", "temper-first", "llama.cpp", "vllm", "hf"
STEPS = ("top_k", "top_p", "min_p", "temperature")  # the steps a profile orders (others are no-ops when unsent)
CHAIN_OPEN, CHAIN_CLOSE, CHAIN_SEP = "llama.cpp[", "]", ">"  # a reported llama.cpp order: llama.cpp[top_k>...]


@dataclass(frozen=True)
class Profile:
    """A runtime's sampler order, as data, with where it was read. `renormalised`: each filter reads the
    distribution that the earlier steps left (renormalised over their survivors, tempered if temperature came
    first), as llama.cpp's chain does; else top-p reads the whole untempered (mlx) or tempered (temper-first)
    distribution. `defaults`: the server's values for fields a request leaves out (mtpbench sends every field)."""

    name: str
    steps: tuple[str, ...]
    renormalised: bool
    source: str
    defaults: tuple[tuple[str, float], ...] = ()


PROFILE_TABLE: dict[str, Profile] = {
    MLX: Profile(MLX, ("top_p", "min_p", "top_k", "temperature"), False,
                 "mlx_lm sample_utils.make_sampler: apply_top_p, apply_min_p, apply_top_k on the log-probs, then "
                 "categorical_sampling(logits / temp); mlx_lm.server sends no default"),
    TEMPER_FIRST: Profile(TEMPER_FIRST, ("temperature", "top_k", "top_p", "min_p"), False,
                          "SGLang's sampler (top_k_top_p_min_p_sampling_from_probs_torch: top-p and min-p read the "
                          "whole tempered distribution, not what top-k left)"),
    VLLM: Profile(VLLM, ("temperature", "min_p", "top_k", "top_p"), True,
                  "vLLM v1 Sampler: apply_temperature, apply_min_p on the tempered probabilities, then "
                  "apply_top_k_top_p, whose top-p softmaxes what top-k (and min-p) left"),
    HF: Profile(HF, ("temperature", "top_k", "top_p", "min_p"), True,
                "transformers' warpers in generate's order: TemperatureLogitsWarper, TopKLogitsWarper, "
                "TopPLogitsWarper and MinPLogitsWarper, each softmaxing the scores the earlier ones masked"),
    LLAMA_CPP: Profile(LLAMA_CPP, ("top_k", "top_p", "min_p", "temperature"), True,
                       "llama.cpp common/common.h default samplers (penalties, dry, top_n_sigma, top_k, typ_p, "
                       "top_p, min_p, xtc, temperature) built into one chain by common/sampling.cpp; "
                       "src/llama-sampling.cpp: top_p softmaxes what top_k left; tools/server defaults",
                       (("top_k", 40), ("top_p", 0.95), ("min_p", 0.05), ("temperature", 0.8))),
}
PROFILES = tuple(PROFILE_TABLE)


def chain_name(samplers: "list[str] | tuple[str, ...]") -> str:
    """The profile of a reported llama.cpp sampler order (/props `samplers`): its own name when the order of
    top_k, top_p, min_p and temperature is llama.cpp's default, else `llama.cpp[a>b>...]`. Aliases (typical_p,
    temp) and no-op samplers (penalties, dry, xtc, top_n_sigma, typ_p at their defaults) are dropped."""
    alias = {"temp": "temperature", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p"}
    steps = tuple(dict.fromkeys(s for s in (alias.get(str(x), str(x)) for x in samplers) if s in STEPS))
    if steps == PROFILE_TABLE[LLAMA_CPP].steps:
        return LLAMA_CPP
    return CHAIN_OPEN + CHAIN_SEP.join(steps) + CHAIN_CLOSE


def profile_of(order: str) -> Profile:
    """The `Profile` named by a `SamplingConfig.order`; raises UserError for an unknown one."""
    if order in PROFILE_TABLE:
        return PROFILE_TABLE[order]
    if order.startswith(CHAIN_OPEN) and order.endswith(CHAIN_CLOSE):
        steps = tuple(order[len(CHAIN_OPEN):-len(CHAIN_CLOSE)].split(CHAIN_SEP)) if order != CHAIN_OPEN + "]" else ()
        if set(steps) <= set(STEPS) and len(set(steps)) == len(steps):
            return Profile(order, steps, True, "llama.cpp's sampler order as the server reported it (/props)")
    raise UserError(f"sampling profile must be one of {', '.join(PROFILES)} (or llama.cpp[step>...] over "
                    f"{', '.join(STEPS)}), got {order!r}")
# Ties at the k-th logit. mlx_lm's `apply_top_k` masks all but `argpartition(-logprobs, k - 1)[:k]`: exactly k ids,
# and mlx's argpartition (measured on its CPU kernel, mlx 0.32: `tests/test_fresh_target.py` holds it) puts tied
# values in ascending id order, so of the ids tied at the cut the lowest are kept. Profiles listed here keep exactly
# k that way; the others (vLLM, SGLang, HF transformers: `logits < kth_value` masked) keep every tied id. The audit's
# support test is tie-inclusive under every profile (`support(..., ties=True)`), so a server that breaks ties
# another way (a GPU partition kernel) is never rejected for it.
EXACT_K_PROFILES = frozenset({MLX})


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    order: str = MLX  # the transform's profile (PROFILE_TABLE): mlx | temper-first | llama.cpp | llama.cpp[...]

    def __post_init__(self) -> None:
        profile_of(self.order)
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
        if self.order != MLX:
            parts.append(self.order)
        return " ".join(parts)

    def tempered_first(self, logits: np.ndarray) -> tuple[np.ndarray, "SamplingConfig"]:
        """Under `temper-first`: (logits / T, the same filters at T = 1), which the `mlx` order then treats exactly
        as the tempered filters; under `mlx`, the arguments unchanged. How both transforms take the profile."""
        if self.order == MLX or self.greedy:
            return logits, self
        return logits / np.asarray(self.temperature, dtype=logits.dtype), replace(self, temperature=1.0, order=MLX)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def keeps_ties(cfg: SamplingConfig, ties: bool | None = None) -> bool:
    """Whether top-k keeps every id tied at the k-th logit: `ties` when given, else the profile's rule
    (EXACT_K_PROFILES keep exactly k, the lowest ids of a tie)."""
    return (cfg.order not in EXACT_K_PROFILES) if ties is None else ties


def _exactly_k(keep: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """`keep` cut to its k highest `values` (last axis), ties at the cut to the lowest ids (a stable sort)."""
    order = np.argsort(-np.where(keep, values, -np.inf), axis=-1, kind="stable")
    out = np.zeros_like(keep)
    np.put_along_axis(out, order[..., :k], True, axis=-1)
    return out & keep


def sampling_probs(logits: np.ndarray, cfg: SamplingConfig, ties: bool | None = None) -> np.ndarray:
    """Probabilities (float64, rows sum to 1) that `cfg` samples from, for each row of `logits`: the dense
    definition, kept as the oracle `support` is tested against (a row at V = 248,320 costs ~20 ms here).

    Greedy is a point mass on the argmax (ties broken by the lowest id, as `argmax` does). `ties`: see `keeps_ties`.
    """
    if not cfg.greedy and profile_of(cfg.order).renormalised:
        rows = np.asarray(logits, dtype=np.float64)
        out = np.zeros(rows.shape)
        for idx in np.ndindex(rows.shape[:-1]):
            out[idx] = chain_probs(rows[idx], cfg)
        return out
    tie_inclusive = keeps_ties(cfg, ties)
    logits, cfg = cfg.tempered_first(np.asarray(logits, dtype=np.float64))
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
        if not tie_inclusive:
            keep = _exactly_k(keep, logprobs, cfg.top_k)
    scaled = np.where(keep, logprobs / cfg.temperature, -np.inf)
    scaled -= np.max(scaled, axis=-1, keepdims=True)
    probs = np.exp(scaled)
    return probs / probs.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class Support:
    """One sampling row kept sparse: the token ids with non-zero probability (ascending) and their probabilities.

    At Qwen's vocabulary (248,320) a dense float64 row costs more host time than the model's forward on a fast
    machine; with top-k the support is at most k ids (plus ties at the cut), so every later step (the rule, the
    residual, alpha, the records) works on a handful of numbers.
    """

    ids: np.ndarray  # int64, strictly ascending
    probs: np.ndarray  # float64, same length, sums to 1

    @classmethod
    def point(cls, token: int) -> "Support":
        return cls(np.array([token], dtype=np.int64), np.ones(1))

    @classmethod
    def from_dense(cls, row: np.ndarray) -> "Support":
        row = np.asarray(row, dtype=np.float64)
        ids = np.flatnonzero(row > 0)
        return cls(ids, row[ids])

    def dense(self, vocab: int) -> np.ndarray:
        out = np.zeros(vocab)
        out[self.ids] = self.probs
        return out

    @property
    def full(self) -> bool:
        """Whether the ids are 0..n-1 (a wide support: top_k 0, top_p 1): then an id is its own index."""
        return len(self.ids) > 0 and int(self.ids[-1]) == len(self.ids) - 1

    def on(self, ids: np.ndarray) -> np.ndarray:
        """Probabilities of `ids` (any order), 0 for ids outside the support; a full support indexes directly."""
        ids = np.asarray(ids)
        if self.full:
            inside = (ids >= 0) & (ids < len(self.probs))
            return np.where(inside, self.probs[np.where(inside, ids, 0)], 0.0)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, self.probs[pos], 0.0)

    def prob(self, token: int) -> float:
        return float(self.on(np.array([token]))[0])

    def argmax(self) -> int:
        """The most likely id, ties to the lowest id (as `np.argmax` on the dense row)."""
        return int(self.ids[int(np.argmax(self.probs))])


def as_support(row: "np.ndarray | Support") -> Support:
    return row if isinstance(row, Support) else Support.from_dense(row)


def alpha(p: Support, q: Support) -> float:
    """sum_v min(p_v, q_v): only ids in both supports contribute, so the smaller support is looked up in the larger
    (no sort: at 248,320 ids a sorted intersection costs tens of milliseconds, a lookup one)."""
    small, large = (p, q) if len(p.ids) <= len(q.ids) else (q, p)
    return float(np.minimum(small.probs, large.on(small.ids)).sum())


def residual(p: Support, q: Support) -> Support | None:
    """normalize(max(0, p - q)); None where it is all zero (p == q). Positive only where p is, so it lives on p's
    support: q is looked up there (no union of supports, which sorted the whole vocabulary at top_k 0 / top_p 1)."""
    diff = np.maximum(p.probs - q.on(p.ids), 0.0)
    keep = diff > 0
    total = diff.sum()
    return Support(p.ids[keep], diff[keep] / total) if total > 0 else None


_FLOAT64_EXP_MAX = 1 << 16  # larger supports (a flat row under top-p or min-p) take float32 exps, as T=1 does
_PARTIAL_START = 64  # first guess at the size of a top-p set; grown 8x until the mass is reached
_SAMPLE_STRIDE = 64  # `_largest`: every 64th logit bounds the n-th largest from below


def _largest(x: np.ndarray, n: int) -> np.ndarray:
    """The n largest values of a 1-D row, exactly (unsorted), in about one comparison pass over it.

    The n-th largest of a strided sample never exceeds the row's (a subset's n-th largest is at most the whole's),
    so only the values at or above it are partitioned. At top_k 20 over 248,320 float32 logits: ~0.3 ms against
    ~1.8 ms for a partition of the whole row (numpy on a 2-core x86 VM), where the host rows were most of what a
    sampled MTP step added to a greedy one (`perf.sampling_cost`: 18 of 27 ms per K=3 step).
    """
    v = x.size
    if n >= v:
        return x
    if v >= 4 * n * _SAMPLE_STRIDE:
        sample = x[::_SAMPLE_STRIDE]
        x = x[x >= np.partition(sample, sample.size - n)[sample.size - n]]
    return np.partition(x, x.size - n)[x.size - n:]


def _top_p_floor(x: np.ndarray, top_p: float, m: float, total: float) -> float:
    """The smallest logit top-p keeps (ties at it kept), as `sampling_probs` computes it, without a full sort.

    Partial sorts of growing size find the most likely tokens whose mass reaches `top_p`; a float32 full sort is
    the last resort (a flat row), never a float64 one. Masses are float32 exps summed in float64, like `total`.
    """
    v = x.size
    n = min(_PARTIAL_START, v)
    while True:
        top = np.sort(_largest(x, n))[::-1]
        mass = np.exp(top - np.float32(m)).astype(np.float64)
        above = np.cumsum(mass) - mass
        cut = int(np.searchsorted(above >= top_p * total, True))  # `above` grows, so the test is a step
        if cut < n or n >= v:
            return float(top[max(cut, 1) - 1])
        n = min(n * 8, v)


def support(logits: np.ndarray, cfg: SamplingConfig, ties: bool | None = None) -> Support:
    """`sampling_probs` of one row as a `Support`, in a few vocabulary-sized float32 passes.

    Same order as `sampling_probs`: under the `mlx` profile (mlx_lm's sampler) top-p, min-p and top-k on the
    untempered log-probs, then temperature on what survives; `temper-first` tempers the logits first. Each filter
    keeps the tokens at or above one threshold (ties kept), so the
    support is every token at or above the highest of the thresholds (cut to exactly k where the profile's top-k
    breaks ties at the k-th logit): a partition finds the k-th logit, a
    partial sort the top-p cut, the log-sum-exp (float32 exps, float64 sum) is needed for top-p only. The
    survivors are then treated in float64 as the dense transform treats them (equal up to float rounding; a top-p
    mass within ~1e-7 of a token boundary may cut differently). At T > 0 with no filter the support is the
    vocabulary: one float32 pass. `ties` (see `keeps_ties`): whether ids tied at the k-th logit are all kept; by
    default the profile's rule (mlx keeps exactly k, the lowest ids of a tie).
    """
    if not cfg.greedy and profile_of(cfg.order).renormalised:
        return _chain_support(np.asarray(logits, dtype=np.float32).reshape(-1), cfg)
    tie_inclusive = keeps_ties(cfg, ties)
    x, cfg = cfg.tempered_first(np.asarray(logits, dtype=np.float32).reshape(-1))
    if cfg.greedy:
        return Support.point(int(np.argmax(x)))
    v, m = x.size, float(x.max())
    if cfg.top_p >= 1 and cfg.min_p <= 0 and not 0 < cfg.top_k < v:
        e = np.exp((x - np.float32(m)) * np.float32(1 / cfg.temperature), dtype=np.float32).astype(np.float64)
        return Support(np.arange(v, dtype=np.int64), e / e.sum())
    floor, total = -np.inf, 1.0
    if 0 < cfg.top_k < v:
        floor = float(_largest(x, cfg.top_k).min())
    if cfg.top_p < 1:
        total = float(np.exp(x - np.float32(m), dtype=np.float32).sum(dtype=np.float64))
        if floor == -np.inf:  # with top-k the cut is searched inside the k survivors below
            floor = _top_p_floor(x, cfg.top_p, m, total)
    if cfg.min_p > 0:  # float32 prefilter with slack; the exact float64 test runs on the survivors
        floor = max(floor, float(np.nextafter(np.float32(m + np.log(cfg.min_p)), np.float32(-np.inf))))
    ids = np.flatnonzero(x >= floor)
    xs = x[ids].astype(np.float64)
    log_total = float(np.log(total))
    lp = (xs - m) - log_total
    keep = np.ones(len(ids), dtype=bool)
    if cfg.top_p < 1 and 0 < cfg.top_k < v:
        order = np.argsort(-xs, kind="stable")
        mass = np.exp(xs[order] - m)
        above = np.cumsum(mass) - mass
        cut = int(np.searchsorted(above >= cfg.top_p * total, True))
        if cut < len(ids):
            keep &= xs >= xs[order[max(cut, 1) - 1]]
    if cfg.min_p > 0:
        keep &= lp >= -log_total + np.log(cfg.min_p)
    if not tie_inclusive and 0 < cfg.top_k < int(keep.sum()):
        keep = _exactly_k(keep, xs, cfg.top_k)  # ids ascend, so a stable sort breaks ties to the lowest id
    ids, scaled = ids[keep], lp[keep] / cfg.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled if len(ids) <= _FLOAT64_EXP_MAX else scaled.astype(np.float32)).astype(np.float64)
    return Support(ids, probs / probs.sum())


def chain_probs(x: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The probabilities (float64) a renormalising chain (`Profile.renormalised`: llama.cpp's) samples from, for
    one row of logits: each step in the profile's order reads the survivors of the steps before it, tempered if
    temperature came first. top_k keeps the k largest (ties at the k-th kept, where llama.cpp keeps k); top_p
    the smallest most-likely set whose mass, renormalised over the survivors, reaches top_p (ties kept); min_p the
    tokens within log(min_p) of the best; temperature divides the logits (applied at the end when not listed)."""
    x = np.asarray(x, dtype=np.float64)
    alive = np.ones(x.shape, dtype=bool)
    t = 1.0
    for step in profile_of(cfg.order).steps:
        y = x[alive] / t
        if step == "temperature":
            t = cfg.temperature
        elif step == "top_k" and 0 < cfg.top_k < y.size:
            alive &= x / t >= -np.partition(-y, cfg.top_k - 1)[cfg.top_k - 1]
        elif step == "top_p" and cfg.top_p < 1:
            z = -np.sort(-y)
            mass = np.exp(z - z[0])
            above = np.cumsum(mass) - mass
            cut = int(np.searchsorted(above >= cfg.top_p * mass.sum(), True))
            alive &= x / t >= z[max(cut, 1) - 1]
        elif step == "min_p" and cfg.min_p > 0:
            alive &= x / t >= y.max() + np.log(cfg.min_p)
    scaled = np.where(alive, x / cfg.temperature, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return probs / probs.sum()


def _chain_support(x: np.ndarray, cfg: SamplingConfig) -> Support:
    """`chain_probs` as a `Support`: with top_k on, only the k largest logits (ties kept) can survive any order of
    the steps (every step keeps a most-likely set), so the chain runs in float64 on those alone."""
    ids = np.arange(x.size, dtype=np.int64)
    if 0 < cfg.top_k < x.size:
        ids = np.flatnonzero(x >= _largest(x, cfg.top_k).min())
    probs = chain_probs(x[ids], cfg)
    keep = probs > 0
    return Support(ids[keep], probs[keep])


def sample(probs: "np.ndarray | Support", rng: np.random.Generator) -> int:
    """Draw one token id by inverse CDF (one uniform per draw) from a dense row or a `Support`.

    A support lists its ids in ascending order, so its CDF takes the same values as the dense row's (zeros add
    nothing): the same uniform draws the same token from both, up to float rounding of the probabilities.
    """
    return quantile(probs, rng.random())


def quantile(probs: "np.ndarray | Support", u: float) -> int:
    """The token at quantile `u` of a dense row or a `Support`: the draw `sample` makes from its uniform."""
    ids, values = (probs.ids, probs.probs) if isinstance(probs, Support) else (None, probs)
    cdf = np.cumsum(values)
    idx = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(values) - 1)
    return idx if ids is None else int(ids[idx])


def relative_top2_gap(logits: np.ndarray) -> np.ndarray:
    """Relative top-2 logit gap of each row, (l1 - l2) / max(|l1|, 1): what `greedy_identity` excuses a divergence
    on (a near-tie that batched verify arithmetic may flip)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = -np.sort(-logits, axis=-1)[..., :2]
    return (top[..., 0] - top[..., 1]) / np.maximum(np.abs(top[..., 0]), 1.0)
