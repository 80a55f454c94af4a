"""A small OpenAI-compatible server for the audit tests: the demo (or any checkpoint) through the reference decoder,
with switchable, labelled runtime bugs (tests only).

`Served(llamacpp=True)` emulates what mtpbench reads from llama.cpp's llama-server (as data, from the sources, not
from a build): `/v1/models` owned_by "llamacpp" (tools/server/server-context.cpp, the models route), `/props` with
`default_generation_settings.params.samplers` (the `--samplers` order: common/sampling.cpp
common_sampler_type_to_str names; default penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc,
temperature from common/common.h), its sampler chain (src/llama-sampling.cpp: top_k keeps k, top_p softmaxes the
survivors and cuts where the cumulative mass reaches p, min_p on the logits, temperature last: the `llama.cpp`
profile of mtpbench.sampling, whose oracle tests/test_profiles.py holds against a literal transcription), the
native `/completion` (tools/server/README.md: `prompt` as token ids, `n_predict`, `return_tokens` -> `tokens`,
`n_probs` -> `completion_probabilities`, `tokens_predicted`, `stop_type`, `timings`), a `timings` object in the
last streamed chunk, and `--metrics` counters (llamacpp:spec_decode_num_drafts_total, _num_draft_tokens_total,
_num_accepted_tokens_total, _num_accepted_tokens_per_pos_total{position}). With `partial_ids` the OpenAI stream
names ids only for tokens the server did not take from a draft, as llama-server with `--spec-type draft-mtp` does.
`counters="inflated"` reports every draft accepted (more than any exact rule can accept).

It listens on 127.0.0.1 only, in a daemon thread; every request is bounded (max_tokens capped, the body size
capped, a socket timeout on reads) and `stop()` shuts it down. The bugs are the decoder's labelled controls
(`decode.controls`): the server runs `generate_mtp` with the control's `Rule`, or `generate_ar` in `ar` mode. It
streams one chunk per token with the log-prob entries naming the ids the vLLM way ("token_id:123"), or, with
`ids=False`, text only (the audit then re-tokenises).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mtpbench.decode import generate_ar, generate_mtp
from mtpbench.decode.controls import CONTROLS
from mtpbench.decode.rule import EXACT
from mtpbench.model.checkpoint import Bundle
from mtpbench.sampling import SamplingConfig
from mtpbench.sweep.prompts import Prompt, encode

MAX_TOKENS = 512
LLAMA_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
MAX_BODY = 1 << 20
CHUNK_GAP_S = 5e-4  # chunks are written after the decode: a gap keeps client-side speeds plausible (a client
# descheduled for the whole stream on a loaded machine would read it as one backlog: no client speed at all)


@dataclass(frozen=True)
class Served:
    """What the test server runs: a bug label (a negative control's name) or None (exact), MTP or AR, K."""

    bug: str | None = None
    mode: str = "mtp"
    k: int = 2
    ids: bool = True  # name token ids in the log-probs; False: text only
    owned_by: str | None = None  # /v1/models owned_by (None: absent, as mlx_lm.server)
    profile: str = "mlx"  # the server's sampler order (a sampling profile)
    llamacpp: bool = False  # emulate llama-server's extra endpoints and fields (module doc)
    samplers: tuple[str, ...] = LLAMA_SAMPLERS  # the order /props reports (llamacpp only)
    partial_ids: bool = False  # name ids only for tokens not taken from a draft
    counters: str = "decoder"  # decoder: the decode's own acceptance counts | inflated: every draft accepted


class AuditServer:
    def __init__(self, bundle: Bundle, served: Served):
        self.bundle, self.served = bundle, served
        self.lock = threading.Lock()  # one decode at a time
        self.spec = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * served.k}  # --metrics counters
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def generate(self, body: dict[str, Any], chat: bool) -> tuple[list[int], Any]:
        """(prompt ids, decode result) of one request, as the reference decoder (with the bug) produces it."""
        if chat:
            msgs = tuple((str(m["role"]), str(m["content"])) for m in body["messages"])
            ids = encode(self.bundle.tokenizer, Prompt("t", "t", "chat", None, msgs, None), None)
        elif isinstance(body.get("prompt"), list):  # llama.cpp's native /completion: the prompt as token ids
            ids = [int(t) for t in body["prompt"]]
        else:
            ids = encode(self.bundle.tokenizer, Prompt("t", "t", "code", str(body["prompt"]), None, None,
                                                       completion=True), None)
        cfg = SamplingConfig(float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0)),
                             int(body.get("top_k", 0)), float(body.get("min_p", 0.0)), int(body.get("seed", 0)),
                             order=self.served.profile)
        n = min(int(body.get("max_tokens", body.get("n_predict", 16))), MAX_TOKENS)
        with self.lock:
            if self.served.mode == "ar":
                r = generate_ar(self.bundle, ids, cfg, n, records=self.served.partial_ids)
            else:
                rule = CONTROLS[self.served.bug].rule if self.served.bug else EXACT
                r = generate_mtp(self.bundle, ids, cfg, self.served.k, n, rule=rule, records=self.served.partial_ids)
                self._count(r)
        return ids, r

    def _count(self, r: Any) -> None:
        s = self.spec
        s["drafts"] += r.verify_steps
        s["draft_tokens"] += sum(r.drafted_at_depth)
        inflated = self.served.counters == "inflated"
        s["accepted"] += sum(r.drafted_at_depth if inflated else r.accepted_at_depth)
        for i, a in enumerate(r.drafted_at_depth if inflated else r.accepted_at_depth):
            s["per_pos"][i] += a

    def metrics(self) -> str:
        """llama-server's --metrics counters (Prometheus text, as tools/server writes them)."""
        s, name = self.spec, "llamacpp:spec_decode_num_"
        lines = []
        for key, metric in (("drafts", "drafts"), ("draft_tokens", "draft_tokens"), ("accepted", "accepted_tokens")):
            lines += [f"# TYPE {name}{metric}_total counter", f"{name}{metric}_total {s[key]}"]
        lines.append(f"# TYPE {name}accepted_tokens_per_pos_total counter")
        lines += [f'{name}accepted_tokens_per_pos_total{{position="{i}"}} {v}' for i, v in enumerate(s["per_pos"])]
        return "\n".join(lines) + "\n"


