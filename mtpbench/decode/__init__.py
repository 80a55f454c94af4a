"""Decoders: the autoregressive baseline and the reference MTP speculative decoder.

Lazy (PEP 562): `import mtpbench.decode.rule` or `.records` loads numpy only (`.limits` nothing); the decoders
load mlx on first use.
"""

from typing import Any

__all__ = ["DecodeResult", "EXACT", "MAX_K", "ROLLBACKS", "Rule", "StepRecord", "TokenRecord", "generate_ar",
           "generate_mtp"]
_WHERE = {"DecodeResult": "records", "StepRecord": "records", "TokenRecord": "records", "EXACT": "rule",
          "Rule": "rule", "generate_ar": "ar", "generate_mtp": "speculative", "MAX_K": "limits",
          "ROLLBACKS": "limits"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
