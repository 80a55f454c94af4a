"""Matplotlib figures rendered to inline SVG strings: no pyplot state, no font files, no external references."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from .tables import BY, group_label, varying

_RC = {"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
       "axes.spines.top": False, "axes.spines.right": False}
# The svg metadata block would otherwise carry URLs (dc/cc namespaces, dcmitype) and a creation date.
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


def styled(fn: Callable[..., str | None]) -> Callable[..., str | None]:
    """Build the whole figure under the report's rc settings, leaving the caller's rcParams untouched."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


def to_svg(fig: Figure, name: str) -> str:
    """Serialize a figure to an <svg> element (no XML prolog or DOCTYPE, which don't belong inside HTML).

    A per-figure hash salt keeps clip-path ids unique across the page and stable across runs.
    """
    buf = io.StringIO()
    FigureCanvasSVG(fig)  # the SVG backend explicitly: no GUI backend, no pyplot state
    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"mtpbench-{name}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata=_NO_METADATA)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    svg = _prefix_ids(svg, name)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{name} plot" ', 1)


def _prefix_ids(svg: str, prefix: str) -> str:
    """Matplotlib numbers element ids per figure (figure_1, axes_1...): prefix them so ids stay unique on a page."""
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    return re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)


def figure(width: float = 7.0, height: float = 3.6) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no overlap


def _err(y: pd.Series, lo: pd.Series, hi: pd.Series) -> np.ndarray:
    """Asymmetric error-bar lengths from interval bounds (NaN bounds draw no bar)."""
    return np.vstack([(y - lo).clip(lower=0).fillna(0).to_numpy(), (hi - y).clip(lower=0).fillna(0).to_numpy()])


@styled
def throughput(modes: pd.DataFrame) -> str | None:
    """Decode tok/s by K (K = 0 is AR), one line per group, error bars = std over runs."""
    if modes.empty:
        return None
    fig, ax = figure()
    keys = varying(modes)
    for _, g in modes.groupby(keys, dropna=False, sort=True):
        g = g.sort_values("k")
        ax.errorbar(g["k"], g["tok_s"], yerr=g["tok_s_std"].fillna(0), marker="o", capsize=3,
                    label=group_label(g.iloc[0], keys))
    ks = sorted(modes["k"].unique())
    ax.set_xticks(ks, ["AR" if k == 0 else f"K={k}" for k in ks])
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    legend(ax)
    return to_svg(fig, "throughput")


@styled
def acceptance(acc: pd.DataFrame) -> str | None:
    """Conditional acceptance by depth with Wilson 95% intervals, one line per (group, K)."""
    if acc.empty:
        return None
    fig, ax = figure()
    keys = varying(acc) + ["k"]
    for _, g in acc.groupby(keys, dropna=False, sort=True):
        row = g.iloc[0]
        ax.errorbar(g["depth"], g["acceptance"], yerr=_err(g["acceptance"], g["acceptance_lo"], g["acceptance_hi"]),
                    marker="o", capsize=3, label=group_label(row, keys[:-1]) + f" · K={row['k']}")
    ax.set_xticks(sorted(acc["depth"].unique()))
    ax.set_xlabel("draft depth")
    ax.set_ylabel("acceptance (conditional)")
    ax.set_ylim(0, 1.02)
    legend(ax)
    return to_svg(fig, "acceptance")


@styled
def position(pos: pd.DataFrame) -> str | None:
    """Depth-1 acceptance by verify-step bin, with Wilson 95% intervals."""
    if pos.empty:
        return None
    fig, ax = figure()
    keys = varying(pos) + ["k"]
    for _, g in pos.groupby(keys, dropna=False, sort=True):
        row = g.iloc[0]
        x = (g["step_lo"] + g["step_hi"]) / 2
        ax.errorbar(x, g["acceptance"], yerr=_err(g["acceptance"], g["acceptance_lo"], g["acceptance_hi"]),
                    marker="o", capsize=3, label=group_label(row, keys[:-1]) + f" · K={row['k']}")
    ax.set_xlabel("verify step index (bin centre)")
    ax.set_ylabel("depth-1 acceptance")
    ax.set_ylim(0, 1.02)
    legend(ax)
    return to_svg(fig, "position")


@styled
def tau(t: pd.DataFrame) -> str | None:
    """Measured tau (solid) against the i.i.d. prediction (dashed) by K."""
    if t.empty:
        return None
    fig, ax = figure()
    keys = varying(t)
    for _, g in t.groupby(keys, dropna=False, sort=True):
        g = g.sort_values("k")
        (line,) = ax.plot(g["k"], g["tau"], marker="o", label=group_label(g.iloc[0], keys) + " measured")
        ax.plot(g["k"], g["tau_iid"], ls="--", marker="x", color=line.get_color(), label="  i.i.d. prediction")
    ax.set_xticks(sorted(t["k"].unique()))
    ax.set_xlabel("K (drafts per step)")
    ax.set_ylabel("mean acceptance length τ")
    legend(ax)
    return to_svg(fig, "tau")


