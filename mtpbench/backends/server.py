"""Benchmark running inference servers (vLLM, SGLang, mlx_lm.server, ...) over their OpenAI-compatible API.

The server is a black box: mtpbench sees only what comes over HTTP. Timing is therefore client-side (request start
-> first streamed token is the TTFT; gaps between streamed chunks give the inter-token latency), and speculative
counters come from the server's own Prometheus `/metrics`, read before and after each batch. Nothing is estimated:
a number the server does not expose stays null.

Rows follow the one `runs` schema, one part per (endpoint, cell), so server rows merge with reference rows and a
rerun resumes; a part whose every row failed is run again. Requests go only to the URL the user gave (its
`/models`, `/chat/completions`, `/completions`) and to `/metrics` at that server's root; proxies from the
environment are ignored and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from ..errors import UserError
from ..sweep.prompts import Prompt, load_sets
from ..provenance import now_iso, provenance
from ..sweep.store import done_parts, read_manifest, write_json, write_part
from ..sweep.run import Cell, SweepOutcome, SweepSpec, thinking_flag, plan, prepare_results_dir

MODES = ("mtp", "ar")
CELL_MODEL = "server"  # the plan's model key: one cell id per (setting, prompt, repetition), shared by endpoints
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_TOKEN_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls")  # a chat delta that carries tokens

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """One server to measure. `url` is its OpenAI base URL (e.g. http://127.0.0.1:8080/v1).

    `mode` is the user's label ("mtp" when the server runs speculative decoding, "ar" when not): mtpbench cannot
    see inside the server. `timeout_s` is the longest silence allowed (connect, or between two stream chunks).
    """

    url: str
    name: str = ""
    served_model: str | None = None
    api_key_env: str | None = None
    mode: str = "mtp"
    timeout_s: float = 60.0
    retries: int = 0
    concurrency: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        try:
            u = httpx.URL(self.url)
        except httpx.InvalidURL as e:
            raise UserError(f"endpoint {self.url!r}: not a URL ({e})") from None
        if u.scheme not in _DEFAULT_PORTS or not u.host:
            raise UserError(f"endpoint {self.url!r}: expected an http(s) base URL like http://127.0.0.1:8080/v1")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if not self.name:
            label = f"{u.host}-{u.port or _DEFAULT_PORTS[u.scheme]}"
            object.__setattr__(self, "name", "".join(ch if ch in _NAME_CHARS else "_" for ch in label))
        if not set(self.name) <= _NAME_CHARS:
            raise UserError(f"endpoint name {self.name!r}: use letters, digits, '.', '_' and '-' only")
        if self.mode not in MODES:
            raise UserError(f"endpoint mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.timeout_s > 0:
            raise UserError(f"request timeout must be > 0 s, got {self.timeout_s}")
        if self.retries < 0:
            raise UserError(f"retries must be >= 0, got {self.retries}")
        if not self.concurrency or any(int(c) != c or c < 1 for c in self.concurrency):
            raise UserError(f"concurrency levels must be integers >= 1, got {self.concurrency}")
        object.__setattr__(self, "concurrency", tuple(sorted({int(c) for c in self.concurrency})))

    @property
    def root(self) -> str:
        """The server root (where /metrics lives): the base URL without its trailing /v1."""
        return self.url.removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        """The bearer header, read from the named variable only when one is named (keys never land in results)."""
        if not self.api_key_env:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"endpoint {self.name}: environment variable {self.api_key_env} (API key) is not set")
        return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------------ one request


class RequestFailed(Exception):
    """A request that produced no usable answer; the message is one line, fit for a parquet `error` cell."""

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(_one_line(reason))
        self.retryable = retryable


@dataclass(frozen=True)
class Answer:
    """What one streamed request gave: token-chunk arrival times (s from request start) and the server's counts."""

    token_times: tuple[float, ...] = ()
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str = ""


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def request_body(cell: Cell, model: str, max_tokens: int, ignore_eos: bool) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one cell's request: every sampling value sent explicitly, so server defaults
    (e.g. a model's generation_config) never change what is measured."""
    s = cell.setting
    body: dict[str, Any] = {
        "model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p, "seed": cell.seed,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    p = cell.prompt
    if p.completion:
        return "completions", {**body, "prompt": p.raw_text()}
    thinking = thinking_flag(cell.thinking)
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    return "chat/completions", {**body, "messages": p.chat_messages()}


def _transport_failure(e: Exception, endpoint: Endpoint, tokens_seen: int) -> RequestFailed:
    """One readable reason per httpx failure; only failures before any token are worth a retry."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return RequestFailed(f"cannot connect to {endpoint.url}: {e}", retryable=True)
    if isinstance(e, httpx.TimeoutException):
        return RequestFailed(f"no answer from {endpoint.url} within {endpoint.timeout_s:g} s "
                             f"(after {tokens_seen} token chunks)")
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
        where = f"mid-answer after {tokens_seen} token chunks" if tokens_seen else "before answering"
        return RequestFailed(f"connection dropped {where}: {e or type(e).__name__}", retryable=not tokens_seen)
    return RequestFailed(f"{type(e).__name__}: {e}")


def _head(resp: httpx.Response, limit: int = 2000) -> str:
    """The start of a response body, read without loading a huge one."""
    data = b""
    for chunk in resp.iter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit].decode("utf-8", "replace")


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)
    return body


def _check_status(resp: httpx.Response, endpoint: Endpoint) -> None:
    if resp.status_code >= 400:
        reason = _error_message(_head(resp)) or resp.reason_phrase
        raise RequestFailed(f"HTTP {resp.status_code} from {endpoint.url}: {reason}",
                            retryable=resp.status_code >= 500 or resp.status_code == 429)
    ctype = resp.headers.get("content-type", "")
    if "text/event-stream" not in ctype:
        raise RequestFailed(f"not an OpenAI-compatible streaming answer (content-type {ctype or 'none'}): "
                            f"{_head(resp, 200)}")


def _sse_data(resp: httpx.Response, max_lines: int) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event stream (comments such as keep-alives skipped), bounded."""
    for n, line in enumerate(resp.iter_lines()):
        if n >= max_lines:
            raise RequestFailed(f"stream longer than {max_lines} lines; stopped reading")
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def _chunk(payload: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise RequestFailed(f"not an OpenAI-compatible answer: invalid JSON in stream: {payload[:80]}") from None
    if isinstance(obj, dict) and "error" in obj:
        raise RequestFailed(f"server error mid-stream: {_error_message(payload)}")
    choices = (obj.get("choices") or []) if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not isinstance(obj.get("usage") or {}, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("delta") or {}, dict) for c in choices):
        raise RequestFailed(f"not an OpenAI-compatible answer: {payload[:80]}")
    return obj


def _chunk_text(choice: dict[str, Any]) -> str:
    """The generated text a choice carries ('' when none): completions `text` or any token-bearing chat delta."""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    delta = choice.get("delta") or {}
    return "".join(str(delta[f]) for f in _TOKEN_FIELDS if delta.get(f))


def _stream(client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Answer:
    """One streamed request, timed from just before sending; raises RequestFailed with the reason."""
    times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] = {}
    finish, done = None, False
    t0 = time.perf_counter()
    try:
        with client.stream("POST", f"{endpoint.url}/{path}", json=body) as resp:
            _check_status(resp, endpoint)
            for payload in _sse_data(resp, 8 * int(body["max_tokens"]) + 10_000):
                if payload == "[DONE]":
                    done = True
                    break
                obj = _chunk(payload)
                usage = obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    text = _chunk_text(choice)
                    if text:
                        times.append(time.perf_counter() - t0)
                        texts.append(text)
                    finish = choice.get("finish_reason") or finish
    except (httpx.HTTPError, httpx.StreamError) as e:
        raise _transport_failure(e, endpoint, len(times)) from None
    if not done and finish is None:
        raise RequestFailed(f"stream ended before the answer was complete (after {len(times)} token chunks)")
    return Answer(tuple(times), _int_or_none(usage.get("completion_tokens")), _int_or_none(usage.get("prompt_tokens")),
                  finish, "".join(texts))


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def send(client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Answer:
    """A streamed request with the endpoint's retries (only for failures before any token); never raises."""
    for attempt in range(endpoint.retries + 1):
        try:
            return _stream(client, endpoint, path, body)
        except RequestFailed as e:
            if not e.retryable or attempt == endpoint.retries:
                return Answer(error=str(e))
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")


def resolve_served_model(client: httpx.Client, endpoint: Endpoint) -> str:
    """The model name to request: the user's, else the first one the server lists at /models."""
    if endpoint.served_model:
        return endpoint.served_model
    try:
        resp = client.get(f"{endpoint.url}/models")
    except httpx.HTTPError as e:
        raise _transport_failure(e, endpoint, 0) from None
    if resp.status_code >= 400:
        raise RequestFailed(f"HTTP {resp.status_code} from {endpoint.url}/models: {_error_message(resp.text)}")
    try:
        ids = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise RequestFailed(f"not an OpenAI-compatible answer from {endpoint.url}/models: {resp.text[:80]}") from None
    if not ids:
        raise RequestFailed(f"{endpoint.url}/models lists no model; pass the served model name")
    return str(ids[0])


# ------------------------------------------------------------------------------------------ speculative counters

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
                if key == "per_pos" and "position" in sample.labels:
                    pos = int(sample.labels["position"])
                    per_pos[pos] = per_pos.get(pos, 0.0) + sample.value
                elif key is not None and key != "per_pos":
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
        resp = client.get(f"{endpoint.root}/metrics", timeout=min(endpoint.timeout_s, 10.0))
    except httpx.HTTPError:
        return None
    return parse_spec_counters(resp.text) if resp.status_code == 200 else None


def counter_fields(delta: SpecCounters | None) -> dict[str, Any]:
    """Runs-table fields of one batch's counter deltas ({} when unknown: never invented).

    vLLM drafts every position at each step, so drafted-at-depth is the draft count at every depth; it is filled
    in only when the draft-token total confirms that (draft_tokens == drafts x depths).
    """
    if delta is None:
        return {}
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


# ----------------------------------------------------------------------------------------------------- rows


def timing_fields(a: Answer) -> dict[str, Any]:
    """Client-side timing of an ok answer. Tokens: the server's usage count when sent, else token chunks."""
    times = np.asarray(a.token_times, dtype=float)
    n = a.completion_tokens if a.completion_tokens is not None else len(times)
    decode_s = float(times[-1] - times[0]) if len(times) >= 2 else None
    gaps = np.diff(times)
    p50, p95, p99 = (float(x) for x in np.percentile(gaps, [50, 95, 99])) if len(gaps) else (None, None, None)
    return {
        "prompt_tokens": a.prompt_tokens, "generated_tokens": n, "server_completion_tokens": a.completion_tokens,
        "ttft_s": float(times[0]) if len(times) else None, "decode_s": decode_s,
        "decode_tok_s": (n - 1) / decode_s if decode_s and n > 1 else None,
        "itl_p50_s": p50, "itl_p95_s": p95, "itl_p99_s": p99,
        "finished_by": "eos" if a.finish_reason == "stop" else a.finish_reason,
        "output_hash": hashlib.sha1(a.text.encode()).hexdigest()[:16],
    }


def run_id(endpoint: Endpoint, cell: Cell, concurrency: int, i: int) -> str:
    return f"{endpoint.name}-{cell.cell_id}-c{concurrency}-{i}"


def part_name(endpoint: Endpoint, cell: Cell) -> str:
    return f"{endpoint.name}-{cell.cell_id}"


@dataclass(frozen=True)
class Batch:
    """One concurrency level of one cell: its answers and the counter fields of the whole batch."""

    concurrency: int
    order: int
    started_at: str
    answers: tuple[Answer, ...]
    counters: dict[str, Any]


def batch_rows(endpoint: Endpoint, model: str | None, cell: Cell, spec: SweepSpec, sweep: str,
               batch: Batch) -> list[dict[str, Any]]:
    """Runs rows of a batch. Server counters cover the whole batch, so they go on its first row only (sums over
    rows stay exact; the other rows' counters are null, i.e. unknown)."""
    s = cell.setting
    base = {
        "cell_id": cell.cell_id, "sweep": sweep, "backend": endpoint.name, "model": model,
        "model_path": endpoint.url, "policy": "as-is", "mode": endpoint.mode, "k": 0,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p, "setting": s.label,
        "thinking": cell.thinking, "prompt_set": cell.prompt.set_name, "prompt_id": cell.prompt.id,
        "category": cell.prompt.category, "repetition": cell.repetition, "seed": cell.seed,
        "max_tokens": cell.prompt.max_tokens or spec.max_tokens, "order": batch.order,
        "concurrency": batch.concurrency, "started_at": batch.started_at,
        **provenance(), "device": f"server {endpoint.url}",
    }
    rows = []
    for i, a in enumerate(batch.answers):
        row = {**base, "run_id": run_id(endpoint, cell, batch.concurrency, i),
               "status": "failed" if a.error else "ok", "error": a.error or None}
        if not a.error:
            row.update(timing_fields(a), **(batch.counters if i == 0 else {}))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- one endpoint's run


class _Session:
    """One endpoint during a sweep: its HTTP client, its served model (asked once) and its warm-up."""

    def __init__(self, endpoint: Endpoint, out: Path, say: Progress):
        self.endpoint, self.out, self.say = endpoint, out, say
        top = max(endpoint.concurrency)
        self.client = httpx.Client(
            headers=endpoint.headers(), timeout=httpx.Timeout(endpoint.timeout_s), trust_env=False,
            follow_redirects=False, limits=httpx.Limits(max_connections=top, max_keepalive_connections=top))
        self._model: str | None = None
        self._model_error = ""
        self._asked = False
        self.warmed = False

    def model(self) -> tuple[str | None, str]:
        """(served model, '') or (None, why it is unknown); asked once per sweep."""
        if not self._asked:
            self._asked = True
            try:
                self._model = resolve_served_model(self.client, self.endpoint)
                _record_served_model(self.out, self.endpoint, self._model)
            except RequestFailed as e:
                self._model_error = f"could not learn the served model: {e}"
                self.say(f"{self.endpoint.name}: {self._model_error}")
        return self._model, self._model_error

    def warm_up(self, cell: Cell, spec: SweepSpec, model: str) -> None:
        """One unrecorded request, so model loading and first-call costs never land in a timed row."""
        self.warmed = True
        n = min(spec.warmup_tokens, cell.prompt.max_tokens or spec.max_tokens)
        if n < 1:
            return
        path, body = request_body(cell, model, n, ignore_eos=True)
        answer = send(self.client, self.endpoint, path, body)
        if answer.error:
            self.say(f"{self.endpoint.name}: warm-up failed: {answer.error}")

    def batch(self, cell: Cell, spec: SweepSpec, model: str, concurrency: int, order: int) -> Batch:
        """`concurrency` identical requests at once, between two reads of the speculative counters."""
        path, body = request_body(cell, model, cell.prompt.max_tokens or spec.max_tokens, spec.ignore_eos)
        before = fetch_spec_counters(self.client, self.endpoint)
        started = now_iso()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = tuple(pool.map(lambda _: send(self.client, self.endpoint, path, body), range(concurrency)))
        after = fetch_spec_counters(self.client, self.endpoint) if before is not None else None
        delta = after.minus(before) if after is not None and before is not None else None
        return Batch(concurrency, order, started, answers, counter_fields(delta))

    def run_cell(self, cell: Cell, spec: SweepSpec, sweep: str) -> list[dict[str, Any]]:
        model, why = self.model()
        if model is not None and not self.warmed:
            self.warm_up(cell, spec, model)
        rows: list[dict[str, Any]] = []
        for order, c in enumerate(self.endpoint.concurrency):
            batch = self.batch(cell, spec, model, c, order) if model is not None else \
                Batch(c, order, now_iso(), (Answer(error=why),) * c, {})
            rows += batch_rows(self.endpoint, model, cell, spec, sweep, batch)
        return rows

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------- manifest, resume


def _endpoint_record(endpoint: Endpoint) -> dict[str, Any]:
    """What decides which rows an endpoint produces (timeouts and retries do not)."""
    return {"url": endpoint.url, "mode": endpoint.mode, "concurrency": list(endpoint.concurrency)}


def _check_endpoints(out: Path, endpoints: Sequence[Endpoint]) -> None:
    """Refuse to resume a results dir with an endpoint of the same name that now means something else."""
    manifest = read_manifest(out)
    known = manifest.setdefault("endpoints", {})
    for e in endpoints:
        old = {k: v for k, v in known.get(e.name, {}).items() if k != "served_model"}
        if old and old != _endpoint_record(e):
            diff = ", ".join(sorted(k for k in old if old[k] != _endpoint_record(e)[k]))
            raise UserError(f"{out} measured endpoint {e.name} with other settings (differs in: {diff}); "
                            f"use another --out or remove it")
        known[e.name] = {**known.get(e.name, {}), **_endpoint_record(e)}
    write_json(out / "manifest.json", manifest)


def _record_served_model(out: Path, endpoint: Endpoint, model: str) -> None:
    manifest = read_manifest(out)
    entry = manifest.setdefault("endpoints", {}).setdefault(endpoint.name, _endpoint_record(endpoint))
    if entry.get("served_model") not in (None, model):
        raise UserError(f"endpoint {endpoint.name} now serves {model!r}, but this sweep measured "
                        f"{entry['served_model']!r}; use another --out")
    entry["served_model"] = model
    write_json(out / "manifest.json", manifest)


def _all_failed(out: Path, part: str) -> bool:
    status = pq.read_table(out / "runs" / f"part-{part}.parquet", columns=["status"]).column("status").to_pylist()
    return all(s != "ok" for s in status)


def finished_parts(out: Path) -> set[str]:
    """Runs parts that need no rerun: written, with at least one ok row."""
    return {p for p in done_parts(out) if not _all_failed(out, p)}


# --------------------------------------------------------------------------------------------------- the sweep


def server_cells(spec: SweepSpec) -> list[Cell]:
    """sweep.plan() cells with the model axis collapsed: the endpoints are the model axis here, and quantization
    policies do not apply to a server (it serves what it serves)."""
    changes: dict[str, Any] = {"models": (CELL_MODEL,)}
    if "policies" in {f.name for f in fields(spec)}:
        changes["policies"] = ("as-is",)
    server_spec = replace(spec, **changes)
    return plan(server_spec, load_sets(list(spec.prompts)))


def _abba(endpoints: Sequence[Endpoint], cell: Cell) -> Sequence[Endpoint]:
    """Endpoints in order on even repetitions, reversed on odd ones, so drift hits AR and MTP servers alike."""
    return endpoints if cell.repetition % 2 == 0 else endpoints[::-1]


def _check_endpoint_list(endpoints: Sequence[Endpoint]) -> None:
    if not endpoints:
        raise UserError("no endpoint given")
    names = [e.name for e in endpoints]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"two endpoints are named {dup!r}; name them (NAME=URL) so their rows stay apart")
    for e in endpoints:
        e.headers()  # a missing API key variable is reported before any work


def _cell_line(endpoint: Endpoint, cell: Cell, rows: list[dict[str, Any]]) -> str:
    speeds = []
    for c in endpoint.concurrency:
        ok = [r["decode_tok_s"] for r in rows if r["concurrency"] == c and r.get("decode_tok_s")]
        speeds.append(f"c={c} " + (f"{np.mean(ok):.1f} tok/s" if ok else "failed"))
    return f"{endpoint.name} {cell.prompt.set_name}/{cell.prompt.id} r{cell.repetition}: {', '.join(speeds)}"


def run_server_sweep(spec: SweepSpec, endpoints: Sequence[Endpoint], out: Path, progress: Progress | None = None,
                     command: str = "") -> SweepOutcome:
    """Run every missing (endpoint, cell) part; failures are recorded rows, never exceptions. Safe to rerun."""
    endpoints = list(endpoints)
    _check_endpoint_list(endpoints)
    cells = server_cells(spec)
    prepare_results_dir(out, spec, command)
    _check_endpoints(out, endpoints)
    say: Progress = progress or (lambda _line: None)
    finished = finished_parts(out)
    work = [(cell, e) for cell in cells for e in _abba(endpoints, cell)]
    todo = [(cell, e) for cell, e in work if part_name(e, cell) not in finished]
    outcome = SweepOutcome(out, len(work), 0, len(work) - len(todo))
    sessions: dict[str, _Session] = {}
    try:
        for n, (cell, e) in enumerate(todo, 1):
            if e.name not in sessions:
                sessions[e.name] = _Session(e, out, say)
            rows = sessions[e.name].run_cell(cell, spec, out.name)
            write_part(out, "runs", part_name(e, cell), rows)
            outcome.cells_run += 1
            failed = [r for r in rows if r["status"] != "ok"]
            outcome.failed_runs += [f"{r['run_id']}: {r['error']}" for r in failed]
            say(f"[{n}/{len(todo)}] {_cell_line(e, cell, rows)}")
            for r in failed:
                say(f"  {e.name} {r['prompt_set']}/{r['prompt_id']} c={r['concurrency']} failed: {r['error']}")
    finally:
        for s in sessions.values():
            s.close()
    return outcome
