"""The MTP head's feeding conventions, which runtimes disagree on: what feeds it, what it chains, what it remembers.

- hidden: the trunk hidden fed to the head, after the trunk's final norm (`post_norm`: vLLM, MTPLX, the default)
  or before it (`pre_norm`: mlx-lm PR #990);
- chain: the hidden a depth > 1 draft feeds back in as its "trunk hidden", the head's normed output (`normed`, the
  default) or its output before the final norm (`prenorm`);
- history: the true (trunk hidden, next token) pairs the head's cache holds when it drafts: every pair since the
  prompt (`committed`, the default, what `mtplx run` uses), only the newest one (`cycle`: a fresh head cache each
  step, no prompt history; MTPLX's API default, and the same as `window:1`), or the last N (`window:N`). On the
  demo (greedy, 15 held-out stdlib prompts) `cycle` reproduces MTPLX's published cycle acceptance to 0.001.

None of them changes what a decode emits (the exact rule decides that), only how often drafts are accepted. Pure
Python: the sweep's axes table parses these where mlx is not installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

POST_NORM, PRE_NORM = "post_norm", "pre_norm"
HIDDEN_VARIANTS = (POST_NORM, PRE_NORM)
HIDDEN_ALIASES = {"post": POST_NORM, "pre": PRE_NORM, POST_NORM: POST_NORM, PRE_NORM: PRE_NORM}
NORMED, PRENORM = "normed", "prenorm"
CHAINS = (NORMED, PRENORM)
COMMITTED, CYCLE, WINDOW = "committed", "cycle", "window"


def hidden_variant(text: str, option: str = "--mtp-hidden") -> str:
    """'post' / 'pre' (or the long names) -> 'post_norm' / 'pre_norm'."""
    if text not in HIDDEN_ALIASES:
        raise UserError(f"{option} values are post, pre (post_norm, pre_norm), got {text!r}")
    return HIDDEN_ALIASES[text]


def chain(text: str, option: str = "--mtp-chain") -> str:
    if text not in CHAINS:
        raise UserError(f"{option} values are {', '.join(CHAINS)}, got {text!r}")
    return text


@dataclass(frozen=True)
class History:
    """Which true pairs the head's cache holds when it drafts; `window` is N for `window:N` (0 otherwise)."""

    kind: str = COMMITTED
    window: int = 0

    @classmethod
    def parse(cls, text: str, option: str = "--mtp-history") -> History:
        kind, sep, n = text.partition(":")
        if kind in (COMMITTED, CYCLE) and not sep:
            return cls(kind)
        if kind == WINDOW and sep:
            try:
                size = int(n)
            except ValueError:
                size = 0
            if size >= 1:
                return cls(WINDOW, size)
        raise UserError(f"{option} values are committed, cycle or window:N (N >= 1 true pairs), got {text!r}")

    def __str__(self) -> str:
        return f"{WINDOW}:{self.window}" if self.kind == WINDOW else self.kind


DEFAULT_HISTORY = History()


# ------------------------------------------------------------------------------------- conventions a checkpoint declares
RUNTIME_CONTRACT = "mtplx_runtime.json"  # MTPLX's runtime contract, shipped next to its checkpoints
_CHAIN_NAMES = {"post_norm": NORMED, "post": NORMED, NORMED: NORMED, "pre_norm": PRENORM, "pre": PRENORM,
                PRENORM: PRENORM}
_HISTORY_NAMES = {COMMITTED: COMMITTED, CYCLE: CYCLE, "last-window": WINDOW, "last_window": WINDOW, WINDOW: WINDOW}
CONVENTION_AXES = ("mtp_hidden", "mtp_chain", "mtp_history")


def _keys(doc: Any, found: dict[str, Any]) -> dict[str, Any]:
    """Every key of a nested JSON document (the first occurrence wins): contracts nest them under a profile."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            found.setdefault(str(k), v)
            _keys(v, found)
    elif isinstance(doc, list):
        for v in doc:
            _keys(v, found)
    return found


def declared(directory: str | Path) -> dict[str, str]:
    """The conventions a checkpoint directory declares in an MTPLX runtime contract, as sweep-axis values
    (`mtp_hidden`, `mtp_chain`, `mtp_history`); {} when there is no contract. MTPLX's names: `base_hidden_variant`
    (the trunk hidden fed), `mtp_hidden_variant` (the hidden chained), `mtp_history_policy` (cycle / committed /
    last-window, with the window's size in a key naming a window)."""
    path = Path(directory) / RUNTIME_CONTRACT
    if not path.is_file():
        return {}
    try:
        found = _keys(json.loads(path.read_text(encoding="utf-8")), {})
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON runtime contract ({e})") from None
    out: dict[str, str] = {}
    if "base_hidden_variant" in found:
        out["mtp_hidden"] = hidden_variant(str(found["base_hidden_variant"]), f"{path.name} base_hidden_variant")
    if "mtp_hidden_variant" in found:
        value = str(found["mtp_hidden_variant"])
        if value not in _CHAIN_NAMES:
            raise UserError(f"{path.name} mtp_hidden_variant: expected post_norm or pre_norm, got {value!r}")
        out["mtp_chain"] = _CHAIN_NAMES[value]
    if "mtp_history_policy" in found:
        value = str(found["mtp_history_policy"])
        kind = _HISTORY_NAMES.get(value.partition(":")[0])
        if kind is None:
            raise UserError(f"{path.name} mtp_history_policy: expected cycle, committed or last-window, got {value!r}")
        if kind == WINDOW and ":" not in value:
            size = next((v for k, v in found.items() if "window" in k and isinstance(v, int)), None)
            if size is None:
                raise UserError(f"{path.name}: mtp_history_policy {value!r} without a window size")
            value = f"{WINDOW}:{size}"
        out["mtp_history"] = str(History.parse(value.replace(value.partition(":")[0], kind, 1) if ":" in value
                                               else kind, f"{path.name} mtp_history_policy"))
    return out


def declared_defaults(models: "list[str] | tuple[str, ...]") -> dict[str, str]:
    """Axis -> value for each convention every one of `models` (local directories) declares alike: what a sweep
    uses where the user names no value. Checkpoints that declare nothing or disagree keep the standard default."""
    if not models or not all(Path(m).is_dir() for m in models):
        return {}
    each = [declared(m) for m in models]
    return {a: each[0][a] for a in CONVENTION_AXES if all(a in d and d[a] == each[0][a] for d in each)}
