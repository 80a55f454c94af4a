"""Use OpenBLAS under mlx on Linux when one runs on this CPU, and say which BLAS a run used.

mlx's Linux CPU wheel links the slow reference BLAS. Preloading an OpenBLAS gives identical results several times
faster. A library can only be preloaded before the process starts, so the CLI re-executes itself once with
LD_PRELOAD set (`--blas reference` keeps the bundled one, for comparisons).

A preloaded library built for one CPU kills the process on another: PyPI's cmeel-openblas is built for SkylakeX
only and dies with SIGILL where there is no AVX-512 (AMD Zen 3, older Intel). So before preloading a library, a
child process loads it and multiplies with mlx on the CPU (`probe`); only a library whose child exits cleanly with
the right product is preloaded. A portable build (DYNAMIC_ARCH: Debian's libopenblas0-pthread picks its kernels at
load time) is tried before the one-CPU build, which is only used where no portable one is installed. When every candidate fails, the command runs on mlx's bundled BLAS,
says so in one line on stderr, and every row's `blas` says why (`reference (openblas probe failed: SIGILL)`). The
verdict is cached per (library file, CPU model and flags, mlx build) under ~/.cache/mtpbench, so the probe costs
one child process once per machine and library.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

_MARK = "MTPBENCH_BLAS_CHOSEN"  # set only on the re-executed child, so it never loops
PROBE_VERSION = 1  # bump when the probe's check changes: cached verdicts of older probes are not reused
PROBE_TIMEOUT_S = 120.0
_ARCHES = ("x86_64-linux-gnu", "aarch64-linux-gnu")

# What the child runs: load mlx (its BLAS calls resolve to the preloaded library), multiply a matrix and a vector
# of small integers on the CPU (exact in float32), compare with Python's own product, and check the library was
# really mapped (ld.so only warns about a preload it cannot load, and runs on without it).
PROBE_CODE = r"""
import os, sys
lib = os.path.realpath(sys.argv[1])
import mlx.core as mx
mx.set_default_device(mx.cpu)
n, m, p = 24, 40, 16
a = [[float((3 * i + 5 * j) % 7 - 3) for j in range(m)] for i in range(n)]
b = [[float((2 * i + 7 * j) % 5 - 2) for j in range(p)] for i in range(m)]
want = [[sum(a[i][k] * b[k][j] for k in range(m)) for j in range(p)] for i in range(n)]
got = (mx.array(a) @ mx.array(b)).tolist()
got_row = (mx.array(a[:1]) @ mx.array(b)).tolist()
if lib not in open("/proc/self/maps").read():
    print("the library was not loaded (ld.so ignored the preload)")
    sys.exit(3)
if got != want or got_row != want[:1]:
    print("wrong matrix product")
    sys.exit(4)
print("ok")
"""

_fallback = ""  # why this process runs on the reference BLAS though OpenBLAS was asked for ("" : it was not)


@dataclass(frozen=True)
class Candidate:
    """An OpenBLAS to preload: its file, a short name, and directories its own dependencies need on the path."""

    path: Path
    name: str
    library_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    """A candidate's check in a child process: whether it loads and multiplies right here, and if not, why."""

    ok: bool
    reason: str = ""  # "SIGILL: ...", "exit 3: the library was not loaded ...", "timed out after 120 s"
    seconds: float = 0.0  # the child's wall time (what the first run pays per candidate)
    cached: bool = False


def _cmeel_library() -> Path | None:
    """cmeel-openblas's library, found by path (importing `cmeel` loads its build tooling: most of a second)."""
    import site

    roots = [Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages",
             *(Path(p) for p in site.getsitepackages()), Path(site.getusersitepackages())]
    return next((r / "cmeel.prefix" / "lib" / "libopenblas.so.0" for r in roots
                 if (r / "cmeel.prefix" / "lib" / "libopenblas.so.0").exists()), None)


