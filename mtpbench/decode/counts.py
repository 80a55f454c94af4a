"""The one definition of the speculative counters, and the invariants every decode is checked against.

A draft *reaches* depth d when it was drafted and verified, and every earlier draft of its step was accepted and
emitted: the rule judged it, and the run was still going. That is exactly a row of the steps table at depth d, and
the denominator of conditional acceptance (summary, card, report, verify, bench all take it from here). A draft
counts as *accepted* only when it was emitted: accepted drafts after an EOS, or past max_tokens, are neither
accepted nor reached. Hence, per run:

- emitted tokens = 1 (the prefill's) + accepted drafts + residual/bonus tokens (one per step at most);
- reached(1) = verify steps; drafted(d) >= reached(d) >= accepted(d) >= reached(d+1);
- with records: the steps table has reached(d) rows at depth d, accepted(d) of them accepted, and the tokens table
  one row per emitted token, its sources counting the same.

Pure Python (no mlx): the report and stats read it too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


class CountError(RuntimeError):
    """A decode whose counters contradict each other or its tables: a bug, never a measurement to keep."""


def reached_by_depth(verify_steps: int, accepted_at_depth: Sequence[int],
                     reached_at_depth: Sequence[int] | None = None) -> list[int]:
    """Drafts that reached each depth. The decoder records them (`reached_at_depth`); a row without them (a server
    endpoint, or results written before they were recorded) falls back to the chain verify steps, accepted(d-1),
    which is exact when every step drafts K positions and no run ends inside a step's accepted drafts."""
    if reached_at_depth is not None and len(reached_at_depth) == len(accepted_at_depth):
        return [int(x) for x in reached_at_depth]
    return [int(verify_steps), *(int(a) for a in accepted_at_depth[:-1])][: len(accepted_at_depth)]


def step_counts(emitted: int, accepted: int, depth: int) -> tuple[int, int]:
    """(accepted drafts emitted, drafts reached) of one step that drafted `depth` positions, had `accepted`
    accepted by the rule, and emitted `emitted` tokens before EOS or max_tokens stopped it."""
    used = min(accepted, emitted)
    return used, min(depth, accepted + 1, emitted)


def count_problems(r: Any) -> list[str]:
    """Every invariant a `DecodeResult` breaks (empty when it holds); AR results (k = 0) check the tokens table."""
    problems: list[str] = []
    n = len(r.tokens)
    if r.token_records and len(r.token_records) != n:
        problems.append(f"{len(r.token_records)} token records for {n} emitted tokens")
    if not r.k:
        return problems
    steps, acc, reached, drafted = r.verify_steps, r.accepted_at_depth, r.reached_at_depth, r.drafted_at_depth
    if len(r.accepted_per_step) != steps:
        problems.append(f"{len(r.accepted_per_step)} per-step counts for {steps} verify steps")
    if sum(r.accepted_per_step) != sum(acc):
        problems.append(f"accepted per step sums to {sum(r.accepted_per_step)}, per depth to {sum(acc)}")
    if n != 1 + sum(acc) + r.bonus_tokens:
        problems.append(f"{n} emitted != 1 + {sum(acc)} accepted + {r.bonus_tokens} residual/bonus")
    if r.bonus_tokens > steps:
        problems.append(f"{r.bonus_tokens} residual/bonus tokens in {steps} steps")
    if not len(acc) == len(reached) == len(drafted) == r.k:
        problems.append(f"per-depth counters of lengths {len(drafted)}, {len(reached)}, {len(acc)} at K={r.k}")
        return problems
    if steps and reached[0] != steps:
        problems.append(f"reached(1) = {reached[0]} != {steps} verify steps")
    for d in range(r.k):
        chain = [drafted[d], reached[d], acc[d]] + ([reached[d + 1]] if d + 1 < r.k else [])
        if any(a < b for a, b in zip(chain, chain[1:])) or (d and drafted[d] > drafted[d - 1]):
            problems.append(f"depth {d + 1}: drafted {drafted[d]}, reached {reached[d]}, accepted {acc[d]} "
                            f"not monotone")
    if r.steps:
        rows = Counter(s.depth for s in r.steps)
        ok = Counter(s.depth for s in r.steps if s.accepted)
        if [rows[d + 1] for d in range(r.k)] != list(reached) or [ok[d + 1] for d in range(r.k)] != list(acc):
            problems.append(f"steps table {[rows[d + 1] for d in range(r.k)]} reached / "
                            f"{[ok[d + 1] for d in range(r.k)]} accepted != counters {list(reached)} / {list(acc)}")
    if r.token_records:
        src = Counter(t.source for t in r.token_records)
        if src["accepted"] != sum(acc) or src["residual"] + src["bonus"] != r.bonus_tokens:
            problems.append(f"tokens table sources {dict(src)} != {sum(acc)} accepted, {r.bonus_tokens} residual/bonus")
    return problems


def check_counts(r: Any) -> None:
    """Raise `CountError` naming every broken invariant: a run whose counts disagree fails loudly."""
    problems = count_problems(r)
    if problems:
        raise CountError("decode counters broken: " + "; ".join(problems))
