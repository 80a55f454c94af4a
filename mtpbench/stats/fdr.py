"""The sweep-wide error statement: each cell's verdict keeps Holm within the cell (family-wise error at ALPHA per
cell), and across the cells of a sweep (or of a card) the false-discovery rate is controlled as well.

Why this is needed: a sweep of m cells that all preserve the target still shows about ALPHA x m "rejected" cells
(Holm bounds each cell's false alarm at ALPHA, not the sweep's). So the count of cells that rejected is shown beside
the count expected by chance, and a second verdict per cell is taken across cells.

Which procedure, and why Benjamini-Hochberg. A cell's p-value is its smallest Holm-adjusted preservation p (a
valid p-value for "this cell preserves"; a greedy cell's identity check is 0 or 1). BH controls the FDR at its level
when the null p-values are independent or positively regression dependent (PRDS; Benjamini & Yekutieli 2001).
Cells share prompts, but every test's null holds conditionally on the prompt (a PIT is uniform whatever the prompt,
the fresh target is computed from that prompt), so sharing prompts adds no dependence under the null. What they
share beyond that is the seed: the runs of one prompt and repetition draw the same uniforms at every K, so their
first tokens are the same draw and the K-cells of one setting move together: a positive coupling (an extreme draw
pushes every such cell's statistic the same way), the case BH tolerates. Benjamini-Yekutieli is valid under any
dependence at the cost of a factor H(m) = 1 + 1/2 + ... + 1/m (3.0 at m = 10); its count is shown beside BH's so a
reader who doubts the positive-dependence argument has the distribution-free figure too. tests/test_fdr.py
simulates null sweeps with seed-shared cells and checks the sweep-wide FDR stays at or below the level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

from .preservation import ALPHA

METHOD = "bh"  # Benjamini-Hochberg (see the module doc); "by" is shown beside it
METHOD_NAMES = {"bh": "Benjamini-Hochberg", "by": "Benjamini-Yekutieli"}


def fdr_adjust(p: Sequence[float], method: str = METHOD) -> np.ndarray:
    """FDR-adjusted p-values (q) of the finite entries (scipy.stats.false_discovery_control); NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = st.false_discovery_control(np.clip(p[ok], 0.0, 1.0), method=method)
    return q


@dataclass(frozen=True)
class SweepErrors:
    """How many cells rejected, against how many would by chance, and the cells rejected at a controlled FDR."""

    cells: int  # cells with a p-value
    rejected_in_cell: int  # rejected by their own Holm family
    expected_by_chance: float  # ALPHA x cells: the most expected to reject if every cell preserves
    rejected_fdr: int  # rejected across cells by METHOD at `level`
    rejected_by: int  # rejected by Benjamini-Yekutieli (valid under any dependence)
    level: float = ALPHA

    def statement(self) -> str:
        if not self.cells:
            return "no tested cell"
        return (f"{self.rejected_in_cell} of {self.cells} cells rejected within their cell (Holm, family-wise "
                f"{self.level:.0%} per cell); if every cell preserved the target, up to "
                f"{self.expected_by_chance:.2g} would reject by chance. Across cells, {METHOD_NAMES[METHOD]} at "
                f"false-discovery rate {self.level:.0%}: {self.rejected_fdr} rejected ({METHOD_NAMES['by']}, valid "
                f"under any dependence: {self.rejected_by})")


def sweep_errors(cell_p: Sequence[float], rejected_in_cell: Sequence[bool], level: float = ALPHA) -> SweepErrors:
    """The sweep-wide statement from each cell's p-value (its smallest Holm-adjusted preservation p) and its own
    verdict."""
    p = np.asarray(cell_p, dtype=float)
    ok = np.isfinite(p)
    return SweepErrors(int(ok.sum()), int(np.sum(np.asarray(rejected_in_cell, dtype=bool)[ok])),
                       level * int(ok.sum()), int(np.sum(fdr_adjust(p, METHOD)[ok] < level)),
                       int(np.sum(fdr_adjust(p, "by")[ok] < level)), level)
