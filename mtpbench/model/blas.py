"""Use OpenBLAS under mlx on Linux when it is installed, and say which BLAS a run used.

mlx's Linux CPU wheel links the slow reference BLAS. Preloading an OpenBLAS (PyPI's cmeel-openblas, a dependency
on Linux x86_64, or Debian's libopenblas0-pthread) gives identical results several times faster. A library can only
be preloaded before the process starts, so the CLI re-executes itself once with LD_PRELOAD set (`--blas reference`
keeps the bundled one, for comparisons).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_MARK = "MTPBENCH_BLAS_CHOSEN"  # set only on the re-executed child, so it never loops


def openblas_library() -> Path | None:
    candidates = []
    try:
        import cmeel  # noqa: F401

        candidates.append(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                          / "site-packages" / "cmeel.prefix" / "lib" / "libopenblas.so.0")
        import site

        candidates += [Path(p) / "cmeel.prefix" / "lib" / "libopenblas.so.0" for p in site.getsitepackages()]
    except ImportError:
        pass
    candidates += [Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"), Path("/usr/lib/aarch64-linux-gnu/libopenblas.so.0")]
    return next((c for c in candidates if c.exists()), None)


def _gfortran_dir(lib: Path) -> Path | None:
    """cmeel's OpenBLAS needs libgfortran.so.5; mlx's wheel ships one under a hashed name. Link it by its soname."""
    import importlib.util

    spec = importlib.util.find_spec("mlx.core")  # locates the wheel without loading its libraries
    if spec is None or spec.origin is None:
        return None
    libs = Path(spec.origin).parent.parent / "mlx_cpu.libs"
    gfortran = sorted(libs.glob("libgfortran*.so*"))
    if not gfortran:
        return None
    out = Path.home() / ".cache" / "mtpbench" / "blaslib"
    out.mkdir(parents=True, exist_ok=True)
    for src in libs.glob("*.so*"):
        link = out / src.name
        if not link.exists():
            link.symlink_to(src)
    link = out / "libgfortran.so.5"
    if not link.exists():
        link.symlink_to(gfortran[0])
    return out


def active_blas() -> str:
    """Which BLAS this process has mapped: 'openblas', 'reference', 'accelerate' (macOS) or 'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    if "libopenblas" in maps:
        return "openblas"
    return "reference" if "libblas" in maps else "unknown"


def env_without_openblas() -> dict[str, str]:
    """This process's environment minus the OpenBLAS preload, marked so a child `mtpbench` never re-executes itself
    with it: what a child needs to run on mlx's bundled reference BLAS (a loaded library cannot be unloaded)."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in env.get("LD_PRELOAD", "").split(":") if x and "openblas" not in x)
    env[_MARK] = "1"
    return env


def reexec_with_openblas(choice: str) -> None:
    """Re-execute the current command with OpenBLAS preloaded (Linux, `choice == 'openblas'`, not yet done)."""
    if choice != "openblas" or not sys.platform.startswith("linux") or os.environ.get(_MARK):
        return
    lib = openblas_library()
    if lib is None or "libopenblas" in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    if "cmeel.prefix" in str(lib):
        extra = _gfortran_dir(lib)
        if extra is None:
            return
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(extra), env.get("LD_LIBRARY_PATH", "")]))
    env["LD_PRELOAD"] = ":".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    env[_MARK] = "1"
    # OpenBLAS worker threads spin after each small matmul and take the core mlx needs: one thread was measured
    # 3x faster on multi-token verify forwards (a user's explicit setting wins).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.execve(sys.executable, [sys.executable, "-m", "mtpbench", *sys.argv[1:]], env)
