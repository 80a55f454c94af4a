"""mtpbench: benchmark and verify native MTP speculative decoding for Qwen3.5/3.6 checkpoints on MLX."""

from .checkpoint import Bundle, load
from .sampling import SamplingConfig

__all__ = ["Bundle", "SamplingConfig", "load"]
__version__ = "0.1.0"
