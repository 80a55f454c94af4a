"""What llama.cpp's llama-server offers beyond the OpenAI API: its own clock (`timings`) and its native
`/completion` endpoint, which names every generated token id (`return_tokens`) even where a speculative server's
OpenAI log-probs name only the tokens it did not take from a draft (tools/server/README.md, server-task.cpp).

The native request is a replay for the audit only: sent after the timed request, with the local checkpoint's
prompt ids (the same chat template, so the same prompt), every sampling value explicit, and its answer read
bounded in time and size. Nothing here is timed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..sampling import SamplingConfig
from .clock import server_timings
from ..sweep.endpoint import Endpoint
from .http import Answer, RequestFailed, chunk_logprobs, error_message, reported_tokens

MAX_NATIVE_BYTES = 16 << 20


def completion_body(prompt: list[int], cfg: SamplingConfig, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    """A native `/completion` request for the same sample: the prompt as ids, every sampling field explicit (so
    llama.cpp's defaults, top_k 40 and min_p 0.05, never apply), the ids and their log-probs asked for."""
    return {"prompt": list(prompt), "n_predict": max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "top_k": cfg.top_k, "min_p": cfg.min_p, "seed": cfg.seed, "stream": False, "return_tokens": True,
            "n_probs": 1, "post_sampling_probs": False, "cache_prompt": False, "ignore_eos": ignore_eos}


def native_answer(obj: Any, max_tokens: int) -> Answer:
    """An `Answer` from a native `/completion` answer: `tokens` (return_tokens) are the ids, `tokens_predicted`
    the count (an EOS counted, not shown, as in the OpenAI answer), `stop_type` eos is finish 'stop'."""
    if not isinstance(obj, dict) or not isinstance(obj.get("tokens"), list):
        return Answer(error="the native /completion answer names no token ids (return_tokens)")
    ids = obj["tokens"]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        return Answer(error="the native /completion answer has a token id that is not a count")
    probs = obj.get("completion_probabilities")
    reported = chunk_logprobs({"logprobs": {"content": probs}}) if isinstance(probs, list) else []
    n = obj.get("tokens_predicted")
    n = int(n) if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= max_tokens else None
    prompt = obj.get("tokens_evaluated")
    prompt = int(prompt) if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0 else None
    eos = obj.get("stop_type") == "eos" or obj.get("stopped_eos") is True
    logprobs = reported_tokens(reported)["token_logprobs"] if len(reported) == len(ids) else None
    return Answer(completion_tokens=n, prompt_tokens=prompt, finish_reason="stop" if eos else "length",
                  text=str(obj.get("content") or ""), token_ids=tuple(ids), token_logprobs=logprobs,
                  ids_named=len(ids), server_clock=server_timings(obj))


def complete_native(client: httpx.Client, endpoint: Endpoint, body: dict[str, Any]) -> Answer:
    """One native `/completion` request (at the server root), read up to MAX_NATIVE_BYTES; never raises."""
    try:
        with client.stream("POST", endpoint.request_url("completion", root=True), json=body,
                           timeout=httpx.Timeout(endpoint.timeout_s, read=30.0 + float(body["n_predict"]))) as resp:
            data = b""
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_NATIVE_BYTES:
                    raise RequestFailed(f"a native answer longer than {MAX_NATIVE_BYTES >> 20} MiB")
            if resp.status_code >= 400:
                reason = error_message(data[:2000].decode("utf-8", "replace"))
                raise RequestFailed(f"HTTP {resp.status_code} from /completion: {endpoint.scrub(reason)}"[:200])
        return native_answer(json.loads(data), int(body["n_predict"]))
    except RequestFailed as e:
        return Answer(error=str(e))
    except (httpx.HTTPError, httpx.StreamError) as e:
        return Answer(error=f"/completion: {type(e).__name__}")
    except ValueError:
        return Answer(error="the native /completion answer is not JSON")
