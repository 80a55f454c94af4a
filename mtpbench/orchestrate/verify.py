"""`mtpbench verify`: run the preservation tests on a checkpoint, per K and sampling setting, optionally with a
control rule, and return one family of Holm-corrected results.

Sample sizes: N sequences of M tokens per (setting, K), each with its own seed; AR samples (also N, their own
seeds) per setting for the two-sample tests; short sequences for the exact test when the target's support can be
enumerated (top-k truncation); the greedy setting gets token identity with near-tie excuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..model.checkpoint import Bundle
from ..decode import generate_ar, generate_mtp
from ..decode.limits import MAX_K, ROLLBACKS  # sample i runs rollback i % 2: both reach every test
from ..decode.controls import Control
from ..decode.rule import EXACT
from ..decode.rescore import greedy_gaps, rescore
from ..decode.teacher import enumerate_target
from ..stats.preservation import (FRESH_COLUMNS, MIN_ACCEPTED, TestResult, exact_target_test, greedy_identity,
                                 greedy_identity_test, holm_by_family, sampled_family, two_sample_categorical,
                                 two_sample_scalar)
from ..sweep.axes import AXES
from ..sweep.spec import Setting

TESTS = ("exact", "support", "pit", "score", "conditional", "calibration", "two_sample", "greedy")
# two_sample: opt in (weaker, costs AR runs)
DEFAULT_TESTS = ("exact", "support", "pit", "score", "conditional", "calibration", "greedy")
DEFAULT_PROMPTS = ("def add(a, b):\n    return", "The quick brown fox", "for i in range(10):\n", "x = ")
# The tests that read the N sampled sequences of a group (the exact test draws its own short ones): a plan without
# any of them (`--tests exact`) decodes none.
SEQUENCE_TESTS = ("support", "pit", "score", "conditional", "calibration", "two_sample")
MAX_EXACT_SUPPORT = 4 ** 5  # sequences the exact test may enumerate: top_k 4 covers every depth up to K = 4


@dataclass(frozen=True)
class VerifyPlan:
    ks: tuple[int, ...]
    settings: tuple[Setting, ...]
    samples: int = 150
    tokens: int = 12
    tests: tuple[str, ...] = DEFAULT_TESTS
    control: Control | None = None
    seed: int = 0
    prompts: tuple[str, ...] = DEFAULT_PROMPTS


@dataclass(frozen=True)
class GroupResult:
    setting: Setting
    k: int
    results: list[TestResult]
    acceptance: float  # observed acceptance rate of reached drafts
    expected_acceptance: float  # mean alpha at reached drafts
    accepted: int
    reached: int
    rescore_s: float = 0.0  # seconds spent rescoring against the fresh target (not in any decode timing)

    @property
    def blind_to_rule_errors(self) -> bool:
        """Too few accepted drafts for errors in the acceptance rule to show (sampled groups only)."""
        return self.setting.temperature > 0 and self.accepted < MIN_ACCEPTED


@dataclass
class VerifyReport:
    groups: list[GroupResult] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        """Preservation rejected by any test of the family (after Holm)."""
        return any(r.rejected() for g in self.groups for r in g.results if r.family == "preservation")

    @property
    def instrument_fault(self) -> bool:
        """The fresh target disagreed with the independent oracle somewhere: the verdicts are not the decoder's."""
        return any(r.family == "instrument" and r.statistic > 0 for g in self.groups for r in g.results)

    @property
    def acceptance_differs(self) -> bool:
        return any(r.rejected() for g in self.groups for r in g.results if r.family == "acceptance")


def _seq_logprob(records) -> float:
    return float(np.mean([t.target_logprob for t in records[1:]])) if len(records) > 1 else 0.0


def group_seed(plan: VerifyPlan, setting_index: int, k: int) -> int:
    """First seed of one (setting, K) group (K = 0: the setting's AR samples).

    Every group draws from its own seed range, so no two groups share uniforms: with shared seeds the first
    token (and first drafts) of every group were the same draws, one unlucky draw showed up in every group,
    and the family's tests were needlessly dependent.
    """
    return plan.seed + 1_000_000 * (setting_index * (MAX_K + 1) + k)


