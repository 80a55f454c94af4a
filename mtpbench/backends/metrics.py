"""Speculative-decoding counters a server exposes at its Prometheus `/metrics` (vLLM's names), read before and
after each batch of requests: the only acceptance figures a black-box server gives. Nothing is estimated: a
counter the server does not expose stays null, and counters that go backwards (a restart) or are not finite
counts are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..sweep.endpoint import Endpoint

METRICS_BYTES = 16 << 20
MAX_COUNT = 2**31 - 1

# vLLM's spec-decode counters (exposed with or without the `_total` suffix) -> SpecCounters fields
VLLM_SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "per_pos",
}


@dataclass(frozen=True)
class SpecCounters:
    """Server-wide speculative counters (summed over label sets); None where the server exposes no such counter."""

    drafts: float | None = None
    draft_tokens: float | None = None
    accepted: float | None = None
    per_pos: tuple[float, ...] | None = None  # accepted tokens at draft position 0, 1, ...

    def minus(self, before: SpecCounters) -> SpecCounters | None:
        """Counts between two snapshots; None when a counter went backwards (the server restarted meanwhile)."""
        def sub(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        per_pos = None
        if self.per_pos is not None and before.per_pos is not None:
            width = max(len(self.per_pos), len(before.per_pos))
            now, then = (list(v) + [0.0] * (width - len(v)) for v in (self.per_pos, before.per_pos))
            per_pos = tuple(a - b for a, b in zip(now, then))
        delta = SpecCounters(sub(self.drafts, before.drafts), sub(self.draft_tokens, before.draft_tokens),
                             sub(self.accepted, before.accepted), per_pos)
        values = [v for v in (delta.drafts, delta.draft_tokens, delta.accepted, *(per_pos or ())) if v is not None]
        return None if any(v < 0 for v in values) else delta


def parse_spec_counters(text: str) -> SpecCounters | None:
    """vLLM speculative counters from Prometheus text (prometheus_client's parser); None when there are none."""
    totals: dict[str, float] = {}
    per_pos: dict[int, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = VLLM_SPEC_COUNTERS.get(sample.name.removesuffix("_total"))
                if not math.isfinite(sample.value) or sample.value < 0:
                    continue  # a counter is a finite count; anything else is not evidence
                if key == "per_pos" and "position" in sample.labels:
                    pos = int(sample.labels["position"])
                    per_pos[pos] = per_pos.get(pos, 0.0) + sample.value
                elif key is not None and key != "per_pos" and math.isfinite(sample.value):
                    totals[key] = totals.get(key, 0.0) + sample.value
    except ValueError:  # not Prometheus text (or a malformed label)
        return None
    if not totals and not per_pos:
        return None
    depth = tuple(per_pos.get(i, 0.0) for i in range(max(per_pos) + 1)) if per_pos else None
    return SpecCounters(totals.get("drafts"), totals.get("draft_tokens"), totals.get("accepted"), depth)


def fetch_spec_counters(client: httpx.Client, endpoint: Endpoint) -> SpecCounters | None:
    """The server's counters now; None when /metrics is missing, unreadable or has no speculative counters."""
    try:
        with client.stream("GET", endpoint.request_url("metrics", root=True),
                           timeout=min(endpoint.timeout_s, 10.0)) as resp:
            if resp.status_code != 200:
                return None
            data = b""
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > METRICS_BYTES:
                    return None  # not a metrics page we will read
    except (httpx.HTTPError, httpx.StreamError):
        return None
    return parse_spec_counters(data.decode("utf-8", "replace"))


def counter_fields(delta: SpecCounters | None) -> dict[str, Any]:
    """Runs-table fields of one batch's counter deltas ({} when unknown: never invented).

    vLLM drafts every position at each step, so drafted-at-depth is the draft count at every depth; it is filled
    in only when the draft-token total confirms that (draft_tokens == drafts x depths).
    """
    if delta is None:
        return {}
    values = [v for v in (delta.drafts, delta.draft_tokens, delta.accepted, *(delta.per_pos or ())) if v is not None]
    if any(v > MAX_COUNT for v in values):
        return {}  # more than a 32-bit count in one batch: not a real counter delta
    drafts, drafted, accepted = (None if v is None else round(v) for v in
                                 (delta.drafts, delta.draft_tokens, delta.accepted))
    depth = [round(v) for v in delta.per_pos] if delta.per_pos is not None else None
    row: dict[str, Any] = {"verify_steps": drafts, "drafted_tokens": drafted, "accepted_tokens": accepted,
                           "accepted_at_depth": depth}
    if drafts and accepted is not None:
        row["mean_acceptance_length"] = 1 + accepted / drafts
    if depth and drafts is not None and drafted == drafts * len(depth):
        row["drafted_at_depth"] = [drafts] * len(depth)
    return row