def _pieces(tokenizer: Any, tokens: list[int]) -> list[str]:
    """One text piece per token whose concatenation is the decoded text (EOS shows as nothing)."""
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    shown = [t for t in tokens if t not in eos]
    full = tokenizer.decode(shown)
    out, sent, j = [], 0, 0
    for t in tokens:
        if t in eos:
            out.append("")
            continue
        j += 1
        text = tokenizer.decode(shown[:j])
        piece = text[sent:] if full.startswith(text) and len(text) >= sent else ""
        sent += len(piece)
        out.append(piece)
    if sent < len(full):
        out[-1] += full[sent:]
    return out


def _drafted(r: Any) -> list[bool]:
    """Per emitted token, whether it was a draft the server kept (a speculative llama-server names no id for it)."""
    return [rec.source == "accepted" for rec in r.token_records]


def _timings(r: Any) -> dict[str, Any]:
    """llama.cpp's `timings`: the decode's own clock (predicted_n tokens in predicted_ms)."""
    n = max(len(r.tokens) - 1, 1)
    ms = max(r.decode_s, 1e-6) * 1e3
    return {"prompt_n": r.prompt_tokens, "predicted_n": n, "predicted_ms": ms, "predicted_per_second": n / ms * 1e3}


def _handler(server: AuditServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stalled client cannot hold a thread

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            llama = server.served.llamacpp
            if llama and self.path.rstrip("/") == "/props":
                return self._json(200, {"default_generation_settings": {
                    "n_ctx": 4096, "params": {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "temperature": 0.8,
                                              "samplers": list(server.served.samplers)}}, "build_info": "test"})
            if llama and self.path.rstrip("/") == "/metrics":
                data = server.metrics().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if self.path.rstrip("/") != "/v1/models":
                return self._json(404, {"error": {"message": "not found"}})
            entry = {"id": "demo", "object": "model"}
            owner = "llamacpp" if llama and server.served.owned_by is None else server.served.owned_by
            if owner is not None:
                entry["owned_by"] = owner
            self._json(200, {"object": "list", "data": [entry]})

        def _body(self) -> dict[str, Any] | None:
            size = int(self.headers.get("Content-Length", "0"))
            if not 0 < size <= MAX_BODY:
                self._json(413, {"error": {"message": "body too large"}})
                return None
            return json.loads(self.rfile.read(size))

        def do_POST(self) -> None:
            path = self.path.rstrip("/")
            if server.served.llamacpp and path == "/completion":
                body = self._body()
                return None if body is None else self._native(body)
            chat = path == "/v1/chat/completions"
            if not chat and path != "/v1/completions":
                return self._json(404, {"error": {"message": "not found"}})
            body = self._body()
            if body is None:
                return None
            prompt, r = server.generate(body, chat)
            tokens = list(r.tokens)
            if not body.get("stream", False):
                return self._whole(body, chat, prompt, r)
            tok = server.bundle.tokenizer
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            want = bool(body.get("logprobs")) and server.served.ids
            drafted = _drafted(r) if server.served.partial_ids else [False] * len(tokens)
            for t, piece, from_draft in zip(tokens, _pieces(tok, tokens), drafted):
                choice: dict[str, Any] = {"index": 0, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                if want and not from_draft:  # the ids, the vLLM way; no log p (the decoder's rows are transformed)
                    choice["logprobs"] = {"content": [{"token": f"token_id:{t}", "logprob": None}]} if chat else \
                        {"tokens": [f"token_id:{t}"], "token_logprobs": [None]}
                self._send({"choices": [choice]})
                time.sleep(CHUNK_GAP_S)
            finish = "stop" if tokens[-1] in server.bundle.eos_ids else "length"
            self._send({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            last: dict[str, Any] = {"choices": [], "usage": {"prompt_tokens": len(prompt),
                                                             "completion_tokens": len(tokens)}}
            if server.served.llamacpp:
                last["timings"] = _timings(r)
            self._send(last)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _whole(self, body: dict[str, Any], chat: bool, prompt: list[int], r: Any) -> None:
            """A non-streamed answer (the audit's replay), naming the same ids the stream names."""
            tokens = list(r.tokens)
            drafted = _drafted(r) if server.served.partial_ids else [False] * len(tokens)
            named = [t for t, d in zip(tokens, drafted) if not d] if server.served.ids else []
            text = "".join(_pieces(server.bundle.tokenizer, tokens))
            lp = [{"token": f"token_id:{t}", "logprob": None} for t in named]
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if tokens[-1] in server.bundle.eos_ids
                                      else "length", "logprobs": {"content": lp} if body.get("logprobs") else None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            self._json(200, {"choices": [choice], "usage": {"prompt_tokens": len(prompt),
                                                            "completion_tokens": len(tokens)}})

        def _native(self, body: dict[str, Any]) -> None:
            """llama.cpp's /completion: every id (`return_tokens`) except an EOS, which it counts but never shows."""
            prompt, r = server.generate(body, chat=False)
            tokens = list(r.tokens)
            eos = tokens[-1] in server.bundle.eos_ids
            shown = tokens[:-1] if eos else tokens
            out: dict[str, Any] = {"content": server.bundle.tokenizer.decode(shown), "tokens_predicted": len(tokens),
                                   "tokens_evaluated": len(prompt), "stop_type": "eos" if eos else "limit",
                                   "stop": True, "timings": _timings(r)}
            if body.get("return_tokens"):
                out["tokens"] = shown
            if body.get("n_probs"):
                out["completion_probabilities"] = [{"id": t, "logprob": None} for t in shown]
            self._json(200, out)

        def _send(self, obj: Any) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

    return Handler
