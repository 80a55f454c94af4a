"""The Ray executor: same rows as the local executor, a worker killed mid-group is retried without losing or
duplicating a cell, and a clear one-line error when Ray is not installed.

One local Ray instance (2 CPUs) serves the module: run_ray uses a Ray already initialised in the process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mtpbench.backends.reference import ReferenceBackend
from mtpbench.errors import UserError
from mtpbench.orchestrate import ray_executor
from mtpbench.orchestrate import sweep
from mtpbench.orchestrate.execute import RunEvent, SweepOutcome, Writer, execute_local
from mtpbench.sweep.spec import Cell, SweepSpec, plan
from mtpbench.sweep.store import done_parts, open_results_dir
from mtpbench.sweep.prompts import load_sets
from mtpbench.sweep.store import read_manifest, read_table


def _prompt_file(tmp_path: Path, n: int = 2) -> Path:
    f = tmp_path / "mini.jsonl"
    rows = [{"id": f"p{i}", "category": "code" if i % 2 else "chat", "prompt": f"def f{i}(x):\n    return x +"}
            for i in range(n)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _setup(tmp_path: Path, model: Path, **kw) -> tuple[SweepSpec, list[Cell]]:
    prompts = _prompt_file(tmp_path)
    values = {"model": str(model), "prompts": str(prompts), "k": "1,2", "temperature": "0,0.7", "repeats": 2,
              "max_tokens": 16, **kw}
    spec = SweepSpec.of(**values)
    return spec, plan(spec, load_sets(list(spec.prompts)))


def _fresh(tmp_path: Path, name: str, spec: SweepSpec) -> Path:
    out = tmp_path / name
    lock, _, _ = open_results_dir(out, lambda: sweep.new_manifest(out, spec, "test"))
    lock.release()
    return out


def _execute(spec: SweepSpec, out: Path, cells: list[Cell], progress=None, ray: bool = True, model: str | None = None,
             **ray_options) -> SweepOutcome:
    """What `run_sweep` does after opening the directory: schedule the missing cells on the reference backends and
    run them (on Ray, or locally), verdicts included. `model` swaps the backend's checkpoint (cells unchanged)."""
    backends = sweep.build_backends(spec, out.name, lambda _line: None)
    work = sweep.schedule(backends, cells)
    if model is not None:
        work = [(ReferenceBackend(spec, model, b.policy, "moved", out.name), c) for b, c in work]
    done = done_parts(out)
    todo = [(b, c) for b, c in work if b.part(c) not in done]
    outcome = SweepOutcome(out, len(work), 0, len(work) - len(todo))
    writer = Writer(out, outcome, progress, sum(b.runs_in(c) for b, c in todo))
    if ray:
        ray_executor.run_ray(spec, todo, writer, **ray_options)
    else:
        execute_local(todo, writer)
    sweep.write_verdicts(out)
    return outcome


@pytest.fixture(scope="module")
def ray_local():
    import ray  # the test extra installs it: a missing or broken Ray fails here, never skips

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_and_ray(tmp_path_factory, tiny_agree, ray_local):
    """The same sweep (two policies, so two groups run side by side) by the local executor and by run_ray."""
    tmp = tmp_path_factory.mktemp("ray-parity")
    spec, cells = _setup(tmp, tiny_agree, policy="as-is,q8")
    local_out, ray_out = _fresh(tmp, "local", spec), _fresh(tmp, "ray", spec)
    local = _execute(spec, local_out, cells, ray=False)
    events: list[RunEvent] = []
    remote = _execute(spec, ray_out, cells, events.append)
    return spec, cells, (local_out, local), (ray_out, remote), events


def _check_same_rows(a_out: Path, b_out: Path) -> None:
    a, b = read_table(a_out, "runs"), read_table(b_out, "runs")
    assert b["run_id"].is_unique and len(a) == len(b) and set(a["run_id"]) == set(b["run_id"])
    a, b = a.set_index("run_id"), b.set_index("run_id").loc[a["run_id"]]
    greedy = a["temperature"] == 0
    assert (a.loc[greedy, "output_hash"] == b.loc[greedy, "output_hash"]).all()
    for run_id in a.index[greedy & (a["mode"] == "mtp")]:
        assert list(a.at[run_id, "accepted_at_depth"]) == list(b.at[run_id, "accepted_at_depth"]), run_id
    assert (b["status"] == "ok").all()
    for table, key in (("steps", ["run_id", "step", "depth"]), ("tokens", ["run_id", "index"])):
        t = read_table(b_out, table)
        assert not t.duplicated(key).any() and set(t["run_id"]) <= set(b.index)
        assert len(t) == len(read_table(a_out, table)), table


def test_ray_gives_the_same_rows_as_the_local_executor(local_and_ray):
    spec, cells, (local_out, local), (ray_out, remote), events = local_and_ray
    assert remote.cells_total == local.cells_total == len(cells) == 16
    assert remote.cells_run == local.cells_run == 16 and remote.failed_runs == local.failed_runs == []
    _check_same_rows(local_out, ray_out)
    runs = read_table(ray_out, "runs")
    assert (runs[runs["mode"] == "mtp"]["accepted_tokens"] > 0).any()
    assert runs["host"].notna().all() and runs["device"].notna().all()
    # Progress: one event per run, counted across both groups, ending at the total.
    assert [e.done for e in events] == list(range(1, 16 * 3 + 1)) and {e.total for e in events} == {48}
    models = read_manifest(ray_out)["models"]
    assert set(models) == set(read_manifest(local_out)["models"]) and len(models) == 2
    assert set(read_table(ray_out, "verdicts")["test"]) == set(read_table(local_out, "verdicts")["test"])


