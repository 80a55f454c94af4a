"""Orchestration: the runs that drive the lower wings for one command. `sweep` (plan the cells, open the results
directory, drive every backend on an executor: `execute` locally, `ray_executor` on Ray, then the sweep's
verdicts), `verify` (the distribution-preservation run) and `generation` (`mtpbench generate`'s samples).

It sits above backends and stats, so nothing below imports it. Lazy (PEP 562): importing this package loads
nothing; `run_sweep`, `run_verify`, `VerifyPlan` and `generate_samples` load their modules on first use.
"""

from typing import Any

__all__ = ["VerifyPlan", "generate_samples", "run_sweep", "run_verify"]
_WHERE = {"run_sweep": "sweep", "run_verify": "verify", "VerifyPlan": "verify", "generate_samples": "generation"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