def candidates() -> list[Candidate]:
    """OpenBLAS builds found here, best first: Debian's DYNAMIC_ARCH pthread build (runs on any CPU of its
    architecture, picks the kernels for this one at load time), then the system's default libopenblas, then
    PyPI's cmeel-openblas (one CPU's build: fast where it runs, SIGILL elsewhere)."""
    out: list[Candidate] = []
    seen: set[str] = set()

    def add(path: Path, name: str, library_path: tuple[str, ...] = ()) -> None:
        real = os.path.realpath(path)
        if path.exists() and real not in seen:
            seen.add(real)
            out.append(Candidate(path, name, library_path))

    for arch in _ARCHES:
        add(Path(f"/usr/lib/{arch}/openblas-pthread/libopenblas.so.0"), "debian openblas-pthread")
    for arch in _ARCHES:
        add(Path(f"/usr/lib/{arch}/libopenblas.so.0"), "system openblas")
    cmeel = _cmeel_library()
    if cmeel is not None:
        extra = _gfortran_dir()
        if extra is not None:
            add(cmeel, "cmeel-openblas", (str(extra),))
    return out


def _gfortran_dir() -> Path | None:
    """cmeel's OpenBLAS needs libgfortran.so.5; mlx's wheel ships one under a hashed name. Link it by its soname."""
    import importlib.util

    spec = importlib.util.find_spec("mlx.core")  # locates the wheel without loading its libraries
    if spec is None or spec.origin is None:
        return None
    libs = Path(spec.origin).parent.parent / "mlx_cpu.libs"
    gfortran = sorted(libs.glob("libgfortran*.so*"))
    if not gfortran:
        return None
    out = cache_dir() / "blaslib"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for src in libs.glob("*.so*"):
            link = out / src.name
            if not link.exists():
                link.symlink_to(src)
        link = out / "libgfortran.so.5"
        if not link.exists():
            link.symlink_to(gfortran[0])
    except OSError:
        return None
    return out


def cache_dir() -> Path:
    return Path.home() / ".cache" / "mtpbench"