def _sampled_group(bundle: Bundle, plan: VerifyPlan, setting: Setting, k: int, prompts: list[list[int]],
                   ar_samples: list, tick: Callable[[], None], base: int) -> GroupResult:
    rule = plan.control.rule if plan.control else EXACT
    accepted, alpha, p_draft, q_draft, seqs, logps, toks, fresh = [], [], [], [], [], [], [], []
    rescore_s = 0.0
    for i in range(_sequences(plan)):
        prompt, cfg = prompts[i % len(prompts)], setting.config(base + i)
        r = generate_mtp(bundle, prompt, cfg, k, plan.tokens, setting.draft_temperature, rule=rule,
                         rollback=ROLLBACKS[i % 2])
        rescored = rescore(bundle, prompt, r, cfg)
        rescore_s += rescored.seconds
        toks += r.token_records
        fresh += rescored.records
        accepted += [s.accepted for s in r.steps]
        alpha += [s.alpha for s in r.steps]
        p_draft += [s.p_draft for s in r.steps]
        q_draft += [s.q_draft for s in r.steps]
        seqs.append((i % len(prompts), tuple(r.tokens[1:3])))
        logps.append(_seq_logprob(r.token_records))
        tick()
    columns = {name: [getattr(t, name) for t in toks] for name in (
        "source", "target_logprob", "pit_u", "logprob_mean", "logprob_var", "logprob_m3", "cond_pit_u")}
    columns.update({name: [getattr(f, name) for f in fresh] for name in FRESH_COLUMNS})
    results = sampled_family(columns, accepted, alpha, plan.tests, p_draft, q_draft)
    if "two_sample" in plan.tests:
        ar_seqs = [(i % len(prompts), tuple(r.tokens[1:3])) for i, r in enumerate(ar_samples)]
        results.append(two_sample_categorical(seqs, ar_seqs))
        results.append(two_sample_scalar(logps, [_seq_logprob(r.token_records) for r in ar_samples]))
    if "exact" in plan.tests:
        results.append(_exact(bundle, plan, setting, k, prompts[0], rule, tick, base))
    acc = np.asarray(accepted, dtype=float)
    return GroupResult(setting, k, results, float(acc.mean()) if len(acc) else float("nan"),
                       float(np.mean(alpha)) if alpha else float("nan"), int(acc.sum()), len(acc), rescore_s)


def _sequences(plan: VerifyPlan) -> int:
    """Sampled sequences per group: N when a test reads them, else none."""
    return plan.samples if any(t in SEQUENCE_TESTS for t in plan.tests) else 0


def exact_tokens(width: int, k: int) -> int:
    """How many leading tokens the exact test enumerates at draft depth K: K + 1 (the prefill token, then drafts at
    depths 1..K of the first verify step) where width^(K+1) sequences fit MAX_EXACT_SUPPORT, else as many as fit
    (width: top_k, or the vocabulary without it). Fewer than 2 tokens test nothing (0)."""
    n = k + 1
    while n >= 2 and width ** n > MAX_EXACT_SUPPORT:
        n -= 1
    return n if n >= 2 else 0


def exact_coverage(n: int, k: int, width: int) -> str:
    """The label of the exact test: which draft depths its n enumerated tokens cover at K, and why not more."""
    if n == 0:
        return (f"not run: {width:,}^2 sequences exceed {MAX_EXACT_SUPPORT:,} (enumerable at --top-k <= "
                f"{_widest(2)})")
    covered = f"first {n} tokens enumerated: draft depths 1-{n - 1} of K={k} tested"
    if n - 1 >= k:
        return covered + " (every depth)"
    return (covered + f"; depths {n}-{k} NOT tested ({width:,}^{k + 1} sequences exceed {MAX_EXACT_SUPPORT:,}: "
            f"every depth at --top-k <= {_widest(k + 1)})")


