"""The sweep-wide error statement: simulated null sweeps (cells whose runs share seeds, as a sweep's K-cells do)
keep the false-discovery rate across cells at or below its level, and the count of cells rejected within their
own Holm family matches the count the statement says to expect by chance."""

from __future__ import annotations

import numpy as np

from mtpbench.stats.fdr import fdr_adjust, sweep_errors
from mtpbench.stats.preservation import ALPHA, holm, pit_test

SETTINGS, KS, N = 5, 4, 200  # 20 cells per sweep, 200 PIT values per cell
SHARED = 0.3  # share of a cell's draws that the other K-cells of its setting draw too (same seed)


def _sweep(rng: np.random.Generator, alternatives: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """One simulated sweep: per cell, the smallest Holm p of its PIT tests (pooled and first half), and its own
    verdict. Cells in `alternatives` draw from a non-uniform law (they do not preserve)."""
    p, rejected = [], []
    for s in range(SETTINGS):
        shared = rng.random(int(N * SHARED))
        for k in range(KS):
            cell = s * KS + k
            own = rng.random(N - len(shared))
            u = np.concatenate([shared, own])
            if cell in alternatives:
                u = u ** 1.4  # a biased sampler: PIT values pile towards 0
            family = holm([pit_test(u), pit_test(u[: N // 2], "pit_half")])
            p.append(min(r.p_holm for r in family))
            rejected.append(any(r.rejected() for r in family))
    return np.asarray(p), np.asarray(rejected)


def test_fdr_across_cells_stays_at_or_below_its_level():
    rng = np.random.default_rng(31)
    sweeps, alternatives = 150, {1, 6, 11, 16}  # the margins below are this many sweeps' standard errors
    fdp, power = [], []
    for _ in range(sweeps):
        p, _ = _sweep(rng, alternatives)
        rej = fdr_adjust(p) < ALPHA
        false = sum(rej[i] for i in range(len(p)) if i not in alternatives)
        fdp.append(false / max(int(rej.sum()), 1))
        power.append(np.mean([rej[i] for i in alternatives]))
    fdr, se = float(np.mean(fdp)), float(np.std(fdp) / np.sqrt(sweeps))
    assert fdr <= ALPHA + 2 * se, (fdr, se)
    assert np.mean(power) > 0.5  # the alternatives are found: the control is not bought by rejecting nothing


def test_under_the_global_null_chance_rejections_match_the_statement():
    rng = np.random.default_rng(5)
    sweeps = 400  # the binomial margin below widens with fewer; with no correction P(any) ~ 0.6 fails at any size
    any_fdr, in_cell = 0, []
    for _ in range(sweeps):
        p, rejected = _sweep(rng, set())
        e = sweep_errors(p, rejected)
        any_fdr += e.rejected_fdr > 0
        in_cell.append(e.rejected_in_cell)
        assert e.rejected_by <= e.rejected_fdr and e.expected_by_chance == ALPHA * SETTINGS * KS
    # all nulls: FDR = P(any rejection) <= ALPHA (binomial margin), while Holm-within-cell alone rejects ~ALPHA x m
    assert any_fdr / sweeps <= ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / sweeps), any_fdr
    assert 0.3 < np.mean(in_cell) <= ALPHA * SETTINGS * KS + 0.3, np.mean(in_cell)


def test_the_statement_reads_counts_and_methods():
    e = sweep_errors([0.001, 0.2, 0.5, float("nan")], [True, False, False, False])
    text = e.statement()
    assert e.cells == 3 and e.rejected_in_cell == 1 and e.rejected_fdr == 1
    assert "1 of 3 cells rejected within their cell" in text and "0.15 would reject by chance" in text
    assert "Benjamini-Hochberg" in text and "Benjamini-Yekutieli" in text
    assert np.isnan(fdr_adjust([float("nan"), 0.01])[0])