def preload_env(c: Candidate, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that preloads `c` (one OpenBLAS thread unless the user set another count: its worker threads
    spin after each small matmul and take the core mlx needs, measured 3x slower on multi-token verify forwards)."""
    env = dict(os.environ if base is None else base)
    if c.library_path:
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [*c.library_path, env.get("LD_LIBRARY_PATH", "")]))
    env["LD_PRELOAD"] = ":".join(filter(None, [str(c.path), env.get("LD_PRELOAD", "")]))
    env[_MARK] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def probe_command(c: Candidate) -> list[str]:
    return [sys.executable, "-c", PROBE_CODE, str(c.path)]


def _why(rc: int, out: str) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"{name}: built for instructions this CPU lacks" if name == "SIGILL" else name
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return f"exit {rc}" + (f": {last[:160]}" if last else "")


def probe(c: Candidate, command: Sequence[str] | None = None, timeout_s: float | None = None) -> Probe:
    """Load `c` in a child process and multiply with mlx on the CPU; a child that dies (SIGILL...), fails, prints
    a wrong product or never maps the library is a failed probe. `command` replaces the child's (tests)."""
    timeout_s = timeout_s or PROBE_TIMEOUT_S
    t0 = time.perf_counter()
    try:
        done = subprocess.run(list(command or probe_command(c)), env=preload_env(c), capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Probe(False, f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0)
    except OSError as e:
        return Probe(False, f"could not start ({e.strerror or e})", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    ok = done.returncode == 0 and done.stdout.strip().endswith("ok")
    return Probe(ok, "" if ok else _why(done.returncode, done.stdout if done.stdout.strip() else done.stderr), seconds)


def probe_key(c: Candidate) -> str:
    """What decides a probe's verdict: the library file (real path, size, mtime), the CPU (model and flags), mlx's
    core library (size, mtime) and the probe's own version."""
    from ..machine import cpu_flags, cpu_model

    import importlib.util

    real = Path(os.path.realpath(c.path))
    st = real.stat()
    spec = importlib.util.find_spec("mlx.core")  # mlx's own library, by file (cheaper than its package metadata)
    core = Path(spec.origin).stat() if spec is not None and spec.origin else None
    ident = {"library": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "cpu": cpu_model(),
             "flags": hashlib.sha1(cpu_flags().encode()).hexdigest(), "probe": PROBE_VERSION,
             "mlx": [core.st_size, core.st_mtime_ns] if core else None}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _cache_file() -> Path:
    return cache_dir() / "blas-probe.json"


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_probe(c: Candidate, command: Sequence[str] | None = None) -> Probe:
    """`probe(c)`, read from the cache when this library was already checked on this CPU; a new verdict is written
    atomically (a cache that cannot be written only costs the probe again next time)."""
    from ..atomic import write_json
    from ..errors import UserError

    key = probe_key(c)
    hit = _read_cache().get(key)
    if isinstance(hit, dict) and isinstance(hit.get("ok"), bool):
        return Probe(hit["ok"], str(hit.get("reason", "")), float(hit.get("seconds", 0.0)), cached=True)
    result = probe(c, command)
    if result.reason.startswith(("timed out", "could not start")):
        return result  # a verdict about this moment, not about the library: probe again next time
    entries = _read_cache()
    entries[key] = {**asdict(result), "cached": None, "library": str(c.path), "name": c.name}
    try:
        write_json(_cache_file(), entries)
    except (UserError, OSError):
        pass
    return result


def choose(found: Sequence[Candidate], command: Sequence[str] | None = None) -> tuple[Candidate | None,
                                                                                   list[tuple[Candidate, Probe]]]:
    """The first candidate (the most portable) whose probe passes, None if none does, and the failed probes before
    it. Portable first, also where a one-CPU build runs: the same machine type then always gets the same BLAS, and
    Debian's DYNAMIC_ARCH 0.3.21 picks AVX-512 kernels where they exist (on an AVX-512 EPYC, as fast as PyPI's
    SkylakeX 0.3.31 on decode-shaped products, 1.2-1.3x slower on 64-row ones: README, Performance notes)."""
    failed: list[tuple[Candidate, Probe]] = []
    for c in found:
        p = cached_probe(c, command)
        if p.ok:
            return c, failed
        failed.append((c, p))
    return None, failed


def active_blas() -> str:
    """Which BLAS this process has mapped: 'openblas', 'reference' (with why, when OpenBLAS was asked for but
    failed its probe), 'accelerate' (macOS) or 'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    if "libopenblas" in maps:
        return "openblas"
    reference = "reference" if "libblas" in maps or _fallback else "unknown"
    return f"{reference} ({_fallback})" if _fallback else reference


def env_without_openblas() -> dict[str, str]:
    """This process's environment minus the OpenBLAS preload, marked so a child `mtpbench` never re-executes itself
    with it: what a child needs to run on mlx's bundled reference BLAS (a loaded library cannot be unloaded)."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in env.get("LD_PRELOAD", "").split(":") if x and "openblas" not in x)
    env[_MARK] = "1"
    return env


def reexec_with_openblas(choice: str, command: Sequence[str] | None = None) -> None:
    """Re-execute the current command with the first OpenBLAS that passes its probe preloaded (Linux, `choice ==
    'openblas'`, not yet done). When none passes, return: the command runs on mlx's bundled BLAS, after one line
    on stderr saying so (and every row's `blas` says why). `command` replaces the probe's child (tests)."""
    global _fallback
    if choice != "openblas" or not sys.platform.startswith("linux") or os.environ.get(_MARK):
        return
    if "libopenblas" in os.environ.get("LD_PRELOAD", ""):
        return  # the user preloaded one themselves
    found = candidates()
    if not found:
        return
    chosen, failed = choose(found, command)
    if chosen is None:
        _fallback = "openblas probe failed: " + ", ".join(dict.fromkeys(p.reason.split(":")[0] for _, p in failed))
        what = "; ".join(f"{c.name} at {c.path}: {p.reason}" for c, p in failed)
        print(f"mtpbench: OpenBLAS failed its check in a child process ({what}); running on mlx's bundled "
              f"reference BLAS (same results, slower)", file=sys.stderr)
        return
    os.execve(sys.executable, [sys.executable, "-m", "mtpbench", *sys.argv[1:]], preload_env(chosen))
