"""A small OpenAI-compatible server for the audit tests: the demo (or any checkpoint) through the reference decoder,
with switchable, labelled runtime bugs (tests only).

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
MAX_BODY = 1 << 20
CHUNK_GAP_S = 2e-4  # chunks are written after the decode: a gap keeps client-side speeds plausible


@dataclass(frozen=True)
class Served:
    """What the test server runs: a bug label (a negative control's name) or None (exact), MTP or AR, K."""

    bug: str | None = None
    mode: str = "mtp"
    k: int = 2
    ids: bool = True  # name token ids in the log-probs; False: text only
    owned_by: str | None = None  # /v1/models owned_by (None: absent, as mlx_lm.server)


class AuditServer:
    def __init__(self, bundle: Bundle, served: Served):
        self.bundle, self.served = bundle, served
        self.lock = threading.Lock()  # one decode at a time
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

    def generate(self, body: dict[str, Any], chat: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, generated ids) of one request, as the reference decoder (with the bug) produces them."""
        if chat:
            msgs = tuple((str(m["role"]), str(m["content"])) for m in body["messages"])
            prompt = Prompt("t", "t", "chat", None, msgs, None)
        else:
            prompt = Prompt("t", "t", "code", str(body["prompt"]), None, None, completion=True)
        ids = encode(self.bundle.tokenizer, prompt, None)
        cfg = SamplingConfig(float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0)),
                             int(body.get("top_k", 0)), float(body.get("min_p", 0.0)), int(body.get("seed", 0)))
        n = min(int(body.get("max_tokens", 16)), MAX_TOKENS)
        with self.lock:
            if self.served.mode == "ar":
                r = generate_ar(self.bundle, ids, cfg, n, records=False)
            else:
                rule = CONTROLS[self.served.bug].rule if self.served.bug else EXACT
                r = generate_mtp(self.bundle, ids, cfg, self.served.k, n, rule=rule, records=False)
        return ids, list(r.tokens)


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
            if self.path.rstrip("/") != "/v1/models":
                return self._json(404, {"error": {"message": "not found"}})
            entry = {"id": "demo", "object": "model"}
            if server.served.owned_by is not None:
                entry["owned_by"] = server.served.owned_by
            self._json(200, {"object": "list", "data": [entry]})

        def do_POST(self) -> None:
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                return self._json(404, {"error": {"message": "not found"}})
            size = int(self.headers.get("Content-Length", "0"))
            if not 0 < size <= MAX_BODY:
                return self._json(413, {"error": {"message": "body too large"}})
            body = json.loads(self.rfile.read(size))
            prompt, tokens = server.generate(body, chat)
            tok = server.bundle.tokenizer
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            want = bool(body.get("logprobs")) and server.served.ids
            for t, piece in zip(tokens, _pieces(tok, tokens)):
                choice: dict[str, Any] = {"index": 0, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                if want:  # the ids, the vLLM way; no log p (the decoder's rows are transformed, not raw)
                    choice["logprobs"] = {"content": [{"token": f"token_id:{t}", "logprob": None}]} if chat else \
                        {"tokens": [f"token_id:{t}"], "token_logprobs": [None]}
                self._send({"choices": [choice]})
                time.sleep(CHUNK_GAP_S)
            finish = "stop" if tokens[-1] in server.bundle.eos_ids else "length"
            self._send({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            self._send({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens)}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _send(self, obj: Any) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

    return Handler
