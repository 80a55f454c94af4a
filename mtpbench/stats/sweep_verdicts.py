"""Preservation verdicts for every sweep cell, computed from the `runs`, `steps` and `tokens` tables alone.

Sampled settings get `preservation.sampled_family`: with the fresh-target columns the reference backend records
(decode/rescore.py), support, PIT and score against the fresh rows, PIT by token source and acceptance above its
bound decide; the decoder-row PIT and score and the drift are labelled diagnostics; Holm within each family of the
cell. Greedy settings get the one greedy-identity verdict `verify` gives (`preservation.greedy_identity_test`):
token identity with the AR run of the same prompt and repetition, a divergence excused on a near-tie of the AR
run's top-2 logit gap (stored in the tokens table's `top2_gap`). This is what lets
every sweep cell carry a verdict on any checkpoint size, without re-running a model.

An audited server's cell (tokens of source "server", rescored against the local checkpoint by `backends.audit`)
gets the part of the family that applies without own rows or drafts (`preservation.SERVER_TESTS`: support, PIT and
score against the fresh rows), the drift of its reported log-probs, and an `audit` row (not a test) saying how many
runs were audited, how their tokens were obtained, the sampling profile, and the assumption the audit rests on.
Where the sweep also holds AR runs of the same setting and prompts (an audited AR endpoint under the same profile,
else the reference decoder's AR when the profile is mlx's, the reference's own), an audited MTP server's cell also
gets a two-sample test against them: the per-run mean log p (Mann-Whitney).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from ..sampling import MLX
from ..sweep.axes import GROUP_KEYS, REFERENCE
from .preservation import (FRESH_COLUMNS, SERVER_TESTS, GreedyIdentity, TestResult, greedy_identity,
                           greedy_identity_test, holm_by_family, sampled_family, two_sample_scalar)

TOKEN_COLUMNS = ("source", "target_logprob", "pit_u", "logprob_mean", "logprob_var", "logprob_m3", "cond_pit_u")
NOT_TESTS = ("drift", "audit", "oracle")  # measurements reported beside the tests (their p is NaN)

CELL_KEYS = [*GROUP_KEYS, "k"]  # a verdict per group of like cells and K


def _known(value: Any) -> Any:
    """A grouping value as stored: pandas' NaN for a missing key (a server's model, policy) becomes null."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _row(key: dict[str, Any], first: pd.Series, r: TestResult) -> dict[str, Any]:
    return {"scope": "sweep", **{k: _known(key[k]) for k in CELL_KEYS}, "temperature": float(first["temperature"]),
            "top_p": float(first["top_p"]), "top_k": int(first["top_k"]), "min_p": float(first["min_p"]),
            "draft_temperature": _known(first["draft_temperature"]), "control": "none", "test": r.test, "n": r.n,
            "statistic": r.statistic, "p_value": r.p_value, "p_holm": r.p_holm, "detectable": r.detectable,
            "detectable_unit": r.unit, "rejected": r.rejected(), "note": r.note, "family": r.family}


