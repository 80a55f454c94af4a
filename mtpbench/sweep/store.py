"""The one parquet schema of mtpbench, and atomic, resumable storage of a sweep's results.

A results directory holds `manifest.json` and one sub-directory per table (`runs`, `steps`, `tokens`,
`verdicts`), each made of part files `part-<cell_id>.parquet`. A part is written to a temporary name and renamed,
so a reader never sees half a file; the `runs` part of a cell is written last, so its presence means "cell done".
Rerunning a cell overwrites its parts by name: no duplicates, whatever moment a sweep was killed at.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError

SCHEMA_VERSION = 1

RUNS = pa.schema([
    ("run_id", pa.string()), ("cell_id", pa.string()), ("sweep", pa.string()), ("backend", pa.string()),
    ("model", pa.string()), ("model_fingerprint", pa.string()), ("model_path", pa.string()), ("policy", pa.string()),
    ("kv_bits", pa.int32()),  # trunk KV-cache bits (0: unquantized); also folded into `policy` as `+kv8`
    ("mode", pa.string()), ("k", pa.int32()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()), ("min_p", pa.float64()),
    ("draft_temperature", pa.float64()), ("setting", pa.string()), ("thinking", pa.string()),
    ("prompt_set", pa.string()), ("prompt_id", pa.string()), ("category", pa.string()),
    ("repetition", pa.int32()), ("seed", pa.int64()), ("max_tokens", pa.int32()), ("order", pa.int32()),
    ("prompt_tokens", pa.int32()), ("generated_tokens", pa.int32()),
    ("prefill_s", pa.float64()), ("decode_s", pa.float64()), ("decode_tok_s", pa.float64()), ("ttft_s", pa.float64()),
    ("peak_memory_bytes", pa.int64()),
    ("weight_bytes_per_token", pa.float64()),  # roofline: trunk (+ K draft steps / tau) weight bytes per token
    ("memory_gb_s", pa.float64()),  # the machine's copy bandwidth, measured once per process
    ("verify_steps", pa.int32()), ("drafted_tokens", pa.int32()), ("accepted_tokens", pa.int32()),
    ("mean_acceptance_length", pa.float64()),
    ("drafted_at_depth", pa.list_(pa.int32())), ("accepted_at_depth", pa.list_(pa.int32())),
    ("finished_by", pa.string()), ("output_hash", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("hidden_variant", pa.string()),
    ("concurrency", pa.int32()), ("itl_p50_s", pa.float64()), ("itl_p95_s", pa.float64()), ("itl_p99_s", pa.float64()),
    ("server_completion_tokens", pa.int32()),
    ("mtpbench_version", pa.string()), ("mlx_version", pa.string()), ("mlx_lm_version", pa.string()),
    ("git_sha", pa.string()), ("host", pa.string()), ("device", pa.string()), ("os", pa.string()),
    ("python", pa.string()), ("blas", pa.string()), ("started_at", pa.string()),
])
STEPS = pa.schema([
    ("run_id", pa.string()), ("step", pa.int32()), ("depth", pa.int32()), ("drafted_token", pa.int32()),
    ("accepted", pa.bool_()), ("p_draft", pa.float64()), ("q_draft", pa.float64()), ("alpha", pa.float64()),
])
TOKENS = pa.schema([
    ("run_id", pa.string()), ("index", pa.int32()), ("token_id", pa.int32()), ("source", pa.string()),
    ("target_logprob", pa.float64()), ("pit_u", pa.float64()),
    ("logprob_mean", pa.float64()), ("logprob_var", pa.float64()), ("logprob_m3", pa.float64()),
])
VERDICTS = pa.schema([
    ("scope", pa.string()),  # verify | sweep
    ("model", pa.string()), ("policy", pa.string()), ("backend", pa.string()), ("k", pa.int32()),
    ("setting", pa.string()), ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()),
    ("min_p", pa.float64()), ("draft_temperature", pa.float64()), ("control", pa.string()),
    ("test", pa.string()), ("n", pa.int64()), ("statistic", pa.float64()), ("p_value", pa.float64()),
    ("p_holm", pa.float64()), ("detectable", pa.float64()), ("detectable_unit", pa.string()),
    ("rejected", pa.bool_()), ("note", pa.string()),
    ("family", pa.string()),  # preservation (decides the verdict) | acceptance (is the rule the optimal one)
])
TABLES: dict[str, pa.Schema] = {"runs": RUNS, "steps": STEPS, "tokens": TOKENS, "verdicts": VERDICTS}


@contextmanager
def _interrupt_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it: a write is whole or absent, and no temporary
    file is left behind by an interrupt landing between its creation and its rename. Main thread only (the only
    one Python delivers signals to); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(*pending[0])  # Python's default handler raises KeyboardInterrupt here
        elif pending and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _interrupt_deferred():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_part(root: Path, table: str, part: str, rows: list[dict[str, Any]]) -> None:
    """Write rows as `root/table/part-<part>.parquet`, atomically, validated against the table's schema."""
    schema = TABLES[table]
    data = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    _atomic_write_bytes(root / table / f"part-{part}.parquet", lambda tmp: pq.write_table(data, tmp))


