"""Which clock a server's decode speed comes from, and a client-side figure that survives a client falling behind.

A server that times itself (llama.cpp's `timings`: `predicted_n` tokens in `predicted_ms`) gives its decode rate
free of the network and of a busy client; that figure is preferred and the row says so (`decode_clock`). The
client-side rate is kept beside it. The client's mean rate ((n - 1) / (last - first arrival)) is fragile: a client
that fell behind reads a backlog in one burst (measured: 128 tokens in 4 ms, a mean of 6,442 tok/s against a
median of 2,041). So the client figure is median-based: the median time per token over windows of arrivals, and a
run whose mean rate is far above that median is flagged as bursty.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SERVER, CLIENT = "server", "client"
WINDOW = 8  # arrivals per window of the median-based rate: an MTP server emits a few tokens per step
BURST_RATIO = 2.0  # mean client rate above this multiple of the median-based one: the client read a backlog
SPREAD_RATIO = 20.0  # fastest window this many times the slowest: a backlog read at once (an MTP step varies ~K+1x)


def server_timings(obj: Any) -> tuple[int, float] | None:
    """(tokens, seconds) of the server's own decode clock from a llama.cpp `timings` object (the last streamed
    chunk or a whole answer): `predicted_n` tokens in `predicted_ms`; None when absent or not plausible."""
    t = obj.get("timings") if isinstance(obj, dict) else None
    if not isinstance(t, dict):
        return None
    n, ms = t.get("predicted_n"), t.get("predicted_ms")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (n, ms))
    return (int(n), float(ms) / 1e3) if ok and n >= 1 and ms > 0 else None


def _windows(times: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Seconds per token over every window of w arrivals (w = WINDOW, or fewer on a short run)."""
    times = np.asarray(times, dtype=float)
    if len(times) < 2:
        return np.zeros(0)
    w = min(window, len(times) - 1)
    return (times[w:] - times[:-w]) / w


def median_rate(times: np.ndarray, window: int = WINDOW) -> float | None:
    """Tokens per second from arrival times, median-based: one over the median seconds per token of the windows of
    arrivals, so a burst moves it by at most its share of windows."""
    per = _windows(times, window)
    per_token = float(np.median(per)) if len(per) else 0.0
    return 1.0 / per_token if per_token > 0 else None


def bursty(times: np.ndarray, mean_rate: float | None) -> bool:
    """Whether the client read part of a run as a backlog: its mean rate far above the median-based one, or its
    fastest window of arrivals far faster than its slowest."""
    per = _windows(times)
    client = median_rate(times)
    if mean_rate is not None and client is not None and mean_rate > BURST_RATIO * client:
        return True
    return bool(len(per) and per.max() > 0 and per.max() > SPREAD_RATIO * max(per.min(), 1e-9))


def clock_fields(times: np.ndarray, mean_rate: float | None, server: tuple[int, float] | None) -> dict[str, Any]:
    """Runs fields: the server's rate (where it times itself), the client's median-based rate, the burst flag, and
    which clock `decode_tok_s` (the figure reports compare) comes from."""
    client = median_rate(times)
    burst = bursty(times, mean_rate)
    server_rate = server[0] / server[1] if server is not None and server[0] > 1 else None
    return {"server_decode_tok_s": server_rate, "client_decode_tok_s": client, "client_burst": burst,
            "decode_clock": SERVER if server_rate is not None else CLIENT}
