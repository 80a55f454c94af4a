"""Run a sweep's cells on a Ray cluster (or a local Ray instance): `mtpbench sweep --executor ray`.

The unit of work is one reference (checkpoint, policy) group, run by `execute.run_backend` on a `ReferenceBackend`
built on the worker (load and quantize the checkpoint once, warm up per group of like cells, run its cells). Each group is one Ray task that
declares `num_cpus`; a cell (AR and MTP at every K, in ABBA order) always runs whole inside one task, so the
timing pairs compared in a report were measured back to back on one machine.

Workers return records, the driver writes them
    A worker never writes results. When a cell finishes, the worker sends its (runs, steps, tokens) rows to a
    small collector actor (`Sink`) and waits until they are stored; the driver drains the collector a few times
    a second and writes each cell with `execute.Writer`, exactly as the local executor does. So:
    * no shared filesystem is needed for results: workers only need the checkpoints (see the README);
    * the driver is the only writer of the results dir, so the atomic-rename parts, the "runs part last = cell
      done" rule and `store.done_parts`-based resume hold unchanged, and a local and a Ray run of the same spec can
      resume each other's directory;
    * results stream back per cell (not per group): progress is per cell, and a worker killed mid-group loses
      at most the cell it was running.

Failures and retries
    A task that dies (worker or machine lost, out of memory, any exception other than UserError) is resubmitted
    with only the cells of its group not yet received, at most `max_retries` times per group (Ray's own task
    retry is off: it would rerun the whole group). After that the group's remaining cells are left MISSING (no
    row is written) and listed in `SweepOutcome.failed_runs`, so the command exits non-zero and simply rerunning
    it runs them: a failed row would have a runs part, which marks a cell done and would stop a rerun from
    retrying it. A UserError on a worker (e.g. a checkpoint missing on that machine) is not retried: it is
    raised on the driver, naming the host, as the local executor would raise it.

Ctrl-C cancels every outstanding task (`ray.cancel(force=True)`), writes the cells already received, and
shuts down a Ray instance this function started (or disconnects from a cluster it connected to).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
from typing import Any

from ..backends.reference import ReferenceBackend
from ..errors import UserError
from ..sweep.rows import CellRows
from .execute import Work, Writer, run_backend
from ..sweep.spec import Cell, SweepSpec

log = logging.getLogger(__name__)

INSTALL_HINT = '--executor ray needs Ray: pip install -e ".[ray]"'
POLL_S = 0.25  # how often the driver drains finished cells while tasks run

_test_hooks: dict[str, Any] = {}
"""TEST-ONLY fault injection; empty in normal use. Workers are other processes and never see this dict: the driver
copies it into every task's arguments at submission. Keys:

``"exit_after_first_cell_unless"``: a file path. A task that has delivered its first cell tries to create the file
(O_EXCL); the one task that succeeds kills its own process (`os._exit`), like a machine lost mid-group. Once per
file, across concurrent tasks, so every retry and every other group runs normally.
"""


class Sink:
    """Collects finished cells from every worker until the driver drains them (a Ray actor, 0 CPUs)."""

    def __init__(self) -> None:
        self._items: list[tuple] = []

    def put(self, item: tuple) -> None:
        self._items.append(item)

    def drain(self) -> list[tuple]:
        items, self._items = self._items, []
        return items


def _group_task(spec: SweepSpec, model: str, policy: str, display: str, cells: list[Cell], sweep_name: str,
                sink, hooks: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Runs on a worker: one (model, policy) group via `execute.run_backend`; each cell's rows go to `sink` as it ends.

    Returns the backend's manifest entry.
    """
    import ray

    delivered = 0

    def on_cell(part: str, rows: CellRows) -> None:
        nonlocal delivered
        ray.get(sink.put.remote((part, rows)))  # stored before the next cell starts
        delivered += 1
        marker = hooks.get("exit_after_first_cell_unless")
        if marker and delivered == 1:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one task wins
            except FileExistsError:
                return
            os._exit(1)

    try:
        return run_backend(ReferenceBackend(spec, model, policy, display, sweep_name), cells, on_cell)
    except UserError as e:
        raise UserError(f"{platform.node()}: {e}") from None


def _one_line(err: BaseException) -> str:
    """A task's error as one line: the worker's own exception when Ray wraps one, else Ray's first line."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(err).__name__}: {err}"
    line = next((s.strip() for s in text.splitlines() if s.strip()), type(err).__name__)
    return line[:300]


def _user_error(err: BaseException) -> UserError | None:
    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):
        return UserError(str(cause))
    return None


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes); other forms go to Ray."""
    if "://" in address or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected HOST:PORT of the Ray head, e.g. head.local:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray head at {address}: {e.strerror or e} (is `ray start --head` "
                        f"running there, and the port open?)") from None


