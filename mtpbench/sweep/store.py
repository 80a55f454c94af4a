"""The one parquet schema of mtpbench, and atomic, resumable, locked storage of a sweep's results.

A results directory holds `manifest.json` and one sub-directory per table (`runs`, `steps`, `tokens`,
`verdicts`), each made of part files `part-<part>.parquet`. Parts are written atomically (`mtpbench.atomic`); the
`runs` part of a cell is written last, so a readable `runs` part with a finished run means "cell done". Rerunning a
cell overwrites its parts by name: no duplicates, whatever moment a sweep was killed at.

What a user has is safe: a directory that is not an mtpbench results directory is never taken over, a failed
first run removes only what it created (no recursive delete), and an OS lock held for the whole run keeps a
second process off the same directory (the kernel releases it when the process dies, kill -9 included). A damaged
part is reported (path, one line) and skipped by readers; a resumed sweep reads every part as the readers do
(whole, against the schema), moves a damaged one to `damaged/<table>/` (kept, never read) and reruns its cell.
A cell whose runs all succeeded is done; one with failed runs reruns only those, keeping the others. Directories
written by older schema versions are converted on read (and never resumed); newer ones are refused.

The column list follows `axes.AXES`: each axis's column is in the runs and verdicts schemas. Pure pyarrow/pandas,
no mlx: the report reads results where mlx is not installed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import TEMP_PREFIX, move, write_json, write_with
from ..errors import UserError
from .axes import AXES, GROUP_KEYS, SAMPLING_AXES

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
LOCK = ".lock"
SUPERSEDED = "superseded"  # parts of cells whose prompt text changed: kept, never read
DAMAGED = "damaged"  # parts that did not read whole: kept for inspection, never read; their cells run again

_AXIS_FIELDS = [pa.field(a.column, a.arrow) for a in AXES if a.column != "model"]
RUNS = pa.schema([
    ("run_id", pa.string()), ("cell_id", pa.string()), ("sweep", pa.string()), ("backend", pa.string()),
    ("model", pa.string()),  # a short name (directory name or repo id); the full path is model_path
    ("model_fingerprint", pa.string()), ("model_path", pa.string()),
    *_AXIS_FIELDS,
    ("mode", pa.string()), ("setting", pa.string()), ("prompt_id", pa.string()), ("prompt_digest", pa.string()),
    ("category", pa.string()), ("repetition", pa.int32()), ("seed", pa.int64()), ("max_tokens", pa.int32()),
    ("order", pa.int32()),
    ("prompt_tokens", pa.int32()), ("generated_tokens", pa.int32()),
    ("prefill_s", pa.float64()), ("decode_s", pa.float64()), ("decode_tok_s", pa.float64()), ("ttft_s", pa.float64()),
    ("peak_memory_bytes", pa.int64()),
    ("weight_bytes_per_token", pa.float64()),  # roofline: trunk (+ K draft steps / tau) weight bytes per token
    ("memory_gb_s", pa.float64()),  # the machine's copy bandwidth, measured once per process
    ("kv_bytes_per_step", pa.float64()),  # roofline: KV-cache bytes a step reads at the run's mean cache length
    ("verify_steps", pa.int32()), ("drafted_tokens", pa.int32()), ("accepted_tokens", pa.int32()),
    ("mean_acceptance_length", pa.float64()),
    ("drafted_at_depth", pa.list_(pa.int32())), ("accepted_at_depth", pa.list_(pa.int32())),
    ("reached_at_depth", pa.list_(pa.int32())),  # drafts that reached each depth (decode/counts.py); null: servers
    ("finished_by", pa.string()), ("output_hash", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("rescore_s", pa.float64()),  # seconds of the fresh-target rescoring after the run (not in decode_s)
    ("concurrency", pa.int32()), ("itl_p50_s", pa.float64()), ("itl_p95_s", pa.float64()), ("itl_p99_s", pa.float64()),
    ("server_completion_tokens", pa.int32()),
    # audit of a server (backends/audit.py): how its tokens were obtained (or why unaudited), the sampling profile
    ("audit", pa.string()), ("audit_profile", pa.string()), ("audit_model", pa.string()),
    ("mtpbench_version", pa.string()), ("mlx_version", pa.string()), ("mlx_lm_version", pa.string()),
    ("git_sha", pa.string()), ("host", pa.string()), ("device", pa.string()), ("os", pa.string()),
    ("python", pa.string()), ("blas", pa.string()), ("started_at", pa.string()),
    # the machine around the run's cell (mtpbench.machine.row_fields): load at its start and end, the worse of the
    # two readings for the rest; null where the OS does not report it, and in rows written before they were kept
    ("load_start", pa.float64()), ("load_end", pa.float64()), ("cores", pa.int32()), ("cores_usable", pa.int32()),
    ("governor", pa.string()), ("cpu_freq_mhz", pa.float64()), ("cpu_freq_max_mhz", pa.float64()),
    ("temp_c", pa.float64()), ("thermal_pressure", pa.string()), ("low_power_mode", pa.bool_()),
    # a server's decode clocks (backends/clock.py): its own where it times itself, the client's median-based rate,
    # the client's mean rate, whether the client read a backlog in a burst, and which one decode_tok_s is
    ("server_decode_tok_s", pa.float64()), ("client_decode_tok_s", pa.float64()), ("client_mean_tok_s", pa.float64()),
    ("client_burst", pa.bool_()), ("decode_clock", pa.string()),
    # rule efficiency (backends/audit.py): sum and count of the teacher-forced alpha = sum min(p, q) of the local
    # checkpoint's MTP head over an audited run's draftable positions
    ("audit_alpha_sum", pa.float64()), ("audit_alpha_positions", pa.int32()),
])
STEPS = pa.schema([
    ("run_id", pa.string()), ("step", pa.int32()), ("depth", pa.int32()), ("drafted_token", pa.int32()),
    ("accepted", pa.bool_()), ("p_draft", pa.float64()), ("q_draft", pa.float64()), ("alpha", pa.float64()),
])
TOKENS = pa.schema([
    ("run_id", pa.string()), ("index", pa.int32()), ("token_id", pa.int32()), ("source", pa.string()),
    ("target_logprob", pa.float64()), ("pit_u", pa.float64()),
    ("logprob_mean", pa.float64()), ("logprob_var", pa.float64()), ("logprob_m3", pa.float64()),
    ("cond_pit_u", pa.float64()),  # PIT under the token's law given its source (accepted | residual | bonus)
    # Rescoring against a fresh teacher-forced target (decode/rescore.py): sampled MTP runs of the reference, and
    # audited servers' sampled runs (backends/audit.py).
    ("fresh_logprob", pa.float64()), ("fresh_pit_u", pa.float64()), ("in_fresh_support", pa.bool_()),
    ("fresh_logprob_mean", pa.float64()), ("fresh_logprob_var", pa.float64()), ("fresh_logprob_m3", pa.float64()),
    ("drift_logprob", pa.float64()), ("drift_tv", pa.float64()),
    ("server_logprob", pa.float64()),  # an audited server's reported log p of the token (source "server")
    ("oracle_tv", pa.float64()),  # fresh row vs the independent oracle (mtpbench/oracle.py); NaN: not checked
    ("top2_gap", pa.float64()),  # greedy AR runs: relative top-2 logit gap of the fresh row (near-tie excuse)
])
# A verdict is about one group of cells: the grouping keys, the sampling values behind `setting`, and K.
_VERDICT_KEYS = [c for c in GROUP_KEYS if c != "setting"] + ["setting"]
VERDICT_KEY_FIELDS = [RUNS.field(c) for c in _VERDICT_KEYS] + \
    [RUNS.field(a.column) for a in AXES if a.name in SAMPLING_AXES] + [RUNS.field("k")]
VERDICTS = pa.schema([
    ("scope", pa.string()),  # verify | sweep
    *dict((f.name, f) for f in VERDICT_KEY_FIELDS).values(),
    ("control", pa.string()),
    ("test", pa.string()), ("n", pa.int64()), ("statistic", pa.float64()), ("p_value", pa.float64()),
    ("p_holm", pa.float64()), ("detectable", pa.float64()), ("detectable_unit", pa.string()),
    ("rejected", pa.bool_()), ("note", pa.string()),
    # preservation (decides the verdict) | acceptance (is the rule the optimal one) | diagnostic (decides nothing)
    ("family", pa.string()),
])
TABLES: dict[str, pa.Schema] = {"runs": RUNS, "steps": STEPS, "tokens": TOKENS, "verdicts": VERDICTS}
CELL_TABLES = ("steps", "tokens", "runs")  # the order a cell is written in: runs last marks it done


# --------------------------------------------------------------------------------------------------- parts


def part_path(root: Path, table: str, part: str) -> Path:
    return Path(root) / table / f"part-{part}.parquet"


def write_part(root: Path, table: str, part: str, rows: list[dict[str, Any]]) -> None:
    """Write rows as `root/table/part-<part>.parquet`, atomically, validated against the table's schema."""
    schema = TABLES[table]
    data = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    write_with(part_path(root, table, part), lambda tmp: pq.write_table(data, tmp))