def _run_tokens(tokens: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each run's token rows in emission order."""
    cols = [c for c in ("run_id", "index", "token_id", "top2_gap") if c in tokens.columns]
    return {rid: t.sort_values("index") for rid, t in tokens[cols].groupby("run_id", sort=False)}


def _greedy_identity(mtp: pd.DataFrame, ar: pd.DataFrame, tokens: pd.DataFrame) -> TestResult:
    """`preservation.greedy_identity_test`, the verdict `verify` gives: each MTP run against the AR run of its
    cell (same prompt, repetition, setting), token by token, a divergence excused on a near-tie of the AR run's
    stored top-2 gaps. Runs written without token rows are compared by output hash, and runs without stored gaps
    (older results) excuse nothing; the note says so."""
    pairs = mtp.merge(ar[["cell_id", "run_id", "output_hash"]], on="cell_id", suffixes=("", "_ar"))
    by_run = _run_tokens(tokens[tokens["run_id"].isin(set(pairs["run_id"]) | set(pairs["run_id_ar"]))])
    results, hashed, ungapped = [], 0, 0
    for _, pr in pairs.iterrows():
        m, a = by_run.get(pr["run_id"]), by_run.get(pr["run_id_ar"])
        if m is None or a is None or not len(m) or not len(a):
            hashed += 1
            same = pr["output_hash"] == pr["output_hash_ar"]
            results.append(GreedyIdentity(bool(same), 0, None if same else 0, False, float("nan")))
            continue
        gaps = a["top2_gap"].to_numpy(dtype=float) if "top2_gap" in a else np.full(len(a), np.nan)
        ungapped += not np.isfinite(gaps).any()
        results.append(greedy_identity(a["token_id"].tolist(), m["token_id"].tolist(), gaps))
    caveat = "; ".join(([f"{hashed} run(s) without token rows compared by output hash (near-ties not checkable)"]
                        if hashed else []) + ([f"{ungapped} AR run(s) without stored top-2 gaps (written before "
                                               f"they were): near-ties not excused"] if ungapped else []))
    return greedy_identity_test(results, caveat)


def audit_summary(g: pd.DataFrame) -> TestResult | None:
    """Not a test: how many of an audited server cell's runs were audited, how, under which profile, and on what
    assumption (None when the cell was not audited)."""
    if "audit" not in g or g["audit"].isna().all():
        return None
    status = g["audit"].fillna("not requested")
    audited = int((~status.str.startswith(("unaudited", "not audited")) & (status != "not requested")).sum())
    hows = "; ".join(f"{n} {how}" for how, n in status.value_counts().items())
    profile = ", ".join(sorted(set(g["audit_profile"].dropna()))) or "none"
    model = ", ".join(sorted(set(g["audit_model"].dropna()))) if "audit_model" in g else ""
    return TestResult("audit", len(g), float(len(g) - audited), float("nan"), float("nan"), "unaudited runs",
                      note=f"{audited} of {len(g)} runs audited ({hows}); sampling profile {profile} (under a profile "
                           f"the server does not use, a rejection is that mismatch, not a sampler bug); assumes the "
                           f"server serves the same weights as {model or 'the audit checkpoint'} (asserted by the "
                           f"user, not checked)", kind="diagnostic")


def _run_means(runs: pd.DataFrame, tokens: pd.DataFrame, logprob: str) -> list[float]:
    """The mean finite log p of each run with tokens rows."""
    t = tokens[tokens["run_id"].isin(set(runs["run_id"]))]
    means = []
    for _, rt in t.groupby("run_id", sort=True):
        lp = rt[logprob].to_numpy(dtype=float)
        if np.isfinite(lp).any():
            means.append(float(lp[np.isfinite(lp)].mean()))
    return means


def two_sample_tests(g: pd.DataFrame, runs: pd.DataFrame, tokens: pd.DataFrame) -> list[TestResult]:
    """An audited MTP server cell against AR runs of the same setting and prompts (another audited endpoint's AR
    under the same profile, else the reference's AR when the audit's profile is mlx, the reference's order): the
    per-run mean log p, Mann-Whitney.

    No first-token test: the first token is sampled from the prefill row before any drafting, and with the same
    seed an AR and an MTP server draw the same one (measured: p = 1 in every run, bugs included), so it could not
    fail. Later tokens diverge, which leaves the pairs at worst positively correlated: conservative, not lax."""
    first = g.iloc[0]
    profile = first.get("audit_profile")
    ar = runs[(runs["mode"] == "ar") & (runs["setting"] == first["setting"])
              & runs["prompt_id"].isin(set(g["prompt_id"])) & (runs["backend"] != first["backend"])]
    server_ar = ar[ar["audit"].notna() & (ar["audit_profile"] == profile)] if "audit" in ar else ar.iloc[:0]
    reference_ar = ar[ar["backend"] == REFERENCE] if profile == MLX else ar.iloc[:0]
    other, column = (server_ar, "fresh_logprob") if len(server_ar) else (reference_ar, "target_logprob")
    mine, theirs = _run_means(g, tokens, "fresh_logprob"), _run_means(other, tokens, column)
    if len(mine) < 2 or len(theirs) < 2:
        return []
    scalar = two_sample_scalar(mine, theirs, name="two_sample_mean_logprob")
    return [replace(scalar, note=f"per-run mean log p vs {', '.join(sorted(set(other['backend'])))} AR "
                                 f"({len(theirs)} runs)")]


def sweep_verdicts(runs: pd.DataFrame, steps: pd.DataFrame, tokens: pd.DataFrame) -> list[dict[str, Any]]:
    runs = runs[runs["status"] == "ok"]
    ar = runs[runs["mode"] == "ar"]
    rows: list[dict[str, Any]] = []
    audited = runs["audit"].notna() if "audit" in runs else pd.Series(False, index=runs.index)
    for key, g in runs[(runs["mode"] == "mtp") | audited].groupby(CELL_KEYS, dropna=False, sort=True):
        keyd = dict(zip(CELL_KEYS, key))
        first = g.iloc[0]
        if float(first["temperature"]) == 0:
            results = [replace(r, p_holm=r.p_value) for r in [_greedy_identity(g, ar, tokens)]]  # a family of one
            rows += [_row(keyd, first, r) for r in results]
            continue
        ids = set(g["run_id"])
        toks = tokens[tokens["run_id"].isin(ids)]
        st = steps[steps["run_id"].isin(ids)]
        columns = {c: toks[c].to_numpy() for c in (*TOKEN_COLUMNS, *FRESH_COLUMNS) if c in toks.columns}
        if "cond_pit_u" in columns and not np.isfinite(columns["cond_pit_u"].astype(float)).any():
            del columns["cond_pit_u"]  # written before conditional PIT existed
        server = len(toks) > 0 and bool((toks["source"] == "server").all())
        family = sampled_family(columns, st["accepted"].to_numpy(dtype=bool), st["alpha"].to_numpy(),
                                tests=SERVER_TESTS if server else ("support", "pit", "score", "conditional",
                                                                   "calibration"),
                                p_draft=st["p_draft"].to_numpy(), q_draft=st["q_draft"].to_numpy())
        if server and first["mode"] == "mtp":
            family += two_sample_tests(g, runs, tokens)
        results = holm_by_family(family)
        audit = audit_summary(g)
        results += [audit] if audit is not None else []
        rows += [_row(keyd, first, r) for r in results
                 if r.n > 0 and (np.isfinite(r.p_value) or r.test in NOT_TESTS)]
    return rows
