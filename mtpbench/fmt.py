"""Number formatting shared by the HTML report, the model card and the builders' summaries, so all print identical
strings (a low wing: the builders sit below the report)."""

from __future__ import annotations

import math

import pandas as pd
from typing import Any

DASH = "—"


def _bad(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def tok_s(x: Any) -> str:
    """Decode throughput: one decimal."""
    return DASH if _bad(x) else f"{float(x):.1f}"


def rate(x: Any) -> str:
    """Acceptance, survival, efficiency: three decimals."""
    return DASH if _bad(x) else f"{float(x):.3f}"


def ratio(x: Any) -> str:
    """A speedup, printed with a times sign."""
    return DASH if _bad(x) else f"{float(x):.2f}×"


def percent(x: Any) -> str:
    """A share (0.217) as 21.7%."""
    return DASH if _bad(x) else f"{100 * float(x):.1f}%"


def num(x: Any, digits: int = 2) -> str:
    return DASH if _bad(x) else f"{float(x):.{digits}f}"


def ci(lo: Any, hi: Any, fmt=rate) -> str:
    """A 95% interval as [lo, hi] (the bare numbers, no unit, so it copies cleanly)."""
    if _bad(lo) or _bad(hi):
        return DASH
    return f"[{fmt(lo).rstrip('×')}, {fmt(hi).rstrip('×')}]"


def with_ci(x: Any, lo: Any, hi: Any, fmt=rate) -> str:
    interval = ci(lo, hi, fmt)
    return fmt(x) if interval == DASH else f"{fmt(x)} {interval}"


def pvalue(x: Any) -> str:
    """p-values: three significant digits, small ones in scientific notation."""
    if _bad(x):
        return DASH
    x = float(x)
    return f"{x:.2e}" if 0 < x < 1e-3 else f"{x:.3g}"


def param(x: Any) -> str:
    """A sampling parameter as the user typed it (0.6, not 0.60)."""
    return DASH if _bad(x) else f"{float(x):g}"


def stat(x: Any) -> str:
    return DASH if _bad(x) else f"{float(x):.4g}"


def memory(nbytes: Any) -> str:
    """Peak memory in MiB/GiB."""
    if _bad(nbytes) or float(nbytes) <= 0:
        return DASH
    mib = float(nbytes) / 2**20
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def integer(x: Any) -> str:
    return DASH if _bad(x) else f"{int(x):,}"


def text(x: Any) -> str:
    """A key's value as shown; missing (None, NaN, pandas' NA, empty) is a dash."""
    missing = x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))
    return DASH if missing or (isinstance(x, str) and x == "") else str(x)