def parts(root: Path, table: str) -> list[Path]:
    d = Path(root) / table
    return sorted(d.glob("part-*.parquet")) if d.exists() else []


def part_name(path: Path) -> str:
    return path.name[len("part-"): -len(".parquet")]


def readable(path: Path) -> bool:
    """Whether a part file is whole (its parquet footer reads)."""
    try:
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowInvalid, pa.ArrowException):
        return False


def read_part(path: Path, table: str) -> pa.Table:
    """One part read whole, against its table's schema: what every reader (verdicts, report) does with it."""
    return pq.read_table(path, schema=TABLES[table])


def cell_runs(root: Path) -> dict[str, dict[str, str]]:
    """{part: {run_id: status}} of every cell written whole: a readable runs part, with its steps and tokens parts
    present (a cell writes all three, runs last). Run `set_aside_damaged` first: it reads every part whole."""
    out: dict[str, dict[str, str]] = {}
    for f in parts(root, "runs"):
        name = part_name(f)
        try:
            rows = pq.read_table(f, columns=["run_id", "status"]).to_pylist()
        except (OSError, pa.ArrowInvalid, pa.ArrowException):
            continue
        if all(part_path(root, t, name).exists() for t in ("steps", "tokens")):
            out[name] = {r["run_id"]: r["status"] for r in rows}
    return out


