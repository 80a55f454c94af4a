"""One streamed OpenAI-compatible request, bounded in every way a hostile or broken server could stretch it.

Bounds: the silence between two reads (`Endpoint.timeout_s`), the whole request (`Endpoint.deadline_s`, else
derived from max tokens: a watchdog closes the stream when it passes, so a server that trickles a byte at a time or
sends keep-alive comments forever cannot hold a sweep), the size of one line (a 256 MB line is refused, not
buffered), the number of lines, and the size of an error body read. Everything the server reports is validated
(finite, non-negative, within max tokens, consistent with what was streamed): an implausible answer is a failed
request with its reason, never a crash and never an `ok`. Requests go only to the URL the user gave; proxies from
the environment are ignored and redirects are not followed (the client is built in `server.py`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..sweep.endpoint import Endpoint

MAX_LINE_BYTES = 4 << 20  # one SSE line: a chunk with 20 top log-probs per token is a few kB
ERROR_BODY_BYTES = 2000
MAX_PROMPT_TOKENS = 10_000_000
MAX_TOK_S = 100_000.0  # client-side decode speeds above this are a clock or a server lying
_TOKEN_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls")  # a chat delta that carries tokens


class RequestFailed(Exception):
    """A request that produced no usable answer; the message is one line, fit for a parquet `error` cell."""

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(one_line(reason))
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
    token_ids: tuple[int, ...] | None = None  # the generated ids, where the server's log-probs name them
    token_logprobs: tuple[float, ...] | None = None  # the server's log p per generated token, where it sends them
    pieces: tuple[str, ...] = ()  # the text of each token-bearing chunk, in order (an audit's re-tokenisation)


def one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def deadline_for(endpoint: Endpoint, max_tokens: int) -> float:
    """The whole request's limit: the user's, else 30 s plus 1 s per requested token."""
    return endpoint.deadline_s or 30.0 + float(max_tokens)


def _transport_failure(e: Exception, endpoint: Endpoint, tokens_seen: int) -> RequestFailed:
    """One readable reason per httpx failure; only failures before any token are worth a retry."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return RequestFailed(f"cannot connect to {endpoint.url}: {endpoint.scrub(str(e))}", retryable=True)
    if isinstance(e, httpx.TimeoutException):
        return RequestFailed(f"no answer from {endpoint.url} within {endpoint.timeout_s:g} s "
                             f"(after {tokens_seen} token chunks)")
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
        where = f"mid-answer after {tokens_seen} token chunks" if tokens_seen else "before answering"
        return RequestFailed(f"connection dropped {where}: {endpoint.scrub(str(e)) or type(e).__name__}",
                             retryable=not tokens_seen)
    return RequestFailed(f"{type(e).__name__}: {endpoint.scrub(str(e))}")


def _head(resp: httpx.Response, limit: int = ERROR_BODY_BYTES) -> str:
    """The start of a response body, read without loading a huge one."""
    data = b""
    for chunk in resp.iter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit].decode("utf-8", "replace")


def error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's first line."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.strip().splitlines()[0] if body.strip() else ""
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)
    return body


def _check_status(resp: httpx.Response, endpoint: Endpoint) -> None:
    if resp.status_code >= 400:
        reason = error_message(_head(resp)) or resp.reason_phrase
        raise RequestFailed(f"HTTP {resp.status_code} from {endpoint.url}: {endpoint.scrub(reason)}",
                            retryable=resp.status_code >= 500 or resp.status_code == 429)
    ctype = resp.headers.get("content-type", "")
    if "text/event-stream" not in ctype:
        raise RequestFailed(f"not an OpenAI-compatible streaming answer (content-type {ctype or 'none'}): "
                            f"{endpoint.scrub(_head(resp, 200))}")


def sse_data(chunks: Iterator[bytes], max_lines: int) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event byte stream (comments such as keep-alives skipped), with a cap
    on one line's size and on the number of lines."""
    buf = b""
    n = 0
    for chunk in chunks:
        buf += chunk
        while True:
            cut = buf.find(b"\n")
            if cut < 0:
                break
            line, buf = buf[:cut].rstrip(b"\r"), buf[cut + 1:]
            n += 1
            if n > max_lines:
                raise RequestFailed(f"stream longer than {max_lines} lines; stopped reading")
            if line.startswith(b"data:"):
                yield line[len(b"data:"):].strip().decode("utf-8", "replace")
        if len(buf) > MAX_LINE_BYTES:
            raise RequestFailed(f"a stream line longer than {MAX_LINE_BYTES >> 20} MiB; stopped reading")
    if buf.strip().startswith(b"data:"):
        yield buf.strip()[len(b"data:"):].strip().decode("utf-8", "replace")


def _chunk(payload: str, endpoint: Endpoint) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise RequestFailed(f"not an OpenAI-compatible answer: invalid JSON in stream: "
                            f"{endpoint.scrub(payload[:80])}") from None
    if isinstance(obj, dict) and "error" in obj:
        raise RequestFailed(f"server error mid-stream: {endpoint.scrub(error_message(payload))}")
    choices = (obj.get("choices") or []) if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not isinstance(obj.get("usage") or {}, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("delta") or {}, dict) for c in choices):
        raise RequestFailed(f"not an OpenAI-compatible answer: {endpoint.scrub(payload[:80])}")
    return obj