def _init_ray(ray, address: str | None) -> None:
    """Worker output stays on the workers (errors come back as exceptions): the driver's progress bar stays clean."""
    opts = dict(include_dashboard=False, log_to_driver=False)
    if address is None:
        # A local instance, bounded to this machine; its start-up notices are noise here.
        ray.init(num_cpus=os.cpu_count() or 1, logging_level=logging.ERROR, **opts)
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, **opts)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {_one_line(e)}") from None


def run_ray(spec: SweepSpec, work: Work, writer: Writer, address: str | None = None, max_retries: int = 2,
            num_cpus_per_task: float = 1) -> None:
    """Run the (reference) work, one Ray task per (model, policy) group; same contract as `execute.execute_local`.

    `address=None` starts a local Ray instance with this machine's CPUs (shut down on return); an address
    (`HEAD:6379`, checked to be reachable first) connects to a running cluster. A Ray already initialised in this
    process is used as it is and left running. `num_cpus_per_task` is what each task declares: Ray runs at most
    cores/num_cpus_per_task groups at once on a machine, and sets the worker's OMP/BLAS thread count to it.
    """
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if max_retries < 0:
        raise UserError(f"max_retries must be >= 0, got {max_retries}")
    if not num_cpus_per_task > 0:
        raise UserError(f"num_cpus_per_task must be > 0, got {num_cpus_per_task}")
    groups: dict[str, tuple[ReferenceBackend, list[Cell]]] = {}
    for backend, cell in work:
        groups.setdefault(backend.name, (backend, []))[1].append(cell)  # type: ignore[arg-type]
    if not groups:
        return
    received: set[str] = set()

    def take(item: tuple[str, CellRows]) -> None:
        part, rows = item
        if part in received:  # a cell sent twice (never expected): same part names, so skip, not duplicate
            return
        writer.cell(part, rows)
        received.add(part)
        for r in rows.runs:
            tok_s = r.get("decode_tok_s")
            writer.run(f"{r['prompt_id']} {r['mode']}{r['k'] if r['mode'] == 'mtp' else ''}",
                       math.nan if tok_s is None else tok_s)

    if address is not None:
        _check_reachable(address)
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, address)
    pending: dict[Any, str] = {}
    sink = None
    try:
        sink = ray.remote(num_cpus=0)(Sink).remote()
        task = ray.remote(_group_task)
        attempts = dict.fromkeys(groups, 0)

        def submit(key: str, cells: list[Cell]) -> None:
            b = groups[key][0]
            ref = task.options(num_cpus=num_cpus_per_task, max_retries=0, retry_exceptions=False,
                               name=f"mtpbench:{key}").remote(
                spec, b.model, b.policy, b.display, cells, b.sweep, sink, dict(_test_hooks))
            pending[ref] = key

        def drain() -> None:
            for item in ray.get(sink.drain.remote()):
                take(item)

        for key, (_, cells) in groups.items():
            submit(key, cells)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            drain()  # a finished task's cells are all in the sink: each put was awaited before it went on
            for ref in ready:
                key = pending.pop(ref)
                backend, cells = groups[key]
                try:
                    entry = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - any task failure: worker lost, OOM, an exception
                    user = _user_error(e)
                    if user is not None:
                        raise user from None
                    remaining = [c for c in cells if backend.part(c) not in received]
                    attempts[key] += 1
                    if attempts[key] > max_retries:
                        why = f"ray task failed {attempts[key]} time(s), cell left for a rerun: {_one_line(e)}"
                        log.error("%s: %s", key, why)
                        writer.outcome.failed_runs.extend(f"{c.run_id(mode, k)}: {why}"
                                                          for c in remaining for mode, k in c.order(c.ks))
                        continue
                    # Remaining may be empty (the task died after its last cell): the retry then only loads
                    # the checkpoint to describe it for the manifest.
                    log.warning("%s: ray task failed (%s); retry %d/%d with its %d remaining cell(s)",
                                key, _one_line(e), attempts[key], max_retries, len(remaining))
                    submit(key, remaining)
                    continue
                writer.record(*entry)
    except BaseException:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        if sink is not None:
            try:
                for item in ray.get(sink.drain.remote(), timeout=10):  # keep what was measured
                    take(item)
            except Exception:  # noqa: BLE001 - the collector may be gone too
                pass
        raise
    finally:
        if sink is not None:
            try:
                ray.kill(sink)
            except Exception:  # noqa: BLE001
                pass
        if started_here:
            ray.shutdown()
