"""The BLAS preload never crashes a command: a library whose probe child dies (SIGILL on a CPU it was not built for)
or never loads is skipped, the command runs on mlx's bundled BLAS, says so on stderr and in every row; verdicts are
cached per library and CPU. Nothing here depends on this machine's CPU flags: the crash is injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtpbench.model import blas

SIGILL = ["sh", "-c", "kill -ILL $$"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh home: an empty probe cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_library(tmp_path: Path, name: str = "libopenblas.so.0", content: bytes = b"not an ELF file") -> Path:
    d = tmp_path / name.replace(".", "_")
    d.mkdir(parents=True, exist_ok=True)
    lib = d / name
    if not lib.exists():  # written once: a rewrite would be a new library to the probe cache
        lib.write_bytes(content)
    return lib


def test_a_probe_child_killed_by_sigill_is_a_failed_probe(tmp_path):
    c = blas.Candidate(_fake_library(tmp_path), "fake")
    p = blas.probe(c, SIGILL)
    assert not p.ok and p.reason.startswith("SIGILL"), p
    assert "instructions this CPU lacks" in p.reason


def test_a_preload_that_does_not_load_fails_the_real_probe(tmp_path):
    """ld.so only warns about a preload it cannot load and runs on: the probe checks the library was mapped."""
    c = blas.Candidate(_fake_library(tmp_path), "fake")
    p = blas.probe(c)
    assert not p.ok and "not loaded" in p.reason, p


def test_the_probe_passes_a_child_that_multiplies(tmp_path):
    c = blas.Candidate(_fake_library(tmp_path), "fake")
    assert blas.probe(c, ["sh", "-c", "echo ok"]).ok
    assert blas.probe(c, ["sh", "-c", "echo ok; exit 2"]).reason == "exit 2: ok"


def test_the_verdict_is_cached_per_library_and_cpu(tmp_path, home):
    lib = _fake_library(tmp_path)
    c = blas.Candidate(lib, "fake")
    counter = tmp_path / "calls"
    command = ["sh", "-c", f"echo x >> {counter}; kill -ILL $$"]
    first = blas.cached_probe(c, command)
    again = blas.cached_probe(c, command)
    assert not first.ok and not first.cached and again.cached and again.reason == first.reason
    assert counter.read_text().count("x") == 1  # the second verdict cost no child
    stored = json.loads((home / ".cache" / "mtpbench" / "blas-probe.json").read_text())
    assert [e["library"] for e in stored.values()] == [str(lib)]
    lib.write_bytes(b"a rebuilt library")  # another size and mtime: a new verdict
    assert not blas.cached_probe(c, command).cached
    assert counter.read_text().count("x") == 2
    assert len(json.loads((home / ".cache" / "mtpbench" / "blas-probe.json").read_text())) == 2


def test_the_cache_key_names_the_cpu(tmp_path, monkeypatch):
    import mtpbench.machine as machine

    c = blas.Candidate(_fake_library(tmp_path), "fake")
    here = blas.probe_key(c)
    monkeypatch.setattr(machine, "cpu_flags", lambda: "fpu sse sse2 avx avx2")
    assert blas.probe_key(c) != here


def test_a_timed_out_probe_is_not_cached(tmp_path, home, monkeypatch):
    """A child that hangs says something about this moment (a loaded machine), not about the library."""
    monkeypatch.setattr(blas, "PROBE_TIMEOUT_S", 0.2)
    c = blas.Candidate(_fake_library(tmp_path), "fake")
    p = blas.cached_probe(c, ["sleep", "5"])
    assert not p.ok and p.reason.startswith("timed out")
    assert not (home / ".cache" / "mtpbench" / "blas-probe.json").exists()


def test_the_first_portable_candidate_that_passes_is_chosen(tmp_path, home):
    bad = blas.Candidate(_fake_library(tmp_path, "libopenblas.so.0"), "one-cpu build")
    good = blas.Candidate(_fake_library(tmp_path / "other", "libopenblas.so.0", b"another"), "portable")
    command = ["sh", "-c", f'case "$LD_PRELOAD" in {bad.path}*) kill -ILL $$;; *) echo ok;; esac']
    chosen, failed = blas.choose([bad, good], command)
    assert chosen == good and [c for c, _ in failed] == [bad]
    chosen, failed = blas.choose([good, bad], command)
    assert chosen == good and failed == []
    assert blas.choose([bad], command)[0] is None


def test_the_preload_environment(tmp_path):
    c = blas.Candidate(Path("/x/libopenblas.so.0"), "x", ("/deps",))
    env = blas.preload_env(c, {"LD_PRELOAD": "/other.so", "LD_LIBRARY_PATH": "/lib"})
    assert env["LD_PRELOAD"] == "/x/libopenblas.so.0:/other.so" and env["LD_LIBRARY_PATH"] == "/deps:/lib"
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env[blas._MARK] == "1"
    assert blas.preload_env(c, {"OPENBLAS_NUM_THREADS": "4"})["OPENBLAS_NUM_THREADS"] == "4"


# The command a user runs, with the one OpenBLAS found here replaced by a library whose probe child dies with
# SIGILL (what cmeel-openblas's SkylakeX build does on a CPU without AVX-512).
CRASHING_PRELOAD = """
import sys
from pathlib import Path
from mtpbench.model import blas
lib = Path(sys.argv[1])
blas.candidates = lambda: [blas.Candidate(lib, "cmeel-openblas")]
blas.probe_command = lambda c: ["sh", "-c", "kill -ILL $$"]
sys.argv = ["mtpbench", *sys.argv[2:]]
from mtpbench.cli.main import entry
entry()
"""


def _run_crashing(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (blas._MARK, "LD_PRELOAD")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    lib = _fake_library(tmp_path)
    return subprocess.run([sys.executable, "-c", CRASHING_PRELOAD, str(lib), *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)


def test_help_runs_when_the_preload_would_crash(tmp_path):
    done = _run_crashing(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "Benchmark and verify" in done.stdout
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "SIGILL" in lines[0] and "reference BLAS" in lines[0], done.stderr


def test_a_sweep_runs_on_the_reference_blas_and_every_row_says_why(tmp_path, tiny_agree):
    from mtpbench.sweep.store import read_table

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    out = tmp_path / "results"
    done = _run_crashing(tmp_path, "sweep", "-m", str(tiny_agree), "--k", "1", "--temp", "0", "--prompts",
                         str(prompts), "--repeats", "1", "--max-tokens", "6", "--out", str(out), "--no-report")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SIGILL" in done.stderr and "reference BLAS" in done.stderr
    runs: pd.DataFrame = read_table(out, "runs")
    assert len(runs) == 2 and (runs["status"] == "ok").all()
    assert set(runs["blas"]) == {"reference (openblas probe failed: SIGILL)"}
    # a second command: the verdict comes from the cache (the same line, no second child)
    again = _run_crashing(tmp_path, "--help")
    assert again.returncode == 0 and "SIGILL" in again.stderr
    cache = json.loads((tmp_path / "home" / ".cache" / "mtpbench" / "blas-probe.json").read_text())
    assert len(cache) == 1 and not next(iter(cache.values()))["ok"]


def test_blas_reference_never_probes(tmp_path):
    done = _run_crashing(tmp_path, "--blas", "reference", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert not (tmp_path / "home" / ".cache" / "mtpbench" / "blas-probe.json").exists()