def done_parts(root: Path) -> set[str]:
    """Parts whose cell is finished: every run succeeded. A cell with a failed run, or a damaged one, runs again."""
    return {name for name, runs in cell_runs(root).items() if runs and all(s == "ok" for s in runs.values())}


def has_measurements(root: Path) -> bool:
    """Whether any cell has a run that succeeded (a directory worth keeping)."""
    return any(s == "ok" for runs in cell_runs(root).values() for s in runs.values())


def _aside(root: Path, where: str, table: str, src: Path) -> Path:
    """Move a part out of its table to `<root>/<where>/<table>/` (never overwriting an earlier one there)."""
    dest = Path(root) / where / table / src.name
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{src.stem}.{n}{src.suffix}")
        n += 1
    move(src, dest)
    return dest


def set_aside_damaged(root: Path) -> list[str]:
    """Read every part whole, as the later steps (verdicts, report) will; move each that does not read to
    `damaged/<table>/` (kept, never deleted, never read) and return one line per part saying so. Its cell is then
    missing a part, so the resume runs it again (a damaged verdicts part is recomputed)."""
    notes = []
    for table in TABLES:
        for f in parts(root, table):
            try:
                read_part(f, table)
            except (OSError, pa.ArrowInvalid, pa.ArrowException) as e:
                dest = _aside(root, DAMAGED, table, f)
                then = "recomputed" if table == "verdicts" else "its cell runs again"
                notes.append(f"{f}: damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); moved to "
                             f"{dest}, {then}")
    return notes