def _chunk_text(choice: dict[str, Any]) -> str:
    """The generated text a choice carries ('' when none): completions `text` or any token-bearing chat delta."""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    delta = choice.get("delta") or {}
    return "".join(str(delta[f]) for f in _TOKEN_FIELDS if delta.get(f))


TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` form of a token


def _token_id(entry: dict[str, Any]) -> int | None:
    """The id a log-prob entry names: an integer `id` (mlx_lm.server, SGLang), or a token string "token_id:123"
    (vLLM with `return_tokens_as_token_ids`); None when it names none (then the text is re-tokenised)."""
    value = entry.get("id", entry.get("token_id"))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    token = entry.get("token")
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) and token[len(TOKEN_ID_PREFIX):].isdigit():
        return int(token[len(TOKEN_ID_PREFIX):])
    return None


def _logprob(value: Any) -> float:
    """A reported log p: a finite number <= 0 (a little float slack), else NaN (not a reason to fail the run)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= 1e-6
    return float(value) if ok else float("nan")


def reported_tokens(reported: list[tuple[int | None, float]]) -> dict[str, Any]:
    """`Answer`'s token_ids (only when every reported token names its id) and token_logprobs, from
    `chunk_logprobs` entries; both None when the server reported none."""
    ids = tuple(i for i, _ in reported)
    return {"token_ids": ids if reported and all(i is not None for i in ids) else None,
            "token_logprobs": tuple(v for _, v in reported) if reported else None}


def chunk_logprobs(choice: dict[str, Any]) -> list[tuple[int | None, float]]:
    """(token id or None, log p) per token a streamed choice reports, in either OpenAI form: chat
    `logprobs.content[]` entries, or completions `logprobs.tokens` / `token_logprobs` lists."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    content = lp.get("content")
    if isinstance(content, list):
        return [(_token_id(e), _logprob(e.get("logprob"))) for e in content if isinstance(e, dict) and e]
    tokens, values = lp.get("tokens"), lp.get("token_logprobs")
    if isinstance(tokens, list) and isinstance(values, list) and len(tokens) == len(values):
        return [(_token_id({"token": t}), _logprob(v)) for t, v in zip(tokens, values)]
    return []


def _count(value: Any, name: str, limit: int) -> int | None:
    """A server-reported count: absent is None; anything but a finite integer in [0, limit] fails the request."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not 0 <= value <= limit:
        raise RequestFailed(f"the server reported {name} = {str(value)[:40]}, not a count in 0..{limit}")
    return int(value)


def stream(client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Answer:
    """One streamed request, timed from just before sending; raises RequestFailed with the reason."""
    times: list[float] = []
    texts: list[str] = []
    reported: list[tuple[int | None, float]] = []
    usage: dict[str, Any] = {}
    finish, done = None, False
    max_tokens = int(body["max_tokens"])
    deadline = deadline_for(endpoint, max_tokens)
    expired = threading.Event()
    t0 = time.perf_counter()
    try:
        with client.stream("POST", endpoint.request_url(path), json=body) as resp:
            def stop() -> None:
                expired.set()
                resp.close()

            watchdog = threading.Timer(deadline, stop)
            watchdog.daemon = True
            watchdog.start()
            try:
                _check_status(resp, endpoint)
                for payload in sse_data(resp.iter_bytes(), 8 * max_tokens + 10_000):
                    if payload == "[DONE]":
                        done = True
                        break
                    obj = _chunk(payload, endpoint)
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        reported += chunk_logprobs(choice)
                        text = _chunk_text(choice)
                        if text:
                            times.append(time.perf_counter() - t0)
                            texts.append(text)
                        finish = choice.get("finish_reason") or finish
            finally:
                watchdog.cancel()
    except (httpx.HTTPError, httpx.StreamError) as e:
        if expired.is_set():
            raise RequestFailed(f"the request passed its deadline of {deadline:g} s (after {len(times)} token "
                                f"chunks)") from None
        raise _transport_failure(e, endpoint, len(times)) from None
    if expired.is_set():
        raise RequestFailed(f"the request passed its deadline of {deadline:g} s (after {len(times)} token chunks)")
    if not done and finish is None:
        raise RequestFailed(f"stream ended before the answer was complete (after {len(times)} token chunks)")
    completion = _count(usage.get("completion_tokens"), "completion_tokens", max_tokens)
    prompt = _count(usage.get("prompt_tokens"), "prompt_tokens", MAX_PROMPT_TOKENS)
    if completion is not None and completion < len(times):
        raise RequestFailed(f"the server reported {completion} completion tokens but streamed {len(times)} token "
                            f"chunks")
    if not times or completion == 0:
        raise RequestFailed("the server generated no tokens")
    return Answer(tuple(times), completion, prompt, finish, "".join(texts), pieces=tuple(texts),
                  **reported_tokens(reported))


MAX_JSON_BYTES = 16 << 20  # a non-streamed answer with per-token log-probs: a few hundred bytes per token


def complete(client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Answer:
    """One non-streamed request (`body` with stream off), its answer read up to MAX_JSON_BYTES; never raises. Used
    only to get token ids from servers that name them only outside streams (mlx_lm.server); no timing."""
    plain = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    deadline = deadline_for(endpoint, int(body["max_tokens"]))
    try:
        with client.stream("POST", endpoint.request_url(path), json=plain,
                           timeout=httpx.Timeout(endpoint.timeout_s, read=deadline)) as resp:
            if resp.status_code >= 400:
                raise RequestFailed(f"HTTP {resp.status_code}: {endpoint.scrub(error_message(_head(resp)))}")
            raw = _head(resp, MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise RequestFailed(f"an answer longer than {MAX_JSON_BYTES >> 20} MiB")
        obj = json.loads(raw)
        choice = obj["choices"][0]
        usage = obj.get("usage") or {}
        text = choice.get("text") if isinstance(choice.get("text"), str) else \
            str((choice.get("message") or {}).get("content") or "")
        reported = chunk_logprobs(choice)
        return Answer((), _count(usage.get("completion_tokens"), "completion_tokens", int(body["max_tokens"])),
                      _count(usage.get("prompt_tokens"), "prompt_tokens", MAX_PROMPT_TOKENS),
                      choice.get("finish_reason"), text, **reported_tokens(reported))
    except RequestFailed as e:
        return Answer(error=str(e))
    except (httpx.HTTPError, httpx.StreamError) as e:
        return Answer(error=str(_transport_failure(e, endpoint, 0)))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Answer(error="not an OpenAI-compatible answer")


def send(client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Answer:
    """A streamed request with the endpoint's retries (only for failures before any token); never raises."""
    for attempt in range(endpoint.retries + 1):
        try:
            return stream(client, endpoint, path, body)
        except RequestFailed as e:
            if not e.retryable or attempt == endpoint.retries:
                return Answer(error=str(e))
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")


def served_models(client: httpx.Client, endpoint: Endpoint) -> list[str]:
    """The model ids the server lists at /models; raises RequestFailed saying what it answered."""
    return [str(m["id"]) for m in served_model_entries(client, endpoint)]


def served_model_entries(client: httpx.Client, endpoint: Endpoint) -> list[dict[str, Any]]:
    """The model entries the server lists at /models (`id`, and `owned_by` where the server says who it is);
    raises RequestFailed saying what it answered."""
    try:
        with client.stream("GET", endpoint.request_url("models")) as resp:
            head = _head(resp, 64_000)
            status = resp.status_code
    except (httpx.HTTPError, httpx.StreamError) as e:
        raise _transport_failure(e, endpoint, 0) from None
    first = endpoint.scrub(one_line(error_message(head) or "(empty body)", 120))
    if status >= 400:
        raise RequestFailed(f"HTTP {status} from {endpoint.url}/models: {first}")
    try:
        entries = [{"id": str(m["id"]), "owned_by": str(m.get("owned_by") or "")} for m in json.loads(head)["data"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RequestFailed(f"not an OpenAI-compatible answer from {endpoint.url}/models (HTTP {status}): "
                            f"{first}") from None
    if not entries:
        raise RequestFailed(f"{endpoint.url}/models lists no model")
    return entries


def timing_fields(a: Answer) -> dict[str, Any]:
    """Client-side timing of an ok answer (tokens: the server's usage count when sent, else token chunks); raises
    RequestFailed when the stream cannot give a decode speed (everything in one chunk) or gives an absurd one."""
    import hashlib

    import numpy as np

    times = np.asarray(a.token_times, dtype=float)
    n = a.completion_tokens if a.completion_tokens is not None else len(times)
    decode_s = float(times[-1] - times[0]) if len(times) >= 2 else 0.0
    if n > 1 and decode_s <= 0:
        raise RequestFailed(f"the server sent all {n} tokens in one chunk: no decode speed can be measured "
                            f"client-side")
    tok_s = (n - 1) / decode_s if decode_s > 0 and n > 1 else None
    if tok_s is not None and tok_s > MAX_TOK_S:
        raise RequestFailed(f"implausible client-side speed {tok_s:.3g} tok/s ({n} tokens in {decode_s:.3g} s)")
    gaps = np.diff(times)
    p50, p95, p99 = (float(x) for x in np.percentile(gaps, [50, 95, 99])) if len(gaps) else (None, None, None)
    return {
        "prompt_tokens": a.prompt_tokens, "generated_tokens": n, "server_completion_tokens": a.completion_tokens,
        "ttft_s": float(times[0]) if len(times) else None, "decode_s": decode_s or None, "decode_tok_s": tok_s,
        "itl_p50_s": p50, "itl_p95_s": p95, "itl_p99_s": p99,
        "finished_by": "eos" if a.finish_reason == "stop" else a.finish_reason,
        "output_hash": hashlib.sha1(a.text.encode()).hexdigest()[:16],
    }
