"""Tests that speculative sampling preserves the target distribution (see shared/STATS.md).

Each test returns a `TestResult` with its statistic, p-value, sample size and the smallest deviation it could
detect at that size, so "not rejected" always says how strong the evidence is. All nulls are exact-sampling nulls;
`holm` corrects a family of them. Pure numpy/scipy: runs on any parquet, any checkpoint size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as st

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class

    test: str
    n: int
    statistic: float
    p_value: float
    detectable: float  # smallest deviation detected with POWER at ALPHA, in `unit`
    unit: str
    note: str = ""
    p_holm: float = float("nan")

    @property
    def family(self) -> str:
        """`preservation` tests decide the verdict; `acceptance` (calibration) checks the rule is the optimal one:
        an unbiased but different rule (sample-match) fails calibration while preserving the distribution."""
        return "acceptance" if self.test == "acceptance_calibration" else "preservation"

    def rejected(self, alpha: float = ALPHA) -> bool:
        p = self.p_holm if np.isfinite(self.p_holm) else self.p_value
        return bool(p < alpha)


def _cohen_w_detectable(n: int, dof: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Cohen's w = sqrt(chi2 noncentrality / n) that a chi-square test with `dof` detects with `power`."""
    if n <= 0 or dof <= 0:
        return float("nan")
    crit = st.chi2.ppf(1 - alpha, dof)
    lo, hi = 0.0, 1e6
    for _ in range(100):  # bisection on the noncentrality parameter
        mid = (lo + hi) / 2
        if st.ncx2.sf(crit, dof, mid) < power:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(hi / n))


def exact_target_test(samples: Sequence[Hashable], target: dict[Hashable, float], min_expected: float = 5.0) -> TestResult:
    """G-test of sampled outcomes against an enumerated target distribution.

    Cells with expected count < `min_expected` are pooled into one; any sample in a zero-probability cell fails
    the test outright (p = 0), since exact sampling can never produce it.
    """
    n = len(samples)
    counts = Counter(samples)
    impossible = sum(c for s, c in counts.items() if target.get(s, 0.0) <= 0)
    if impossible:
        return TestResult("exact_target", n, float("inf"), 0.0, float("nan"), "Cohen's w",
                          note=f"{impossible} sample(s) in zero-probability cells")
    cells = sorted((s for s, p in target.items() if p > 0), key=lambda s: -target[s])
    big = [s for s in cells if target[s] * n >= min_expected]
    small = [s for s in cells if target[s] * n < min_expected]
    obs = [counts.get(s, 0) for s in big]
    exp = [target[s] * n for s in big]
    if small:
        obs.append(sum(counts.get(s, 0) for s in small))
        exp.append(sum(target[s] for s in small) * n)
    exp = np.asarray(exp) * (n / np.sum(exp))  # float-normalise the enumerated mass
    if len(obs) < 2:
        return TestResult("exact_target", n, 0.0, 1.0, float("nan"), "Cohen's w", note="a single cell: nothing to test")
    g, p = st.power_divergence(obs, exp, lambda_="log-likelihood")
    return TestResult("exact_target", n, float(g), float(p), _cohen_w_detectable(n, len(obs) - 1), "Cohen's w",
                      note=f"{len(obs)} cells ({len(small)} pooled)")


def pit_test(u: Sequence[float]) -> TestResult:
    """Kolmogorov-Smirnov test that randomized PIT values are Uniform(0, 1), as they are under exact sampling."""
    u = np.asarray([x for x in u if np.isfinite(x)], dtype=float)
    n = len(u)
    if n < 2:
        return TestResult("pit_ks", n, float("nan"), float("nan"), float("nan"), "KS distance", note="too few tokens")
    res = st.kstest(u, "uniform")
    # Asymptotic sup-distance detected with POWER: critical value plus the power quantile of the KS spread.
    detectable = (st.kstwobign.ppf(1 - ALPHA) + st.norm.ppf(POWER) * 0.5) / np.sqrt(n)
    return TestResult("pit_ks", n, float(res.statistic), float(res.pvalue), float(detectable), "KS distance")


def score_test(logprob: Sequence[float], mean: Sequence[float], var: Sequence[float],
               m3: Sequence[float] | None = None) -> TestResult:
    """Log-likelihood score test: sum of (log p(x_t) - E_p[log p]) over emitted tokens, standardised.

    Under exact sampling each term has mean 0 and variance Var_p[log p] given the past (a martingale), so the
    standardised sum is N(0, 1). Samplers that favour likely tokens (argmax shortcuts) or unlikely ones (wrong
    residuals) shift it. Needs no AR samples, unlike the two-sample tests.

    Each term is left-skewed (a rare token has a very negative log p), so at a few hundred tokens the normal tail
    on the negative side is too thin and true nulls reject too often. With the third central moments `m3` the
    p-value takes the one-term Edgeworth correction for the summed skew.
    """
    lp, m, v = (np.asarray(x, dtype=float) for x in (logprob, mean, var))
    third = np.full_like(lp, np.nan) if m3 is None else np.asarray(m3, dtype=float)
    keep = np.isfinite(lp) & np.isfinite(m) & (v > 0)
    n = int(keep.sum())
    if n == 0:
        return TestResult("logprob_score", 0, float("nan"), float("nan"), float("nan"), "nats per token",
                          note="no token with a non-degenerate target")
    total_var = float(v[keep].sum())
    z = float((lp[keep] - m[keep]).sum() / np.sqrt(total_var))
    skew = float(third[keep].sum() / total_var ** 1.5) if np.all(np.isfinite(third[keep])) else 0.0
    detectable = (st.norm.ppf(1 - ALPHA / 2) + st.norm.ppf(POWER)) * np.sqrt(total_var) / n
    return TestResult("logprob_score", n, z, _edgeworth_two_sided(z, skew), float(detectable), "nats per token",
                      note=f"mean log p {lp[keep].mean():.4f} vs expected {m[keep].mean():.4f}, skew {skew:+.3f}")