@styled
def efficiency(eff: pd.DataFrame) -> str | None:
    """Realized against predicted speedup; points on the diagonal realize all of the prediction."""
    if eff.empty:
        return None
    fig, ax = figure(5.2, 4.0)
    keys = varying(eff)
    for _, g in eff.groupby(keys, dropna=False, sort=True):
        ax.errorbar(g["predicted"], g["speedup"], yerr=_err(g["speedup"], g["speedup_lo"], g["speedup_hi"]),
                    marker="o", ls="none", capsize=3, label=group_label(g.iloc[0], keys))
        for _, r in g.iterrows():
            ax.annotate(f"K={r['k']}", (r["predicted"], r["speedup"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    values = eff[["predicted", "speedup", "speedup_lo", "speedup_hi"]].to_numpy(dtype=float)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(0.05, 0.1 * (hi - lo))
    lo, hi = max(0.0, lo - pad), hi + pad
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="realized = predicted")
    if lo < 1.0 < hi:
        ax.axhline(1.0, color="grey", lw=0.6, label="no speedup")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted speedup τ / c")
    ax.set_ylabel("realized speedup")
    legend(ax)
    return to_svg(fig, "efficiency")


@styled
def categories(cat: pd.DataFrame, best: pd.DataFrame) -> str | None:
    """Speedup per category with bootstrap CIs at each group's best K (the table has every K)."""
    if cat.empty or best.empty:
        return None
    cat = cat.merge(best[[*BY, "k"]], on=[*BY, "k"], how="inner")
    if cat.empty:
        return None
    series = list(cat.groupby(varying(cat, BY) + ["k"], dropna=False, sort=True))
    cats = sorted(cat["category"].unique())
    fig, ax = figure(7.0, max(2.5, 0.25 * len(cats) * len(series) + 1.0))
    height = 0.8 / len(series)
    for i, (_, g) in enumerate(series):
        g = g.set_index("category").reindex(cats)
        y = np.arange(len(cats)) + i * height
        row = g.dropna(subset=["k"]).iloc[0]
        ax.barh(y, g["speedup"], height=height, xerr=_err(g["speedup"], g["speedup_lo"], g["speedup_hi"]),
                capsize=2, label=group_label(row, varying(cat, BY)) + f" · K={int(row['k'])}")
    ax.set_yticks(np.arange(len(cats)) + 0.4 - height / 2, cats)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speedup (geometric mean over prompts)")
    legend(ax)
    return to_svg(fig, "categories")


@styled
def compared(cmp: pd.DataFrame, column: str) -> str | None:
    """Decode tok/s per value of a compared axis and K: the trade-off a policy or a cache precision makes."""
    if cmp.empty:
        return None
    fig, ax = figure()
    label_keys = [k for k in varying(cmp) if k != column and k in BY]
    for _, g in cmp.groupby([column, *label_keys], dropna=False, sort=True):
        g = g.sort_values("k")
        ax.plot(g["k"], g["tok_s"], marker="o", label=group_label(g.iloc[0], [column, *label_keys]))
    ks = sorted(cmp["k"].unique())
    ax.set_xticks(ks, ["AR" if k == 0 else f"K={k}" for k in ks])
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    legend(ax)
    return to_svg(fig, f"compare-{column}")


@styled
def context(ctx: pd.DataFrame) -> str | None:
    """Depth-1 acceptance, τ, speedup, TTFT and peak memory against the prompt length (mean prompt tokens of each
    bucket, log scale), one line per group and K (dashed: AR where a panel has it)."""
    if ctx.empty:
        return None
    fig = Figure(figsize=(9.0, 6.4))
    axes = fig.subplots(2, 3).ravel()
    keys = [k for k in varying(ctx) if k != "context"]
    x_col = "ar_prompt_tokens"
    panels = [("depth-1 acceptance", lambda g: g["acceptance_by_depth"].map(
                  lambda v: v[0] if isinstance(v, (list, tuple, np.ndarray)) and len(v) else np.nan), None),
              ("τ (mean acceptance length)", lambda g: g["tau"], None),
              ("speedup over AR", lambda g: g["speedup"], None),
              ("TTFT s", lambda g: g["mtp_ttft_s"], lambda g: g["ar_ttft_s"]),
              ("peak memory MB", lambda g: g["mtp_peak_memory_bytes"] / 1e6, lambda g: g["ar_peak_memory_bytes"] / 1e6),
              ("cost ratio c", lambda g: g["cost_ratio"], None)]
    for ax, (title, mtp_y, ar_y) in zip(axes, panels):
        ar_drawn: set[str] = set()
        for _, g in ctx.groupby([*keys, "k"], dropna=False, sort=True):
            g = g.sort_values(x_col)
            label = group_label(g.iloc[0], keys) + f" · K={int(g['k'].iloc[0])}"
            ax.plot(g[x_col], mtp_y(g), marker="o", label=label)
            base = group_label(g.iloc[0], keys)
            if ar_y is not None and base not in ar_drawn:
                ar_drawn.add(base)
                ax.plot(g[x_col], ar_y(g), marker="s", ls="--", color="grey", label=f"{base} · AR")
        if title == "speedup over AR":
            ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(round(v)) for v in ctx[x_col].dropna()})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("prompt tokens")
    handles, labels = axes[3].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.tight_layout()
    return to_svg(fig, "context")
