"""mtpbench: benchmark and verify native MTP speculative decoding for Qwen3.5/3.6 checkpoints on MLX.

`mtpbench.load` and `mtpbench.SamplingConfig` are imported lazily, so the table-only parts (results, stats,
report) can be used where mlx is not installed.
"""

from typing import Any

__all__ = ["Bundle", "SamplingConfig", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Bundle", "load"):
        from .model import checkpoint

        return getattr(checkpoint, name)
    if name == "SamplingConfig":
        from .sampling import SamplingConfig

        return SamplingConfig
    raise AttributeError(name)
