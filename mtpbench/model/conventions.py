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

from dataclasses import dataclass

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