def _widest(n: int) -> int:
    return int(np.floor(MAX_EXACT_SUPPORT ** (1 / n) + 1e-9))


def _exact(bundle: Bundle, plan: VerifyPlan, setting: Setting, k: int, prompt: list[int], rule,
           tick: Callable[[], None], base: int) -> TestResult:
    cfg = setting.config(0)
    width = setting.top_k or bundle.text_config["vocab_size"]
    n = exact_tokens(width, k)
    if n == 0:
        return TestResult("exact_target", 0, float("nan"), float("nan"), float("nan"), "Cohen's w",
                          note=exact_coverage(n, k, width))
    target = enumerate_target(bundle, prompt, cfg, n)
    samples, reached = [], np.zeros(k, dtype=int)
    for i in range(plan.samples * 2):
        r = generate_mtp(bundle, prompt, setting.config(base + 500_000 + i), k, n,
                         setting.draft_temperature, rule=rule, records=False, rollback=ROLLBACKS[i % 2])
        samples.append(tuple(r.tokens))
        if r.drafted_at_depth:  # a draft at depth d is reached when the drafts before it were accepted
            steps = [r.drafted_at_depth[0], *r.accepted_at_depth[:-1]]
            reached[: len(steps)] += steps
    tick()
    res = exact_target_test(samples, target)
    return replace(res, note=f"{exact_coverage(n, k, width)}; drafts reached at depths 1-{k} (earlier drafts "
                             f"accepted): {reached.tolist()}; {res.note}")


def _greedy_group(bundle: Bundle, plan: VerifyPlan, setting: Setting, k: int, prompts: list[list[int]],
                  tick: Callable[[], None]) -> GroupResult:
    pairs, accepted, reached = [], 0, 0
    rule = plan.control.rule if plan.control else EXACT
    for p in prompts:
        cfg = setting.config(plan.seed)
        ar = generate_ar(bundle, p, cfg, plan.tokens * 4, records=False, ignore_eos=True)
        mtp = generate_mtp(bundle, p, cfg, k, plan.tokens * 4, setting.draft_temperature, rule=rule, records=False,
                           ignore_eos=True)
        pairs.append(greedy_identity(ar.tokens, mtp.tokens, greedy_gaps(bundle, p, ar.tokens)))
        accepted += mtp.accepted_tokens
        reached += sum(mtp.reached_at_depth)
        tick()
    return GroupResult(setting, k, [greedy_identity_test(pairs)], accepted / reached if reached else float("nan"),
                       float("nan"), accepted, reached)


def run_verify(bundle: Bundle, plan: VerifyPlan, tick: Callable[[], None] = lambda: None) -> VerifyReport:
    prompts = [list(bundle.tokenizer.encode(p)) for p in plan.prompts]
    report = VerifyReport()
    for si, setting in enumerate(plan.settings):
        if setting.temperature == 0:
            if "greedy" in plan.tests:
                report.groups += [_greedy_group(bundle, plan, setting, k, prompts, tick) for k in plan.ks]
            continue
        ar_samples = []
        if "two_sample" in plan.tests:
            for i in range(plan.samples):
                ar_samples.append(generate_ar(bundle, prompts[i % len(prompts)],
                                              setting.config(group_seed(plan, si, 0) + i), plan.tokens))
                tick()
        report.groups += [_sampled_group(bundle, plan, setting, k, prompts, ar_samples, tick, group_seed(plan, si, k))
                          for k in plan.ks]
    # Families over the whole run (preservation, acceptance, diagnostic), each Holm-corrected together.
    flat = [r for g in report.groups for r in g.results]
    adjusted = iter(holm_by_family(flat))
    report.groups = [GroupResult(g.setting, g.k, [next(adjusted) for _ in g.results], g.acceptance,
                                 g.expected_acceptance, g.accepted, g.reached, g.rescore_s) for g in report.groups]
    return report


def total_ticks(plan: VerifyPlan) -> int:
    n = 0
    for s in plan.settings:
        if s.temperature == 0:
            n += len(plan.ks) * len(plan.prompts) if "greedy" in plan.tests else 0
        else:
            n += plan.samples * ("two_sample" in plan.tests) + len(plan.ks) * (_sequences(plan) + ("exact" in plan.tests))
    return n


