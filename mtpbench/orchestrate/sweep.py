"""The runner: validate everything, plan the cells, open (and lock) the results directory, and drive every backend
through the one interface (`backends.base.Backend`) on an executor (`execute`).

Each cell's rows are written as atomic parquet parts when it finishes (steps and tokens first, runs last), so a
killed sweep loses at most the cell in flight and a rerun of the same command finishes only what is missing. The
reference decoder's cells run grouped by (checkpoint, policy), one model in memory at a time; server endpoints'
cells run cell by cell across endpoints, in ABBA order per repetition, so drift hits AR and MTP servers alike.
Executors: `local` (this process) and `ray` (`ray_executor`: one task per checkpoint group). Only this process
ever writes the results directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..backends.base import Backend
from ..errors import UserError
from ..provenance import now_iso, provenance
from ..sweep.axes import NATIVE, REFERENCE, SERVER
from ..sweep.prompts import Prompt, load_sets
from .execute import RunEvent, SweepOutcome, Work, Writer, execute_local
from ..sweep.spec import Cell, SweepSpec, plan
from ..sweep.store import (SCHEMA_VERSION, done_parts, open_results_dir, part_name, parts, read_table, readable,
                    remove_created, supersede, update_manifest, write_part)

EXECUTORS = ("local", "ray")
Say = Callable[[str], None]


def build_backends(spec: SweepSpec, sweep: str, say: Say) -> list[Backend]:
    """One reference backend per (checkpoint, policy), one server backend per endpoint."""
    from ..backends.reference import ReferenceBackend, display_names
    from ..backends.server import ServerBackend

    names = display_names(spec.models)
    out: list[Backend] = [ReferenceBackend(spec, m, p, names[m], sweep) for m in spec.models
                          for p in spec.values("policy")]
    fallback = spec.models[0] if spec.models else None
    out += [ServerBackend(spec, e, sweep, fallback, say) for e in spec.endpoints]
    return out


def schedule(backends: list[Backend], cells: list[Cell]) -> Work:
    """(backend, cell) pairs in execution order: each reference backend's cells together (plan order), then every
    server cell across the endpoints, reversed on odd repetitions (ABBA)."""
    work: Work = []
    for b in (b for b in backends if b.kind == REFERENCE):
        work += [(b, c) for c in cells if b.takes(c)]
    servers = [b for b in backends if b.kind == SERVER]
    for c in (c for c in cells if c.backend == SERVER):
        work += [(b, c) for b in (servers if c.repetition % 2 == 0 else servers[::-1])]
    return work


def new_manifest(out: Path, spec: SweepSpec, command: str) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "name": out.name, "created_at": now_iso(), "command": command,
            "spec": spec.to_dict(), "provenance": provenance(), "models": {}, "endpoints": {}, "prompts": {}}


def _check_resume(out: Path, manifest: dict[str, Any], spec: SweepSpec) -> None:
    old, new = manifest.get("spec", {}), spec.to_dict()
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another --out or "
                        f"remove it")


def _supersede_stale(out: Path, wanted: set[str], prompts: list[Prompt]) -> list[str]:
    """Parts of this directory that the plan no longer has (their prompt's text changed since they ran): moved to
    `superseded/`, kept on disk, never read; returns a note saying so."""
    stale = [f for f in parts(out, "runs") if part_name(f) not in wanted]
    if not stale:
        return []
    current = {(p.set_name, p.id) for p in prompts}
    changed: set[str] = set()
    for f in stale:
        if readable(f):
            t = pq.read_table(f, columns=["prompt_set", "prompt_id"]).to_pylist()
            changed |= {f"{r['prompt_set']}/{r['prompt_id']}" for r in t if (r["prompt_set"], r["prompt_id"]) in current}
        supersede(out, part_name(f))
    shown = sorted(changed)
    what = f" (prompt text changed: {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''})" if shown else ""
    return [f"{len(stale)} cell(s) measured on prompts this sweep no longer has{what}: their parts moved to "
            f"{out / 'superseded'}; rerunning those cells"]


def write_verdicts(out: Path) -> None:
    """The per-cell preservation verdicts, recomputed from the tables of the whole directory."""
    from ..stats.sweep_verdicts import sweep_verdicts

    rows = sweep_verdicts(read_table(out, "runs"), read_table(out, "steps"), read_table(out, "tokens"))
    write_part(out, "verdicts", "sweep", rows)


def run_sweep(spec: SweepSpec, out: Path, command: str = "", progress: Callable[[RunEvent], None] | None = None,
              executor: str = "local", ray_address: str | None = None, say: Say | None = None) -> SweepOutcome:
    """Validate everything, then run every missing cell; safe to call again on the same dir to resume.

    `executor`: "local" runs the cells in this process; "ray" runs each reference (checkpoint, policy) group as a
    Ray task (`ray_executor.run_ray`) on the cluster at `ray_address`, or on a local Ray instance. Both write the
    same parts, so either can resume a dir the other started.
    """
    say = say or (lambda _line: None)
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if ray_address and executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    if executor == "ray" and spec.endpoints:
        raise UserError("--executor ray runs checkpoints with the reference decoder; --endpoint sweeps measure "
                        "servers from this machine: use one or the other")
    if spec.endpoints and NATIVE not in spec.values("context"):
        raise UserError("--context buckets apply to checkpoints (the reference decoder); server endpoints take the "
                        "prompt sets' own prompts: add native to --context or sweep the endpoints apart")
    prompts = load_sets(list(spec.prompts))
    bucketed: dict[tuple[str, int], list[Prompt]] = {}
    if spec.models:
        from ..backends.reference import check, context_prompts

        check(spec, prompts)
        bucketed = context_prompts(spec)
    cells = plan(spec, prompts, bucketed)
    lock, created, manifest = open_results_dir(out, lambda: new_manifest(out, spec, command))
    try:
        if created is None:
            _check_resume(out, manifest, spec)
        backends = build_backends(spec, out.name, say)
        work = schedule(backends, cells)
        every = prompts + [p for ps in bucketed.values() for p in ps]
        notes = _supersede_stale(out, {b.part(c) for b, c in work}, every) if created is None else []
        for note in notes:
            say(note)
        update_manifest(out, lambda m: m.setdefault("prompts", {}).update(
            {f"{p.set_name}/{p.id}": p.digest for p in prompts}))
        if bucketed:
            from ..backends.reference import context_manifest

            update_manifest(out, lambda m: m.setdefault("context_prompts", {}).update(
                context_manifest(spec, bucketed)))
        done = done_parts(out)
        todo = [(b, c) for b, c in work if b.part(c) not in done]
        outcome = SweepOutcome(out, len(work), 0, len(work) - len(todo), notes=notes)
        runs_total = sum(b.runs_in(c) for b, c in todo)
        writer = Writer(out, outcome, progress, runs_total)
        if executor == "ray":
            from .ray_executor import run_ray

            run_ray(spec, todo, writer, address=ray_address)
        else:
            execute_local(todo, writer)
        write_verdicts(out)
        return outcome
    except BaseException:
        if created is not None and not done_parts(out):
            remove_created(created)  # nothing measured yet: leave no half-made dir behind, and nothing else
        raise
    finally:
        lock.release()