def write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Created:
    """What `create_results_dir` made: the results directory (whose mtpbench files are ours) and every directory
    the call created, deepest first (empty when the directory already existed, empty). Nothing else is ever removed."""

    root: Path
    dirs: tuple[Path, ...]


def create_results_dir(out: Path) -> Created:
    """Make a new results directory (or take an existing empty one) and say what this call created.

    A directory that already holds anything is refused unless it is an mtpbench results directory (the caller
    checks for the manifest first): a user's directory is never taken over (think `-o .` or `-o ~`).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty directory that is not an mtpbench results directory"
        raise UserError(f"{out} is {what} (no {MANIFEST}); choose another --out")
    dirs = []
    p = out
    while not p.exists():
        dirs.append(p)
        p = p.parent
    created = Created(out, tuple(dirs))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        remove_created(created)
        raise UserError(f"cannot write results to {out}: {e.strerror}") from None
    return created


def remove_created(created: Created) -> None:
    """Undo `create_results_dir` after a run that measured nothing: mtpbench's own files in the results directory,
    then the directories the call created, each only while empty (rmdir, never a recursive delete: a file someone
    else put there meanwhile stays, and so does its directory)."""
    out = created.root
    for name in (MANIFEST, *TABLES):
        f = out / name
        if f.is_file():
            f.unlink(missing_ok=True)
        elif f.is_dir():
            for ours in (*f.glob(".tmp-*"), *f.glob("part-*.parquet")):
                ours.unlink(missing_ok=True)
            _rmdir_if_empty(f)
    for d in created.dirs:
        if not _rmdir_if_empty(d):
            break


def _rmdir_if_empty(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except OSError:
        return False


def done_parts(root: Path, table: str = "runs") -> set[str]:
    d = root / table
    return {p.name[len("part-"): -len(".parquet")] for p in d.glob("part-*.parquet")} if d.exists() else set()


def read_table(root: Path | str, table: str) -> pd.DataFrame:
    """All parts of one table as a DataFrame (empty with the right columns when there are none)."""
    d = Path(root) / table
    files = sorted(d.glob("part-*.parquet")) if d.exists() else []
    if not files:
        return TABLES[table].empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=TABLES[table]) for f in files]).to_pandas()


def read_manifest(root: Path | str) -> dict[str, Any]:
    f = Path(root) / "manifest.json"
    if not f.exists():
        raise UserError(f"{root}: not a results directory (no manifest.json)")
    return json.loads(f.read_text())


def read_results(roots: list[Path | str]) -> dict[str, pd.DataFrame]:
    """Merge several results directories (machines, policies, checkpoints) into one set of tables."""
    out: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for root in roots:
        read_manifest(root)
        for t in TABLES:
            out[t].append(read_table(root, t))
    return {t: pd.concat(frames, ignore_index=True) if frames else TABLES[t].empty_table().to_pandas()
            for t, frames in out.items()}