# verify runs the checkpoint as loaded: every other grouping axis at its default (policy as-is, KV unquantized, ...)
DEFAULT_KEYS = {a.column: a.default[0] for a in AXES if a.group and a.default}


def verdict_rows(report: VerifyReport, model: str, control: Control | None) -> list[dict]:
    """Rows of the `verdicts` table (scope 'verify') for the report."""
    rows = []
    for g in report.groups:
        s = g.setting
        for r in g.results:
            rows.append({"scope": "verify", **DEFAULT_KEYS, "model": model, "backend": "reference", "k": g.k,
                         "setting": s.label, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                         "min_p": s.min_p, "draft_temperature": s.temperature if s.draft_temperature is None
                         else s.draft_temperature, "control": control.name if control else "none", "test": r.test,
                         "n": r.n, "statistic": r.statistic, "p_value": r.p_value, "p_holm": r.p_holm,
                         "detectable": r.detectable, "detectable_unit": r.unit, "rejected": r.rejected(),
                         "note": r.note, "family": r.family})
    return rows


def _verdict_word(r: TestResult) -> str:
    if r.family == "instrument":
        return "FAULT" if r.statistic > 0 else "ok"
    if r.p_value != r.p_value:
        return "n/a"
    if not r.rejected():
        return "ok"
    return "REJECTED" if r.family == "preservation" else "differs"  # acceptance / diagnostic decide nothing


def blind_groups(report: VerifyReport) -> list[GroupResult]:
    return [g for g in report.groups if g.blind_to_rule_errors]


def report_table(report: VerifyReport) -> str:
    """Every test of a run as a plain-text table (what `mtpbench verify` prints)."""
    import pandas as pd

    rows = []
    for g in report.groups:
        for r in g.results:
            rows.append({"setting": g.setting.label, "K": g.k, "test": r.test, "family": r.family, "n": r.n,
                         "statistic": f"{r.statistic:.4g}", "p": f"{r.p_value:.3g}", "p (Holm)": f"{r.p_holm:.3g}",
                         "detectable": f"{r.detectable:.3g} {r.unit}" if r.detectable == r.detectable else "-",
                         "verdict": _verdict_word(r),
                         "acceptance (expected)": f"{g.acceptance:.3f} ({g.expected_acceptance:.3f})"
                         if g.reached else "-"})  # no drafts reached: greedy without drafts, or `--tests exact`
    table = pd.DataFrame(rows).to_string(index=False)
    faults = [r.note for g in report.groups for r in g.results if r.family == "instrument" and r.statistic > 0]
    exact = [f"exact_target {g.setting.label} K={g.k}: {r.note}" for g in report.groups for r in g.results
             if r.test == "exact_target"]
    return table + "".join(f"\n{line}" for line in exact + faults)


def write_evidence(root: Path, report: VerifyReport, model: str, plan: VerifyPlan, command: str) -> Path:
    """Store a run's verdict rows in a results directory (made, with a manifest, when it is new); returns the part.

    Into an existing directory only when it is an mtpbench results directory: a user's directory is never used."""
    import hashlib

    from ..provenance import now_iso, provenance
    from ..sweep.store import MANIFEST, SCHEMA_VERSION, open_results_dir, part_path, write_part

    lock, _, _ = open_results_dir(Path(root), lambda: {
        "schema_version": SCHEMA_VERSION, "name": Path(root).name, "created_at": now_iso(), "command": command,
        "spec": {}, "provenance": provenance(), "models": {}, "endpoints": {}, "prompts": {}})
    try:
        part = "verify-" + hashlib.sha1(repr((model, plan)).encode()).hexdigest()[:12]
        write_part(Path(root), "verdicts", part, verdict_rows(report, model, plan.control))
        assert (Path(root) / MANIFEST).exists()
        return part_path(Path(root), "verdicts", part)
    finally:
        lock.release()
