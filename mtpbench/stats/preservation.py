"""Tests that speculative sampling preserves the target distribution (see shared/STATS.md).

Each test returns a `TestResult` with its statistic, p-value, sample size and the smallest deviation it could
detect at that size, so "not rejected" always says how strong the evidence is. All nulls are exact-sampling nulls;
`holm` corrects a family of them. Pure numpy/scipy: runs on any parquet, any checkpoint size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy import stats as st

from ..oracle import TOLERANCE as ORACLE_TOLERANCE
from ..sampling import relative_top2_gap

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
    kind: str = ""  # the family when it is not the test's default (see `family`)

    @property
    def family(self) -> str:
        """`preservation` tests decide the verdict; `acceptance` (calibration below sum(alpha)) checks the rule is
        the optimal one: an unbiased but different rule (sample-match) fails it while preserving the distribution;
        `diagnostic` tests (the self-referential PIT and score on the decoder's own rows, when fresh rows exist)
        localise a failure and decide nothing; `instrument` (the oracle check) says whether the instrument itself
        can be trusted, and decides nothing about the decoder."""
        return self.kind or ("acceptance" if self.test == "acceptance_calibration" else "preservation")

    def as_diagnostic(self) -> "TestResult":
        return replace(self, kind="diagnostic", note=("decoder's own rows (diagnostic); " + self.note).rstrip("; "))

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


def pit_test(u: Sequence[float], name: str = "pit_ks", note: str = "") -> TestResult:
    """Kolmogorov-Smirnov test that randomized PIT values are Uniform(0, 1), as they are under exact sampling."""
    u = np.asarray([x for x in u if np.isfinite(x)], dtype=float)
    n = len(u)
    if n < 2:
        return TestResult(name, n, float("nan"), float("nan"), float("nan"), "KS distance",
                          note=(note + "; " if note else "") + "too few tokens")
    res = st.kstest(u, "uniform")
    return TestResult(name, n, float(res.statistic), float(res.pvalue), ks_detectable(n), "KS distance", note=note)


@lru_cache(maxsize=4096)
def ks_detectable(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest sup-distance d between the true CDF G of the PIT values and the uniform one that the KS test
    at `alpha` rejects with probability >= `power` at this n, whatever G is: a derived power, not a rule of thumb.

    If |G(x) - x| = d at some x, the empirical CDF there is Binomial(n, x + d) / n, and the KS statistic is at
    least its distance from x; so P(reject) >= P(Bin(n, x + d) / n - x > c), c the exact KS critical value at n
    (`kstwo`). The bound is computed exactly (binomial tail) at the worst x of a grid, and d found by bisection;
    tests/test_stats.py simulates an alternative at that d and sees at least `power`."""
    if n < 2:
        return float("nan")
    c = float(st.kstwo.ppf(1 - alpha, n))
    x = np.linspace(0.0, 1.0, 201)

    def worst_power(d: float) -> float:
        xs = x[x <= 1 - d]
        return float(st.binom.sf(np.floor(n * (xs + c)), n, xs + d).min())

    lo, hi = c, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst_power(mid) < power else (lo, mid)
    return hi


SOURCE_LAWS = {"accepted": "min(p, q) / alpha", "residual": "normalize(max(0, p - q))", "bonus": "p_K+1"}


def conditional_pit_tests(u: Sequence[float], source: Sequence[str]) -> list[TestResult]:
    """PIT by token source, each under the law the exact rule gives it (shared/STATS.md, 6): accepted drafts under
    min(p, q) / alpha, residual tokens under normalize(max(0, p - q)), bonus tokens under p_K+1. Pooled PIT mixes
    them and dilutes an error in one part of the rule; each of these sees its own part at full strength."""
    u, source = np.asarray(u, dtype=float), np.asarray(source)
    return [pit_test(u[source == s], f"pit_{s}", note=f"{s} tokens under {law}") for s, law in SOURCE_LAWS.items()]


def support_test(logprob: Sequence[float] | None, in_fresh: Sequence[bool] | None = None) -> TestResult:
    """Any emitted token with zero probability under its own target row, or outside the fresh filtered target,
    fails outright (p = 0): an exact sampler never emits one. Detectable: the smallest share of impossible tokens
    seen at least once with POWER. A server has no own rows (`logprob` None): the fresh target alone."""
    lp = None if logprob is None else np.asarray(logprob, dtype=float)
    own = 0 if lp is None else int(np.sum(np.isneginf(lp)))
    fresh = 0 if in_fresh is None else int(np.sum(~np.asarray(in_fresh, dtype=bool)))
    n = len(lp) if lp is not None else len(in_fresh) if in_fresh is not None else 0
    bad = own + fresh
    where = ", ".join(([] if lp is None else [f"{own} outside their own row"]) +
                      ([] if in_fresh is None else [f"{fresh} outside the fresh target"]))
    kept = "every token inside its own row's support" if in_fresh is None else \
        "every token inside the fresh target's support" if lp is None else "every token inside both supports"
    return TestResult("support", n, float(bad), 0.0 if bad else 1.0,
                      float(-np.log(1 - POWER) / n) if n else float("nan"), "share of tokens",
                      note=f"impossible tokens: {where}" if bad else kept)


def drift_summary(drift_logprob: Sequence[float], drift_tv: Sequence[float], what: str = "") -> TestResult:
    """Not a test: how far the decoder's rows sit from the fresh ones (mean total variation as the statistic).
    Near zero with a rejected test points at the rule; large drift points at the state (caches after rollback).
    `what` says what was compared when it is not the decoder's rows (a server's reported log-probs)."""
    d = np.asarray(drift_logprob, dtype=float)
    tv = np.asarray(drift_tv, dtype=float)
    n = len(d)
    known = tv[np.isfinite(tv)]
    finite = d[np.isfinite(d)]
    note = (f"rows differing (TV > 1e-5): {np.mean(known > 1e-5):.1%}; " if len(known) else "") + \
        f"max |delta log p| {finite.max() if len(finite) else 0.0:.3g}" + \
        (f"; {int(np.sum(np.isinf(d)))} tokens possible under one row only" if np.any(np.isinf(d)) else "")
    note = f"{what}: {note}" if what else note
    return TestResult("drift", n, float(known.mean()) if len(known) else float("nan"), float("nan"), float("nan"),
                      "mean TV", note=note, kind="diagnostic")


MIN_ACCEPTED = 300  # accepted drafts below which rule errors (in the accepted/residual laws) are hard to see


def rule_power_note(accepted: int) -> str:
    """What a group could not have seen: with few accepted drafts, errors in the acceptance rule barely move any
    test, so "not rejected" would overstate the evidence."""
    return (f"could not see rule errors: only {accepted} accepted drafts (< {MIN_ACCEPTED})"
            if accepted < MIN_ACCEPTED else "")


def score_test(logprob: Sequence[float], mean: Sequence[float], var: Sequence[float],
               m3: Sequence[float] | None = None, name: str = "logprob_score") -> TestResult:
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
        return TestResult(name, 0, float("nan"), float("nan"), float("nan"), "nats per token",
                          note="no token with a non-degenerate target")
    total_var = float(v[keep].sum())
    z = float((lp[keep] - m[keep]).sum() / np.sqrt(total_var))
    skew = float(third[keep].sum() / total_var ** 1.5) if np.all(np.isfinite(third[keep])) else 0.0
    detectable = (st.norm.ppf(1 - ALPHA / 2) + st.norm.ppf(POWER)) * np.sqrt(total_var) / n
    return TestResult(name, n, z, _edgeworth_two_sided(z, skew), float(detectable), "nats per token",
                      note=f"mean log p {lp[keep].mean():.4f} vs expected {m[keep].mean():.4f}, skew {skew:+.3f}")


def _edgeworth_two_sided(z: float, skew: float) -> float:
    """Two-sided p of a standardised sum with skewness `skew`: F(z) = Phi(z) - phi(z) skew (z^2 - 1) / 6."""
    cdf = float(st.norm.cdf(z) - st.norm.pdf(z) * skew * (z * z - 1) / 6)
    tail = min(cdf, 1 - cdf)
    return float(np.clip(2 * tail, 0.0, 1.0))


def calibration_test(accepted: Sequence[bool], alpha: Sequence[float], alternative: str = "two-sided") -> TestResult:
    """z-test of accepted drafts against sum(alpha_i): exact rules accept position i with probability alpha_i.

    `alternative="greater"` is `acceptance_excess`, a preservation test: no rule that preserves the target
    accepts more than sum(alpha) (the maximal-coupling bound), so acceptance above it is bias. `"less"` is the
    efficiency diagnostic `acceptance_calibration` (an unbiased but sub-optimal rule accepts less)."""
    name = "acceptance_excess" if alternative == "greater" else "acceptance_calibration"
    acc = np.asarray(accepted, dtype=float)
    a = np.clip(np.asarray(alpha, dtype=float), 0, 1)
    n = len(acc)
    var = float(np.sum(a * (1 - a)))
    if n == 0 or var <= 0:
        return TestResult(name, n, float("nan"), float("nan"), float("nan"), "acceptance rate",
                          note="no drafted position with 0 < alpha < 1")
    z = (acc.sum() - a.sum()) / np.sqrt(var)
    p = {"greater": st.norm.sf(z), "less": st.norm.cdf(z)}.get(alternative, 2 * st.norm.sf(abs(z)))
    crit = st.norm.ppf(1 - ALPHA / (1 if alternative in ("greater", "less") else 2))
    detectable = (crit + st.norm.ppf(POWER)) * np.sqrt(var) / n
    return TestResult(name, n, float(z), float(p), float(detectable), "acceptance rate",
                      note=f"observed {acc.mean():.4f} vs expected {a.mean():.4f}")


def acceptance_given_draft_test(accepted: Sequence[bool], p_draft: Sequence[float],
                                q_draft: Sequence[float]) -> TestResult:
    """One-sided z-test that drafts are not accepted more often than min(1, p(d) / q(d)) given the drafted token.

    A rule that accepts d with probability above p(d)/q(d) emits d through acceptance alone with probability above
    p(d): no preserving rule can (the exact rule meets the bound). Conditioning on the draft removes the variance
    of which token was drafted, so lenient ratios that `acceptance_excess` (against sum(alpha)) barely sees show
    here; positions with p >= q (acceptance certain) carry no information and drop out of the variance.
    """
    acc = np.asarray(accepted, dtype=float)
    p, q = np.asarray(p_draft, dtype=float), np.asarray(q_draft, dtype=float)
    a = np.clip(np.where(q > 0, p / np.where(q > 0, q, 1.0), 1.0), 0.0, 1.0)
    var = float(np.sum(a * (1 - a)))
    n = len(acc)
    certain_rejected = int(np.sum((a == 0) & (acc > 0)))  # accepted a draft the target cannot emit
    if certain_rejected:
        return TestResult("acceptance_given_draft", n, float("inf"), 0.0, float("nan"), "acceptance rate",
                          note=f"{certain_rejected} drafts with p(d) = 0 accepted")
    if n == 0 or var <= 0:
        return TestResult("acceptance_given_draft", n, float("nan"), float("nan"), float("nan"), "acceptance rate",
                          note="no drafted position with 0 < p/q < 1")
    z = (acc.sum() - a.sum()) / np.sqrt(var)
    detectable = (st.norm.ppf(1 - ALPHA) + st.norm.ppf(POWER)) * np.sqrt(var) / n
    return TestResult("acceptance_given_draft", n, float(z), float(st.norm.sf(z)), float(detectable),
                      "acceptance rate", note=f"accepted {acc.sum():.0f} vs min(1, p/q) sum {a.sum():.1f}")


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


def greedy_identity_test(pairs: Sequence[GreedyIdentity], caveat: str = "") -> TestResult:
    """The one greedy-identity verdict, `verify`'s and the sweep's: rejected (p = 0) when any MTP sequence
    diverges from its AR twin off a near-tie; divergences on a near-tie (relative top-2 gap < the tolerance) are
    excused and counted. `caveat`: what could not be checked (e.g. no gaps stored)."""
    differ = sum(not r.equal and not r.near_tie for r in pairs)
    near = sum(r.near_tie for r in pairs)
    note = (f"{differ} of {len(pairs)} sequences diverge off a near-tie" if differ else
            f"{near} near-tie divergence(s) excused" if near else "identical")
    return TestResult("greedy_identity", sum(r.compared for r in pairs), float(differ), 0.0 if differ else 1.0,
                      float("nan"), "sequences", note=f"{note}; {caveat}" if caveat else note)


def holm_by_family(results: Sequence[TestResult]) -> list[TestResult]:
    """Holm within each family (preservation, acceptance, diagnostic), order kept."""
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


FRESH_COLUMNS = ("fresh_logprob", "fresh_pit_u", "in_fresh_support", "fresh_logprob_mean", "fresh_logprob_var",
                 "fresh_logprob_m3", "drift_logprob", "drift_tv", "oracle_tv")


def oracle_check(oracle_tv: Sequence[float], tolerance: float) -> TestResult | None:
    """Not a test of the decoder: rows where the fresh target (`sampling.support`) and the independent oracle
    (mtpbench/oracle.py) disagree by more than `tolerance` in TV. Any such row is an instrument fault: the transform
    every test relies on is wrong there, so the cell's verdict says nothing about the decoder. None: no row
    checked (results written before the oracle, or a profile it does not cover)."""
    tv = np.asarray(oracle_tv, dtype=float)
    tv = tv[np.isfinite(tv)]
    if not len(tv):
        return None
    bad = int(np.sum(tv > tolerance))
    note = (f"INSTRUMENT FAULT: {bad} of {len(tv)} checked rows disagree with the independent oracle (max TV "
            f"{tv.max():.3g}); the sampling transform is wrong there, so this cell's verdict is not the decoder's"
            if bad else f"{len(tv)} rows checked against the independent oracle: all agree (max TV {tv.max():.2g})")
    return TestResult("oracle", len(tv), float(bad), float("nan"), float("nan"), "disagreeing rows", note=note,
                      kind="instrument")


SERVER_TESTS = ("support", "pit", "score")  # what applies to a server: no own rows, no drafts, no acceptance


def sampled_family(tokens: dict[str, Sequence], accepted: Sequence[bool], alpha: Sequence[float],
                   tests: Sequence[str] = ("support", "pit", "score", "conditional", "calibration"),
                   p_draft: Sequence[float] | None = None, q_draft: Sequence[float] | None = None) -> list[TestResult]:
    """The tests of one sampled group (a verify group, a sweep cell, or an audited server's cell), from per-token
    and per-draft columns.

    `tokens` holds the tokens table's columns (source, target_logprob, pit_u, logprob_mean/var/m3, cond_pit_u and,
    when the run was rescored, the FRESH_COLUMNS). With fresh rows the preservation family is: support (own row
    and fresh target), PIT and score against the fresh rows, conditional PIT by source, and acceptance above
    sum(alpha) or above min(1, p/q) given the draft; the PIT and score on the decoder's own rows become labelled
    diagnostics beside the drift. Without fresh rows (older results) the decoder-row tests stay in the family, as
    before. A server (`SERVER_TESTS`, no finite `pit_u`: it has no own rows) gets support, PIT and score against
    the fresh rows, and the drift of its reported log-probs where it sent them. Acceptance below sum(alpha) is the
    efficiency diagnostic (`acceptance` family). Holm is left to the caller.
    """
    col = {k: np.asarray(v) for k, v in tokens.items()}

    def finite(name: str, every: bool = True) -> bool:
        ok = np.isfinite(col[name].astype(float)) if name in col else np.zeros(0, bool)
        return len(ok) > 0 and bool(ok.all() if every else ok.any())

    fresh, own = finite("fresh_pit_u"), finite("pit_u", every=False)
    own_pit = pit_test(col["pit_u"]) if own else None
    own_score = score_test(col["target_logprob"], col["logprob_mean"], col["logprob_var"],
                           col.get("logprob_m3")) if own else None
    n_accepted = int(np.sum(np.asarray(accepted, dtype=bool)))
    blind = rule_power_note(n_accepted)
    out: list[TestResult] = []
    if "support" in tests and (own or fresh):
        out.append(support_test(col["target_logprob"] if own else None,
                                col["in_fresh_support"].astype(bool) if fresh else None))
    if "pit" in tests and (own or fresh):
        out.append(pit_test(col["fresh_pit_u"].astype(float), "fresh_pit_ks", note="fresh target") if fresh
                   else own_pit)
    if "score" in tests and (own or fresh):
        out.append(score_test(col["fresh_logprob"], col["fresh_logprob_mean"], col["fresh_logprob_var"],
                              col["fresh_logprob_m3"], name="fresh_logprob_score") if fresh else own_score)
    if "conditional" in tests and "cond_pit_u" in col:
        out += [replace(r, note=f"{r.note}; {blind}" if blind and r.test != "pit_bonus" else r.note)
                for r in conditional_pit_tests(col["cond_pit_u"].astype(float), col["source"])]
    if "calibration" in tests:
        excess = calibration_test(accepted, alpha, "greater")
        out.append(replace(excess, note=f"{excess.note}; {blind}" if blind else excess.note))
        if p_draft is not None and q_draft is not None:
            out.append(acceptance_given_draft_test(accepted, p_draft, q_draft))
        out.append(calibration_test(accepted, alpha, "less"))
    if fresh:
        check = oracle_check(col["oracle_tv"], ORACLE_TOLERANCE) if "oracle_tv" in col else None
        out += [check] if check is not None else []
        out += [r.as_diagnostic() for r, t in ((own_pit, "pit"), (own_score, "score")) if t in tests and r]
        d, tv = col["drift_logprob"].astype(float), col["drift_tv"].astype(float)
        if own or np.isfinite(d).any():
            out.append(drift_summary(d, tv, "" if own else "server-reported log p vs the fresh untransformed one"))
    return out