def test_rerun_of_a_finished_ray_sweep_runs_nothing(local_and_ray):
    spec, cells, _, (ray_out, _), _ = local_and_ray
    again = _execute(spec, ray_out, cells)
    assert again.cells_skipped == len(cells) and again.cells_run == 0


def test_worker_killed_mid_group_is_retried_without_loss_or_duplicates(tmp_path, tiny_agree, ray_local,
                                                                       local_and_ray, monkeypatch, caplog):
    _, _, (local_out, _), _, _ = local_and_ray
    spec, cells = _setup(tmp_path, tiny_agree, policy="as-is,q8")
    out = _fresh(tmp_path, "killed", spec)
    marker = tmp_path / "killed-once"
    monkeypatch.setitem(ray_executor._test_hooks, "exit_after_first_cell_unless", str(marker))
    with caplog.at_level(logging.WARNING, logger=ray_executor.__name__):
        outcome = _execute(spec, out, cells, max_retries=2)
    assert marker.exists(), "the first attempt should have killed its worker"
    retries = [r.getMessage() for r in caplog.records if "retry 1/2" in r.getMessage()]
    # Exactly one attempt died (the marker makes it once), after delivering its first of 8 cells: the retry
    # runs only the 7 it lacks.
    assert len(retries) == 1 and "with its 7 remaining cell(s)" in retries[0], retries
    assert outcome.cells_run == 16 and outcome.failed_runs == []
    _check_same_rows(local_out, out)
    assert len(read_manifest(out)["models"]) == 2


def test_retries_exhausted_leave_cells_missing_for_a_rerun(tmp_path, tiny_agree, ray_local, monkeypatch):
    spec, cells = _setup(tmp_path, tiny_agree, temperature=0.0, repeats=1)
    out = _fresh(tmp_path, "exhausted", spec)
    marker = tmp_path / "killed-once"
    monkeypatch.setitem(ray_executor._test_hooks, "exit_after_first_cell_unless", str(marker))
    outcome = _execute(spec, out, cells, max_retries=0)
    assert outcome.cells_run == 1 and len(outcome.failed_runs) == 3  # the lost cell's AR, K=1 and K=2 runs
    assert "ray task failed 1 time(s)" in outcome.failed_runs[0] and "\n" not in outcome.failed_runs[0]
    assert len(read_table(out, "runs")) == 3  # only the delivered cell: the other one is missing, not "failed"
    rerun = _execute(spec, out, cells)  # the marker exists now: no more kills
    assert rerun.cells_skipped == 1 and rerun.cells_run == 1 and rerun.failed_runs == []
    assert len(read_table(out, "runs")) == 6 and read_table(out, "runs")["run_id"].is_unique


def test_a_user_error_on_a_worker_is_raised_not_retried(tmp_path, tiny_agree, ray_local):
    spec, cells = _setup(tmp_path, tiny_agree)
    out = _fresh(tmp_path, "gone", spec)
    moved = tmp_path / "not-there"  # the checkpoint is missing on the worker's machine
    with pytest.raises(UserError) as err:
        _execute(spec, out, cells, model=str(moved))
    assert "not-there" in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_cluster_address_fails_fast(tmp_path, tiny_agree):
    spec, cells = _setup(tmp_path, tiny_agree)
    out = _fresh(tmp_path, "unreachable", spec)
    with pytest.raises(UserError, match="cannot reach the Ray head at 127.0.0.1:1"):
        _execute(spec, out, cells, address="127.0.0.1:1")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        _execute(spec, out, cells, address="head-without-port")


def test_without_ray_installed_run_ray_says_how_to_install(tmp_path, tiny_agree, monkeypatch):
    spec, cells = _setup(tmp_path, tiny_agree)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError) as err:
        _execute(spec, _fresh(tmp_path, "none", spec), cells)
    assert str(err.value) == '--executor ray needs Ray: pip install -e ".[ray]"'


_CTRL_C_DRIVER = """
import sys
from pathlib import Path
import signal
from mtpbench.orchestrate.sweep import run_sweep
from mtpbench.sweep.spec import SweepSpec
signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C raises here even under a shell ignoring SIGINT
model, prompts, out = sys.argv[1:4]
spec = SweepSpec.of(model=model, prompts=prompts, k="1,2", temperature=0.0, repeats=20, max_tokens=16)
try:
    run_sweep(spec, Path(out), executor="ray", progress=lambda ev: print("run", ev.done, flush=True))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{d.name}: {cmd[:120]}")
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find leftover Ray processes")
def test_ctrl_c_cancels_tasks_keeps_finished_cells_and_shuts_down_its_own_ray(tmp_path, tiny_agree):
    """address=None: run_ray starts its own Ray; Ctrl-C (SIGINT to the process group, as a terminal sends it)."""
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "interrupted"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    script = tmp_path / "driver.py"
    script.write_text(_CTRL_C_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_agree), str(prompts), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_TMPDIR": ray_tmp})
    try:
        for line in proc.stdout:
            if line.startswith("run 4"):  # the second cell is in: tasks are running
                break
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in stdout, stderr[-2000:]
        deadline = time.time() + 15
        while _processes_mentioning(ray_tmp) and time.time() < deadline:
            time.sleep(0.2)
        assert not _processes_mentioning(ray_tmp), "the local Ray instance should be shut down"
        runs = read_table(out, "runs")
        assert 3 <= len(runs) < 40 * 3 and len(runs) % 3 == 0 and runs["run_id"].is_unique
        assert runs.groupby("cell_id").size().eq(3).all() and not list(out.rglob(".tmp-*"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
