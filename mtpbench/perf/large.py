"""The larger generated checkpoint `bench --large` measures, built once and cached."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..builders.tiny import TinySpec, make_tiny
from ..errors import UserError
from .settings import BenchSettings



# ~118M trunk parameters in float32 (8 layers in the hybrid pattern, hidden 1024, 128-wide heads, 16k vocab): big
# enough that a (K+1)-token verify costs little more than one decode step, as on real checkpoints. Random weights
# with a head built to agree with the trunk (see tiny._agree), so drafts get accepted; built in seconds, cached.
LARGE = TinySpec(seed=7, hidden=1024, layers=8, vocab=16384, head_dim=128, agree=0.98, dtype="float32")


def large_checkpoint(cache_root: Path | None = None) -> Path:
    """The LARGE checkpoint's directory, built on first use under ~/.cache/mtpbench (atomically renamed in).

    Only this run's temporary directory is ever removed: an incomplete directory at the checkpoint's path was not
    written by this function (it renames complete ones in) and is refused, never deleted."""
    root = cache_root or Path.home() / ".cache" / "mtpbench"
    key = hashlib.sha1(json.dumps(asdict(LARGE), sort_keys=True).encode()).hexdigest()[:10]
    out = root / f"bench-large-{key}"
    if (out / "config.json").exists():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists but is not a complete bench checkpoint; move it away and rerun")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-large-", dir=root))
    try:
        make_tiny(tmp, LARGE)
        try:
            tmp.rename(out)  # onto nothing, or an empty directory
        except OSError:
            if not (out / "config.json").exists():  # another process renamed its own complete copy in meanwhile
                raise UserError(f"cannot place the bench checkpoint at {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this run's mkdtemp (gone after a successful rename)
    return out


def bench_targets(models: Sequence[str], ks: Sequence[int], large: bool = False, quick: bool = False,
                  **overrides: Any) -> list[tuple[str, BenchSettings]]:
    """The checkpoints one bench command measures, with their sizes: each model at the standard (or quick) sizes,
    plus the generated LARGE checkpoint at its own; `overrides` (max_tokens, repeats, contexts) apply to all."""
    base = BenchSettings.quick(ks) if quick else BenchSettings(ks=tuple(ks))
    targets = [(str(m), replace(base, **overrides)) for m in models]
    if large:
        big = BenchSettings.quick(ks) if quick else BenchSettings.large(ks)
        targets.append((str(large_checkpoint()), replace(big, **overrides)))
    return targets