def kept_rows(root: Path, part: str, rerun: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Rows of a cell's runs that succeeded and are not being measured again (a rerun of only its failed runs),
    per table, from its current parts; empty lists when there is no such run."""
    f = part_path(root, "runs", part)
    try:
        runs = read_part(f, "runs").to_pylist() if f.exists() else []
    except (OSError, pa.ArrowInvalid, pa.ArrowException):
        runs = []
    keep = {r["run_id"] for r in runs if r["status"] == "ok" and r["run_id"] not in rerun}
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in CELL_TABLES}
    if not keep:
        return out
    out["runs"] = [r for r in runs if r["run_id"] in keep]
    for table in ("steps", "tokens"):
        rows = read_part(part_path(root, table, part), table).to_pylist()
        out[table] = [r for r in rows if r["run_id"] in keep]
    return out


@dataclass
class Damage:
    """Part files a reader could not read, each with a one-line reason (shown by the report, never fatal)."""

    parts: list[str] = field(default_factory=list)

    def note(self, path: Path, err: Exception) -> None:
        self.parts.append(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def read_table(root: Path | str, table: str, damage: Damage | None = None) -> pd.DataFrame:
    """All readable parts of one table as a DataFrame (empty with the right columns when there are none).

    A damaged part is skipped and noted in `damage` (without one, it raises one UserError line naming it)."""
    root = Path(root)
    frames = []
    version = _version(root)
    for f in parts(root, table):
        try:
            frames.append(_upgrade(read_part(f, table), table, version))
        except (OSError, pa.ArrowInvalid, pa.ArrowException) as e:
            if damage is None:
                raise UserError(f"{f}: damaged results part ({str(e).splitlines()[0]}); move it away or rerun the "
                                f"sweep, which reruns its cell") from None
            damage.note(f, e)
    if not frames:
        return TABLES[table].empty_table().to_pandas()
    return pa.concat_tables(frames).to_pandas()


def _upgrade(t: pa.Table, table: str, version: int) -> pa.Table:
    """Rows of an older schema in today's form: columns it lacked get their axis's legacy value; schema 1 folded
    the KV-cache bits into the policy label (`as-is+kv8`), which is split back out here, and named a model by its
    path (kept in `model_path`), shortened here to the directory name as today's rows have it."""
    if version >= SCHEMA_VERSION:
        return t
    for axis in AXES:
        if axis.column in t.column_names and axis.legacy is not None and t[axis.column].null_count == len(t):
            t = t.set_column(t.column_names.index(axis.column), axis.column,
                             pa.array([axis.legacy] * len(t), type=t.schema.field(axis.column).type))
    if version == 1 and "model" in t.column_names:  # schema 1 named models by path; today by a short name
        short = [Path(m).name if m and m.startswith(("/", "~", ".")) else m for m in t["model"].to_pylist()]
        t = t.set_column(t.column_names.index("model"), "model", pa.array(short, type=pa.string()))
    if version == 1 and "policy" in t.column_names and "kv_bits" in t.column_names:
        policy = [re.sub(r"\+kv\d+(g\d+)?$", "", p) if p else p for p in t["policy"].to_pylist()]
        t = t.set_column(t.column_names.index("policy"), "policy", pa.array(policy, type=pa.string()))
    return t


# ------------------------------------------------------------------------------------------------- manifest


def read_manifest(root: Path | str) -> dict[str, Any]:
    f = Path(root) / MANIFEST
    if not f.exists():
        raise UserError(f"{root}: not a results directory (no {MANIFEST})")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{f}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{root}: written with results schema {version!r}; this mtpbench reads schema "
                        f"{SCHEMA_VERSION} and older: upgrade mtpbench")
    return manifest


def _version(root: Path) -> int:
    try:
        return int(read_manifest(root).get("schema_version", SCHEMA_VERSION))
    except UserError:
        return SCHEMA_VERSION


def read_results(roots: list[Path | str], damage: Damage | None = None) -> dict[str, pd.DataFrame]:
    """Merge several results directories (machines, policies, checkpoints) into one set of tables; older schema
    versions are converted as they are read, never merged as they are."""
    out: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for root in roots:
        read_manifest(root)
        for t in TABLES:
            out[t].append(read_table(root, t, damage))
    return {t: pd.concat(frames, ignore_index=True) if frames else TABLES[t].empty_table().to_pandas()
            for t, frames in out.items()}


# ------------------------------------------------------------------------------------- owning a directory


@dataclass(frozen=True)
class Created:
    """What opening a new results directory made: the directory (whose mtpbench files are ours) and every
    directory the call created, deepest first (none when it already existed, empty)."""

    root: Path
    dirs: tuple[Path, ...]


