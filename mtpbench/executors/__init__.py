"""Where a sweep's cells run.

`local` (the default) runs every (model, policy) group in this process: `mtpbench.sweep._execute`.
`ray` runs each group as a task on a Ray cluster, or on a local Ray instance: `ray_executor.run_ray`.
Both call `sweep.run_group` on the worker side and `sweep.write_cell` on the writing side, so a results dir
made by one can be resumed by the other.
"""

from __future__ import annotations

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS"]
