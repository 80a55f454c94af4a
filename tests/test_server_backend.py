"""Server backend: a real mlx_lm.server on a tiny checkpoint, and a local stub server for faults and /metrics.

Everything runs on loopback with bounded waits: the real server gets at most 60 s to come up, the stub's hanging
answers end after a few seconds whatever happens, and the client's timeouts are well below that.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from mtpbench.sweep.endpoint import Endpoint, endpoints_from_options

from .conftest import loopback, mlx_lm_server
from mtpbench.backends.metrics import SpecCounters, counter_fields, parse_spec_counters
from mtpbench.decode import generate_ar
from mtpbench.errors import UserError
from mtpbench.sweep.prompts import encode, load_set
from mtpbench.sweep.store import read_table
from mtpbench.sampling import SamplingConfig
from mtpbench.orchestrate.sweep import SweepOutcome, run_sweep
from mtpbench.sweep.spec import SweepSpec

MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_file(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def spec_for(prompts: Path, endpoints, **kw) -> SweepSpec:
    base = {"prompts": str(prompts), "k": 1, "temperature": 0.0, "max_tokens": MAX_TOKENS, "repeats": 1,
            "records": False, "warmup_tokens": 0}
    return SweepSpec.of(**{**base, **kw}, endpoints=tuple(endpoints))


def run_server_sweep(prompts: Path, endpoints, out: Path, say=None, **kw) -> SweepOutcome:
    """A server-only sweep through the one runner (`run_sweep`), as `mtpbench sweep --endpoint` runs it."""
    return run_sweep(spec_for(prompts, endpoints, **kw), out, say=say)


# ------------------------------------------------------------------------------------------ a real mlx_lm.server

REAL_PROMPTS = [
    {"id": "chat1", "category": "chat", "messages": [{"role": "user", "content": "def add(a, b):"}]},
    {"id": "code1", "category": "code", "prompt": "for i in range(10):", "completion": True},
]


@pytest.fixture(scope="module")
def mlx_server(tiny_agree, tmp_path_factory) -> Iterator[str]:
    """`python -m mlx_lm server` on the tiny agreeing checkpoint; yields its base URL, stops it at the end."""
    port, tmp = free_port(), tmp_path_factory.mktemp("mlx-server")
    hf_cache = tmp / "hf-cache"  # an empty hub cache: /v1/models then lists only --model
    hf_cache.mkdir()
    with mlx_lm_server(tiny_agree, tmp, hf_cache, port, ready=lambda r: r.status_code == 200) as url:
        yield url


def test_real_server_sweep_rows(mlx_server, tiny_agree, tmp_path):
    prompts = prompt_file(tmp_path / "real.jsonl", REAL_PROMPTS)
    endpoint = Endpoint(address=mlx_server, name="mlx-lm", mode="ar", concurrency=(1, 2), timeout_s=30)
    lines: list[str] = []
    out = tmp_path / "res"
    outcome = run_server_sweep(prompts, [endpoint], out, lines.append, warmup_tokens=4)
    assert outcome.failed_runs == [] and outcome.cells_run == 2, lines
    runs = read_table(out, "runs")
    assert len(runs) == 2 * (1 + 2)
    assert set(runs["backend"]) == {"mlx-lm"} and set(runs["status"]) == {"ok"}
    assert set(runs["model"]) == {str(Path(tiny_agree).resolve())}  # learnt from /v1/models
    assert sorted(runs["concurrency"]) == [1, 1, 2, 2, 2, 2]
    assert set(runs["k"]) == {0} and set(runs["mode"]) == {"ar"}
    for col in ("ttft_s", "decode_s", "decode_tok_s", "itl_p50_s", "itl_p95_s", "itl_p99_s"):
        assert (runs[col] > 0).all(), col
    assert (runs["server_completion_tokens"] == runs["generated_tokens"]).all()
    assert runs["server_completion_tokens"].between(2, MAX_TOKENS).all()
    assert runs["verify_steps"].isna().all()  # mlx_lm.server has no /metrics: acceptance stays unknown
    assert runs["run_id"].is_unique

    again = run_server_sweep(prompts, [endpoint], out, lines.append, warmup_tokens=4)
    assert (again.cells_run, again.cells_skipped) == (0, 2)


def _server_token_ids(url: str, prompt) -> list[int]:
    """Greedy token ids straight from the server: non-streamed, with logprobs (mlx_lm.server returns ids there)."""
    body = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True}
    if prompt.completion:
        path, body = "completions", {**body, "prompt": prompt.text}
    else:
        path, body = "chat/completions", {**body, "messages": [{"role": r, "content": c} for r, c in prompt.messages]}
    answer = httpx.post(f"{url}/{path}", json=body, timeout=30, trust_env=False).json()
    return [t["id"] for t in answer["choices"][0]["logprobs"]["content"]]


def test_real_server_greedy_tokens_equal_mtpbench_ar(mlx_server, bundle_agree, tmp_path):
    """Same checkpoint, same prompt encoding (chat template / raw text): identical greedy token ids."""
    for prompt in load_set(str(prompt_file(tmp_path / "real.jsonl", REAL_PROMPTS))):
        ours = generate_ar(bundle_agree, encode(bundle_agree.tokenizer, prompt, None), SamplingConfig(), MAX_TOKENS,
                           records=False).tokens
        assert _server_token_ids(mlx_server, prompt) == ours, prompt.id


# ----------------------------------------------------------------------------------------------- a stub server


@dataclass
class StubState:
    """What the stub does: behaviour keyed by the prompt text, counters, request counts."""

    healthy: bool = False
    metrics: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    requests: Counter = field(default_factory=Counter)
    counters: dict[str, float] = field(default_factory=lambda: {"drafts": 0, "draft": 0, "acc": 0, "p0": 0, "p1": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)


def _metrics_text(c: dict[str, float]) -> str:
    return "\n".join([
        "# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.",
        "# TYPE vllm:spec_decode_num_drafts counter",
        f'vllm:spec_decode_num_drafts_total{{model_name="stub-model"}} {c["drafts"]}',
        "# TYPE vllm:spec_decode_num_draft_tokens counter",
        f'vllm:spec_decode_num_draft_tokens_total{{model_name="stub-model"}} {c["draft"]}',
        "# TYPE vllm:spec_decode_num_accepted_tokens counter",
        f'vllm:spec_decode_num_accepted_tokens_total{{model_name="stub-model"}} {c["acc"]}',
        "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter",
        f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="stub-model",position="0"}} {c["p0"]}',
        f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="stub-model",position="1"}} {c["p1"]}',
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{model_name="stub-model"} 0',
    ]) + "\n"


class StubHandler(BaseHTTPRequestHandler):
    state: StubState  # set per server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "stub-model"}]}).encode())
        elif self.path == "/metrics" and self.state.metrics:
            with self.state.lock:
                self._send(200, _metrics_text(self.state.counters).encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, b"Not Found", "text/plain")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        if body.get("model") != "stub-model":
            self._send(404, json.dumps({"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                       .encode())
            return
        with self.state.lock:
            self.state.requests[key] += 1
            seen = self.state.requests[key]
        behaviour = "ok" if self.state.healthy else key
        if behaviour == "flaky":
            behaviour = "fail500" if seen == 1 else "ok"
        getattr(self, f"_{behaviour}", self._ok)(body)

    def _events(self, events: list[dict | str], length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if length is not None:  # a promised length never delivered: the client sees a truncated body
            self.send_header("Content-Length", str(length))
        self.end_headers()
        for e in events:
            self.wfile.write(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.002)

    @staticmethod
    def _delta(text: str, finish: str | None = None) -> dict:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                                "finish_reason": finish}]}

    def _ok(self, body: dict) -> None:
        n = 6
        if self.state.metrics:
            with self.state.lock:
                for k, v in {"drafts": 5, "draft": 10, "acc": 7, "p0": 4, "p1": 3}.items():
                    self.state.counters[k] += v
        usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}}
        self._events([self._delta(f"t{i}") for i in range(n)] + [self._delta("", "length"), usage, "[DONE]"])

    def _fail500(self, body: dict) -> None:
        self._send(500, json.dumps({"error": {"message": "internal boom\nwith a second line"}}).encode())

    def _cut(self, body: dict) -> None:
        self._events([self._delta("t0"), self._delta("t1")], length=100_000)

    def _cut_clean(self, body: dict) -> None:
        self._events([self._delta("t0"), self._delta("t1")])

    def _html(self, body: dict) -> None:
        self._send(200, b"<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")

    def _badjson(self, body: dict) -> None:
        self._events(["{this is not json"])

    def _weird(self, body: dict) -> None:
        self._events([{"choices": "not a list"}])

    def _hang(self, body: dict) -> None:
        self.state.release.wait(5)  # bounded: the client gave up long before


@pytest.fixture
def stub() -> Iterator[tuple[StubState, str]]:
    state = StubState()
    with loopback(type("Handler", (StubHandler,), {"state": state}), state.release.set) as url:
        yield state, url


def _stub_prompts(tmp_path: Path, keys: list[str]) -> Path:
    return prompt_file(tmp_path / "stub.jsonl", [{"id": k, "category": "chat", "prompt": k} for k in keys])


FAULTS = {
    "fail500": "HTTP 500",
    "cut": "connection dropped mid-answer after 2 token chunks",
    "cut_clean": "stream ended before the answer was complete",
    "html": "not an OpenAI-compatible streaming answer (content-type text/html)",
    "badjson": "invalid JSON in stream",
    "weird": "not an OpenAI-compatible answer",
    "hang": "within 0.5 s",
}


def test_faults_are_recorded_and_a_rerun_retries_only_failed_cells(stub, tmp_path):
    state, url = stub
    prompts = _stub_prompts(tmp_path, ["ok", *FAULTS])
    endpoint = Endpoint(address=url, name="stub", timeout_s=0.5)
    out, lines = tmp_path / "res", []
    first = run_server_sweep(prompts, [endpoint], out, lines.append)
    assert first.cells_run == 1 + len(FAULTS) and len(first.failed_runs) == len(FAULTS)
    runs = read_table(out, "runs").set_index("prompt_id")
    assert runs.loc["ok", "status"] == "ok" and runs.loc["ok", "decode_tok_s"] > 0
    for key, reason in FAULTS.items():
        assert runs.loc[key, "status"] == "failed"
        assert reason in runs.loc[key, "error"] and "\n" not in runs.loc[key, "error"], runs.loc[key, "error"]
        assert any(f"/{key} " in line and reason in line for line in first.failed_runs), (key, first.failed_runs)
    assert all("\n" not in line for line in [*lines, *first.failed_runs])

    state.healthy = True
    second = run_server_sweep(prompts, [endpoint], out, lines.append)
    assert (second.cells_run, second.cells_skipped, second.failed_runs) == (len(FAULTS), 1, [])
    runs = read_table(out, "runs")
    assert len(runs) == 1 + len(FAULTS) and set(runs["status"]) == {"ok"}
    assert state.requests["ok"] == 1 and all(state.requests[k] == 2 for k in FAULTS)


def test_wrong_model_unreachable_and_retries(stub, tmp_path):
    _, url = stub
    endpoints = [
        Endpoint(address=url, name="wrong-model", served_model="no-such-model", timeout_s=2),
        Endpoint(address=f"http://127.0.0.1:{free_port()}/v1", name="down", served_model="m", timeout_s=2),
        Endpoint(address=f"http://127.0.0.1:{free_port()}/v1", name="down-unnamed-model", timeout_s=2),
        Endpoint(address=url, name="retrying", retries=1, timeout_s=2),  # 500 on the first try, ok on the retry
    ]
    out = tmp_path / "res"
    run_server_sweep(_stub_prompts(tmp_path, ["flaky"]), endpoints, out)
    runs = read_table(out, "runs").set_index("backend")
    assert "HTTP 404" in runs.loc["wrong-model", "error"] and "does not exist" in runs.loc["wrong-model", "error"]
    assert runs.loc["down", "error"].startswith("cannot connect to http://127.0.0.1:")
    assert runs.loc["down-unnamed-model", "error"].startswith("could not learn the served model: cannot connect")
    assert runs.loc["retrying", "status"] == "ok" and runs.loc["retrying", "model"] == "stub-model"


def test_metrics_counter_deltas_land_on_rows(stub, tmp_path):
    state, url = stub
    state.metrics = True
    state.counters.update(drafts=100, draft=200, acc=150, p0=90, p1=60)  # a server that has run before
    out = tmp_path / "res"
    run_server_sweep(_stub_prompts(tmp_path, ["a", "b"]), [Endpoint(address=url, name="vllm", concurrency=(1, 2))],
                     out)
    runs = read_table(out, "runs").set_index("run_id")
    solo = runs[runs["concurrency"] == 1]
    assert list(solo["verify_steps"]) == [5, 5] and list(solo["drafted_tokens"]) == [10, 10]
    assert list(solo["accepted_tokens"]) == [7, 7] and list(solo["mean_acceptance_length"]) == [2.4, 2.4]
    assert [list(a) for a in solo["accepted_at_depth"]] == [[4, 3], [4, 3]]
    assert [list(a) for a in solo["drafted_at_depth"]] == [[5, 5], [5, 5]]
    pair = runs[runs["concurrency"] == 2]  # the batch's counters go on its first row only: sums stay exact
    assert list(pair.filter(like="-c2-0", axis=0)["drafted_tokens"]) == [20, 20]
    assert pair.filter(like="-c2-1", axis=0)["drafted_tokens"].isna().all()


def test_no_metrics_means_null_acceptance(stub, tmp_path):
    _, url = stub
    out = tmp_path / "res"
    run_server_sweep(_stub_prompts(tmp_path, ["a"]), [Endpoint(address=url, name="plain")], out)
    runs = read_table(out, "runs")
    assert runs["status"].eq("ok").all()
    for col in ("verify_steps", "drafted_tokens", "accepted_tokens", "mean_acceptance_length"):
        assert runs[col].isna().all(), col
    assert runs["accepted_at_depth"].isna().all()


# ------------------------------------------------------------------------------------------------- unit checks


def test_parse_spec_counters_variants():
    untyped = ('vllm:spec_decode_num_drafts{engine="0"} 3\nvllm:spec_decode_num_drafts{engine="1"} 4\n'
               'vllm:spec_decode_num_accepted_tokens_per_pos{position="1"} 2\n')
    c = parse_spec_counters(untyped)
    assert c == SpecCounters(drafts=7.0, per_pos=(0.0, 2.0))
    assert counter_fields(c)["drafted_tokens"] is None  # never invented from the other counters
    assert parse_spec_counters("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 1\n") is None
    assert parse_spec_counters("<html>not metrics</html>") is None
    later, earlier = SpecCounters(1.0, 2.0, 1.0, (1.0,)), SpecCounters(5.0, 9.0, 4.0, (3.0,))
    assert later.minus(earlier) is None  # counters went backwards: the server restarted


def test_endpoints_from_options():
    eps = endpoints_from_options(["mtp=http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1/"], ["m1", "m2"], None,
                                 ["mtp", "ar"], (4, 1), 5.0, 0.0, 2)
    assert [e.name for e in eps] == ["mtp", "127.0.0.1-8001"]
    assert [(e.served_model, e.mode, e.concurrency, e.timeout_s, e.retries) for e in eps] == [
        ("m1", "mtp", (1, 4), 5.0, 2), ("m2", "ar", (1, 4), 5.0, 2)]
    assert eps[1].url == "http://127.0.0.1:8001/v1"
    assert str(eps[1].request_url("metrics", root=True)) == "http://127.0.0.1:8001/metrics"
    for bad in [{"served_models": ["a", "b"]}, {"concurrency": (0,)}, {"modes": ["fast"]}]:
        with pytest.raises(UserError):
            endpoints_from_options(["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"], **bad)
    with pytest.raises(UserError):
        endpoints_from_options(["ftp://a/v1"])
    with pytest.raises(UserError, match="MTPBENCH_TEST_NO_SUCH_KEY"):
        endpoints_from_options(["http://a:1/v1"], api_key_env="MTPBENCH_TEST_NO_SUCH_KEY")
