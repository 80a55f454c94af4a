"""Where and with what a number was measured: every row and manifest carries this."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .machine import cores, cpu_model
from .model.blas import active_blas


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        try:
            return f"gpu: {mx.device_info().get('device_name', 'gpu')}"
        except (AttributeError, RuntimeError):
            return "gpu"
    n, usable = cores()
    # Affinity changes small-model speed a lot (host and CPU-stream threads hand off at every eval): say it.
    return f"cpu: {cpu_model()} ({n} cores{f', pinned to {usable}' if usable != n else ''})"


def _prefill_step() -> int:
    from .model.trunk import PREFILL_STEP

    return PREFILL_STEP


@lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    return {
        "mtpbench_version": _version("mtpbench"),
        "mlx_version": _version("mlx"),
        "mlx_lm_version": _version("mlx-lm"),
        "git_sha": _git_sha(),
        "host": platform.node(),
        "device": _device(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "blas": active_blas(),
        "prefill_step": str(_prefill_step()),  # prompt tokens per prefill forward (mlx_lm's prefill step)
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