class Lock:
    """An exclusive OS lock on a results directory for one run (fcntl.flock on `<dir>/.lock`, holder's PID in it)."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            for _ in range(50):  # the holder writes its PID just after locking: give it that moment
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.01)
            os.close(fd)
            holder = holder or "?"
            raise UserError(f"{self.path.parent} is in use by another mtpbench (PID {holder}); wait for it to "
                            f"finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _ours(entry: Path) -> bool:
    """mtpbench's own file in a directory with no manifest yet: the lock, or a manifest being written (a second
    process starting on the same new directory sees these, and is then refused by the lock, naming the holder)."""
    return entry.name == LOCK or (entry.name.startswith(TEMP_PREFIX) and entry.is_file())


def _check_resumable(out: Path, manifest: dict[str, Any]) -> None:
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{out} was written with results schema {manifest['schema_version']}; it can be "
                        f"reported (`mtpbench report`) but not resumed: use another --out")


def open_results_dir(out: Path, make_manifest) -> tuple[Lock, Created | None, dict[str, Any]]:
    """Lock `out` for this run and return (lock, what was created or None on a resume, the manifest).

    `make_manifest()` gives the manifest of a new directory. A directory holding anything but mtpbench's own
    files is refused (think `-o .` or `-o ~`); so is one another process holds, or one of an older schema."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose another --out")
    if (out / MANIFEST).exists():
        _check_resumable(out, read_manifest(out))  # before the lock: a refused directory gets no new file
    if out.is_dir() and not (out / MANIFEST).exists() and any(not _ours(e) for e in out.iterdir()):
        raise UserError(f"{out} is a non-empty directory that is not an mtpbench results directory (no "
                        f"{MANIFEST}); choose another --out")
    dirs, p = [], out
    while not p.exists():
        dirs.append(p)
        p = p.parent
    created = Created(out, tuple(dirs))
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = Lock(out)
        lock.acquire()
    except OSError as e:
        _remove_dirs(created)
        raise UserError(f"cannot write results to {out}: {e.strerror}") from None
    except UserError:  # another process holds it: its files are its own, not ours to remove
        _remove_dirs(created)
        raise
    try:
        if (out / MANIFEST).exists():
            manifest = read_manifest(out)
            _check_resumable(out, manifest)
            remove_temporaries(out)
            return lock, None, manifest
        if any(not _ours(e) for e in out.iterdir()):  # filled between the check and the lock
            raise UserError(f"{out} is a non-empty directory that is not an mtpbench results directory; choose "
                            f"another --out")
        manifest = make_manifest()
        write_json(out / MANIFEST, manifest)
        return lock, created, manifest
    except BaseException:
        lock.release()
        if not (out / MANIFEST).exists():
            remove_created(created)
        raise


def remove_created(created: Created) -> None:
    """Undo a new directory after a run that measured nothing: mtpbench's own files in it (manifest, lock, parts,
    temporaries), then the directories the run created, each only while empty (rmdir, never a recursive delete:
    a file someone else put there meanwhile stays, and so does its directory)."""
    out = created.root
    for name in (MANIFEST, LOCK, *TABLES):
        f = out / name
        if f.is_file():
            f.unlink(missing_ok=True)
        elif f.is_dir():
            for ours in (*f.glob(TEMP_PREFIX + "*"), *f.glob("part-*.parquet")):
                ours.unlink(missing_ok=True)
            _rmdir_if_empty(f)
    _remove_dirs(created)


def _remove_dirs(created: Created) -> None:
    """The directories a run created, deepest first, each only while empty."""
    for d in created.dirs:
        if not _rmdir_if_empty(d):
            break


def remove_temporaries(root: Path) -> None:
    """Temporary files a killed run left (`.tmp-*` beside the manifest and in the table directories): ours by
    name and place, half-written, never read. Called with the lock held, so no live writer owns one."""
    for d in (root, *(root / t for t in TABLES)):
        for f in d.glob(TEMP_PREFIX + "*") if d.is_dir() else ():
            if f.is_file():
                f.unlink(missing_ok=True)


def _rmdir_if_empty(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except OSError:
        return False


def supersede(root: Path, part: str) -> None:
    """Move one cell's parts out of the tables (to `superseded/<table>/`): kept on disk, never read again."""
    for table in TABLES:
        src = part_path(root, table, part)
        if src.exists():
            _aside(root, SUPERSEDED, table, src)


def update_manifest(root: Path, change) -> dict[str, Any]:
    """Read, change (in place, by `change(manifest)`) and rewrite the manifest atomically; returns it."""
    manifest = read_manifest(root)
    change(manifest)
    write_json(Path(root) / MANIFEST, manifest)
    return manifest


__all__ = ["CELL_TABLES", "Created", "DAMAGED", "Damage", "LOCK", "Lock", "MANIFEST", "RUNS", "SCHEMA_VERSION",
           "STEPS", "TABLES", "TOKENS", "VERDICTS", "cell_runs", "done_parts", "has_measurements", "kept_rows",
           "open_results_dir", "part_path", "parts", "read_manifest", "read_part", "read_results", "read_table",
           "remove_created", "remove_temporaries", "set_aside_damaged", "supersede", "update_manifest", "write_json",
           "write_part"]