def _edgeworth_two_sided(z: float, skew: float) -> float:
    """Two-sided p of a standardised sum with skewness `skew`: F(z) = Phi(z) - phi(z) skew (z^2 - 1) / 6."""
    cdf = float(st.norm.cdf(z) - st.norm.pdf(z) * skew * (z * z - 1) / 6)
    tail = min(cdf, 1 - cdf)
    return float(np.clip(2 * tail, 0.0, 1.0))


def calibration_test(accepted: Sequence[bool], alpha: Sequence[float]) -> TestResult:
    """z-test of accepted drafts against sum(alpha_i): exact rules accept position i with probability alpha_i."""
    acc = np.asarray(accepted, dtype=float)
    a = np.clip(np.asarray(alpha, dtype=float), 0, 1)
    n = len(acc)
    var = float(np.sum(a * (1 - a)))
    if n == 0 or var <= 0:
        return TestResult("acceptance_calibration", n, float("nan"), float("nan"), float("nan"), "acceptance rate",
                          note="no drafted position with 0 < alpha < 1")
    z = (acc.sum() - a.sum()) / np.sqrt(var)
    p = 2 * st.norm.sf(abs(z))
    detectable = (st.norm.ppf(1 - ALPHA / 2) + st.norm.ppf(POWER)) * np.sqrt(var) / n
    return TestResult("acceptance_calibration", n, float(z), float(p), float(detectable), "acceptance rate",
                      note=f"observed {acc.mean():.4f} vs expected {a.mean():.4f}")


def two_sample_categorical(a: Sequence[Hashable], b: Sequence[Hashable], min_expected: float = 5.0) -> TestResult:
    """Chi-square homogeneity of two samples of outcomes (e.g. first token of MTP vs AR), rare cells pooled."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    keys = sorted(set(ca) | set(cb), key=lambda s: -(ca[s] + cb[s]))
    n = na + nb
    big = [s for s in keys if (ca[s] + cb[s]) * min(na, nb) / max(n, 1) >= min_expected]
    rows = [[ca[s] for s in big], [cb[s] for s in big]]
    rest = [na - sum(rows[0]), nb - sum(rows[1])]
    if rest[0] + rest[1] > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    if len(rows[0]) < 2:
        return TestResult("two_sample_first_token", n, 0.0, 1.0, float("nan"), "Cohen's w", note="a single cell")
    chi2, p, dof, _ = st.chi2_contingency(np.asarray(rows), correction=False)
    return TestResult("two_sample_first_token", n, float(chi2), float(p), _cohen_w_detectable(n, dof), "Cohen's w")


def two_sample_scalar(a: Sequence[float], b: Sequence[float], name: str = "two_sample_logprob") -> TestResult:
    """Mann-Whitney U on a per-sequence scalar (e.g. mean target log-prob) of MTP vs AR samples."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return TestResult(name, len(a) + len(b), float("nan"), float("nan"), float("nan"), "AUC - 0.5")
    res = st.mannwhitneyu(a, b, alternative="two-sided")
    n_eff = len(a) * len(b) / (len(a) + len(b))
    detectable = (st.norm.ppf(1 - ALPHA / 2) + st.norm.ppf(POWER)) * np.sqrt(1 / 12) / np.sqrt(n_eff)
    return TestResult(name, len(a) + len(b), float(res.statistic), float(res.pvalue), float(detectable), "AUC - 0.5")


@dataclass(frozen=True)
class GreedyIdentity:
    equal: bool
    compared: int  # tokens compared (up to the first divergence)
    first_divergence: int | None
    near_tie: bool  # the divergence sits on a near-tie of the AR logits, which batched verify may flip
    gap: float  # relative top-2 logit gap at the divergence


def greedy_identity(ar: Sequence[int], mtp: Sequence[int], top2_gaps: Sequence[float], tie_tol: float = 1e-3) -> GreedyIdentity:
    """Token-for-token equality of greedy MTP and AR; a divergence is excused only on a near-tie (reported)."""
    n = min(len(ar), len(mtp))
    for i in range(n):
        if ar[i] != mtp[i]:
            gap = float(top2_gaps[i])
            return GreedyIdentity(False, i, i, gap < tie_tol, gap)
    same_length = len(ar) == len(mtp)
    return GreedyIdentity(same_length, n, None if same_length else n, False, float("nan"))


def holm_by_family(results: Sequence[TestResult]) -> list[TestResult]:
    """Holm within each family (preservation, acceptance), order kept."""
    out = list(results)
    for fam in {r.family for r in results}:
        idx = [i for i, r in enumerate(results) if r.family == fam]
        for i, r in zip(idx, holm([results[i] for i in idx])):
            out[i] = r
    return out


def holm(results: Sequence[TestResult]) -> list[TestResult]:
    """Holm-Bonferroni adjusted p-values across one family of tests (step-down, monotone)."""
    order = sorted(range(len(results)), key=lambda i: (np.isnan(results[i].p_value), results[i].p_value))
    m = sum(np.isfinite(r.p_value) for r in results)
    adjusted = [float("nan")] * len(results)
    running = 0.0
    for rank, i in enumerate(order):
        p = results[i].p_value
        if not np.isfinite(p):
            continue
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return [replace(r, p_holm=adjusted[i]) for i, r in enumerate(results)]
