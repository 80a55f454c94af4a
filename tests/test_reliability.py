"""Hostile and careless use: what a user already has is never deleted or corrupted, and bad input is one line.

Every case here was once a real failure (issue 17): each test reproduces it as a user would meet it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mtpbench.cli.main import main
from mtpbench.sweep.store import read_table
from tests.conftest import loopback, mlx_lm_server
from tests.test_server_backend import StubHandler, StubState, free_port, prompt_file


def _prompts(tmp_path: Path) -> Path:
    f = tmp_path / "mini.jsonl"
    f.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):\n    return x +"}) + "\n")
    return f


@pytest.fixture(scope="module")
def bad_model(tmp_path_factory, tiny) -> Path:
    """A checkpoint whose config no longer matches its weights: the trunk fails to load after the dir is made."""
    bad = tmp_path_factory.mktemp("bad") / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _sweep(cli, model: Path, out: Path, prompts: Path):
    return cli("sweep", "-m", model, "-o", out, "--k", "1", "--temp", "0", "--max-tokens", "8", "--repeats", "1",
               "--prompts", prompts, "--no-report", "--quiet")


def test_a_failed_sweep_never_deletes_a_directory_the_user_had(cli, tmp_path, bad_model):
    prompts = _prompts(tmp_path)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = _sweep(cli, bad_model, mine, prompts)
    assert res.exit_code == 2 and "not an mtpbench results directory" in res.stderr
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"  # an empty directory the user made is taken, and kept when the run fails
    empty.mkdir()
    res = _sweep(cli, bad_model, empty, prompts)
    assert res.exit_code == 2 and "does not load" in res.stderr
    assert empty.is_dir() and not any(empty.iterdir())

    new = tmp_path / "new" / "deeper"  # directories this run created are removed again, and only those
    res = _sweep(cli, bad_model, new, prompts)
    assert res.exit_code == 2 and not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_the_working_directory_and_home_are_refused_as_results_dirs(cli, tmp_path, tiny, monkeypatch):
    prompts = _prompts(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "code.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path / "work")
    res = _sweep(cli, tiny, Path("."), prompts)
    assert res.exit_code == 2 and "choose another --out" in res.stderr and len(res.stderr.splitlines()) == 1
    assert sorted(p.name for p in Path(".").iterdir()) == ["code.py"]


# ------------------------------------------------------------------------------------------------ helpers

ROOT = Path(__file__).resolve().parents[1]
SECRET_USER, SECRET_KEY, SECRET_QUERY = "alice-LEAKME0", "sk-LEAKME123", "qs-LEAKME456"
LEAK = "LEAKME"


def _one_line_error(res, code: int = 2) -> str:
    """A refused command: the exit code, and exactly one `error:` line on stderr, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _texts(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file under `root` as text; parquet tables as the text of every value (compression hides bytes)."""
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            yield p, pq.read_table(p).to_pandas().astype(str).to_csv()
        else:
            yield p, p.read_bytes().decode("utf-8", "replace")


def _no_leak(*texts_or_dirs) -> None:
    for item in texts_or_dirs:
        if isinstance(item, Path):
            for p, text in _texts(item):
                assert LEAK not in text, f"credential stored in {p}"
        else:
            assert LEAK not in item, item


def _chat_prompts(path: Path, keys: list[str]) -> Path:
    return prompt_file(path, [{"id": k, "category": "chat", "prompt": k} for k in keys])


def _code_prompts(path: Path, n: int = 1, text: str = "def f(x):\n    return x +") -> Path:
    return prompt_file(path, [{"id": f"p{i}", "category": "code", "prompt": f"{text} {i}"} for i in range(n)])


def _quick(model: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["sweep", "-m", str(model), "-o", str(out), "--k", "1", "--temp", "0", "--max-tokens", "8", "--repeats",
            "1", "--prompts", str(prompts), "--no-report", "--quiet", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory, tiny) -> Path:
    """A finished two-cell sweep on the tiny checkpoint (copy it before changing it)."""
    root = tmp_path_factory.mktemp("done")
    res = CliRunner().invoke(main, _quick(tiny, root / "res", _code_prompts(root / "two.jsonl", 2)),
                             catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return root / "res"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# -------------------------------------------------------------------------------------- 1. deleting user dirs


def test_ctrl_c_before_the_first_cell_keeps_the_users_empty_directory(tmp_path, tiny):
    """Issue 17.1, Ctrl-C: a SIGINT while the first cell runs never removes a directory the user had."""
    prompts = _code_prompts(tmp_path / "p.jsonl", 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    cmd = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "from mtpbench.cli.main import main; sys.argv[0] = 'mtpbench'; main()",
           *_quick(tiny, mine, prompts, "--repeats", "50", "--max-tokens", "64")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (mine / "manifest.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (mine / "manifest.json").exists(), "the sweep should have opened its directory"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and mine.is_dir()
    left = sorted(p.name for p in mine.iterdir())
    assert left == [] or "manifest.json" in left  # emptied (nothing measured) or a resumable results dir


# ------------------------------------------------------------------------------------------ 2-3. hostile servers


class Hostile(StubHandler):
    """The issue's hostile servers, keyed by the prompt text; every loop is bounded and stops when the client
    goes away (or the test ends)."""

    def do_GET(self) -> None:
        self.state.paths.append(self.path)
        self.path = self.path.split("?")[0]
        super().do_GET()

    def do_POST(self) -> None:
        self.state.paths.append(self.path)
        super().do_POST()

    def _open_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

    def _drip(self, pieces, pause: float) -> None:
        try:
            for piece in pieces:
                if self.state.release.is_set():
                    return
                self.wfile.write(piece)
                self.wfile.flush()
                self.state.sent += len(piece)
                time.sleep(pause)
        except OSError:
            return  # the client hung up: what we want

    def _trickle(self, body: dict) -> None:  # 1 byte / 0.5 s, at most 40 bytes (20 s)
        self._open_stream()
        line = ("data: " + json.dumps(self._delta("t0")) + "\n\n").encode()
        self._drip([line[i:i + 1] for i in range(min(len(line), 40))], 0.5)

    def _keepalive(self, body: dict) -> None:  # a keep-alive comment every 50 ms, for at most 20 s
        self._open_stream()
        self._drip([b": keep-alive\n\n"] * 400, 0.05)

    def _empty(self, body: dict) -> None:  # an event with no token, finish or usage every 50 ms, at most 20 s
        self._open_stream()
        self._drip([b'data: {"choices": [{"index": 0, "delta": {}}]}\n\n'] * 400, 0.05)

    def _hugeline(self, body: dict) -> None:  # one SSE line 4x the cap, 64 KiB at a time, never a newline
        from mtpbench.backends.http import MAX_LINE_BYTES

        self._open_stream()
        piece = b"x" * (64 << 10)
        self._drip([b"data: "] + [piece] * (4 * MAX_LINE_BYTES // len(piece)), 0)

    def _usage(self, usage: dict | str, tokens: int = 6) -> None:
        payload = usage if isinstance(usage, str) else json.dumps({"choices": [], "usage": usage})
        self._events([self._delta(f"t{i}") for i in range(tokens)] + [self._delta("", "length"), payload, "[DONE]"])

    def _usage_nan(self, body: dict) -> None:
        self._usage({"prompt_tokens": 9, "completion_tokens": float("nan")})

    def _usage_inf(self, body: dict) -> None:
        self._usage('{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1e400}}')

    def _usage_huge(self, body: dict) -> None:
        self._usage({"prompt_tokens": 99_999_999_999, "completion_tokens": 6})

    def _usage_lie_high(self, body: dict) -> None:
        self._usage({"prompt_tokens": 9, "completion_tokens": 3_000_000_000})

    def _usage_lie_low(self, body: dict) -> None:
        self._usage({"prompt_tokens": 9, "completion_tokens": 2})

    def _only_done(self, body: dict) -> None:
        self._events(["[DONE]"])

    def _endless(self, body: dict) -> None:  # real token chunks, never a finish (bounded at 5000)
        self._open_stream()
        self._drip([("data: " + json.dumps(self._delta(f"t{i}")) + "\n\n").encode() for i in range(5000)], 0.001)

    def _echo401(self, body: dict) -> None:
        import base64

        auth = self.headers.get("Authorization", "")
        seen = base64.b64decode(auth.split()[-1]).decode() if auth.startswith("Basic ") else auth
        self._send(401, json.dumps({"error": {"message": f"bad credentials {seen} for {self.path}"}}).encode())


@pytest.fixture
def hostile() -> Iterator[tuple[StubState, str]]:
    state = StubState()
    state.paths, state.sent = [], 0
    with loopback(type("H", (Hostile,), {"state": state}), state.release.set) as url:
        yield state, url


HOSTILE = {  # prompt (= behaviour) -> the reason its failed row must give (none stalls: see the cost tests below)
    "hugeline": "stream line longer than",
    "usage_nan": "completion_tokens = nan",
    "usage_inf": "completion_tokens = inf",
    "usage_huge": "prompt_tokens = 99999999999",
    "usage_lie_high": "completion_tokens = 3000000000",
    "usage_lie_low": "reported 2 completion tokens but streamed 6",
    "only_done": "generated no tokens",
}


def test_hostile_servers_give_failed_rows_with_reasons_never_a_hang_or_crash(cli, tmp_path, hostile, monkeypatch):
    """Issue 17.2 (a huge line) and 17.3 (usage NaN, 1e400, 99,999,999,999, lying counts, only [DONE]): each is one
    failed row with its reason; the sweep ends, rc 1, one line on stderr. None of these stalls, so the endpoint stays
    healthy and every cell is asked."""
    state, url = hostile
    monkeypatch.chdir(tmp_path)
    prompts = _chat_prompts(tmp_path / "hostile.jsonl", ["ok", *HOSTILE])
    out = tmp_path / "res"
    res = cli("sweep", "--endpoint", f"stub={url}", "--prompts", prompts, "--k", "1", "--temp", "0",
              "--max-tokens", "16", "--repeats", "1", "--request-timeout", "2", "--request-deadline", "5",
              "-o", out, "--quiet", "--no-report")
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"{len(HOSTILE)} run(s) failed")
    runs = read_table(out, "runs").set_index("prompt_id")
    assert runs.loc["ok", "status"] == "ok"
    for key, reason in HOSTILE.items():
        row = runs.loc[key]
        assert row["status"] == "failed" and reason in row["error"], (key, row["error"])
        assert "\n" not in row["error"]
    from mtpbench.backends.http import MAX_LINE_BYTES

    assert state.sent < 3 * MAX_LINE_BYTES  # the huge line was refused as it came, not read to its end


def _stalling_sweep(cli, tmp_path: Path, url: str, behaviour: str, n_prompts: int, *extra: str):
    """A sweep of `n_prompts` prompts x 2 repetitions on a server that answers each with `behaviour`; returns
    (result, runs table, wall seconds)."""
    prompts = prompt_file(tmp_path / f"{behaviour}.jsonl",
                          [{"id": f"p{i}", "category": "chat", "prompt": behaviour} for i in range(n_prompts)])
    out = tmp_path / f"res-{behaviour}"
    t0 = time.monotonic()
    res = cli("sweep", "--endpoint", f"stub={url}", "--prompts", prompts, "--k", "1", "--temp", "0", "--max-tokens",
              "16", "--repeats", "2", "--request-timeout", "2", "-o", out, "--quiet", "--no-report", *extra)
    return res, read_table(out, "runs"), time.monotonic() - t0


@pytest.mark.parametrize("behaviour", ["trickle", "keepalive", "empty"])
def test_a_stalling_server_costs_the_sweep_seconds_whatever_the_number_of_prompts(cli, tmp_path, hostile,
                                                                                  monkeypatch, behaviour):
    """Issue 32: a server trickling a byte every 0.5 s, or sending keep-alive comments or empty events every 50 ms, with
    --request-timeout 2 and the default deadline (46 s for the warm-up, 46 s per run): the first request ends at the
    silence timeout (bytes that make no event do not reset it), marks the endpoint unhealthy, and every later cell
    fails at once. Bar: the whole sweep under 60 s (it takes a few seconds), whatever the number of prompts."""
    state, url = hostile
    monkeypatch.chdir(tmp_path)
    res, runs, wall = _stalling_sweep(cli, tmp_path, url, behaviour, 20)
    print(f"\n{behaviour}: 20 prompts x 2 repetitions in {wall:.1f} s")
    assert wall < 60 and res.exit_code == 1 and "Traceback" not in res.stderr, (wall, res.stderr)
    assert len(runs) == 40 and set(runs["status"]) == {"failed"}
    assert runs["error"].str.startswith("endpoint unhealthy since ").all(), runs["error"].iloc[0]
    assert runs["error"].str.contains("nothing useful from the server for 2 s").all()
    assert "warm-up failed: nothing useful" in res.stderr
    assert sum(state.requests.values()) == 1  # the warm-up only: no cell asked a server known to stall


def test_an_endless_stream_of_real_chunks_is_cut_at_max_tokens(hostile, monkeypatch):
    """Issue 32: a server that streams token chunks forever (bounded here at 5000) is read up to max_tokens token
    chunks plus the end-of-stream payloads, then the request fails saying so."""
    from mtpbench.backends import http
    from mtpbench.sweep.endpoint import Endpoint

    state, url = hostile
    read = []
    real = http._chunk
    monkeypatch.setattr(http, "_chunk", lambda payload, endpoint: read.append(payload) or real(payload, endpoint))
    endpoint = Endpoint(address=url, name="stub", timeout_s=2)
    body = {"model": "stub-model", "stream": True, "max_tokens": 16, "messages": [{"role": "user",
                                                                                   "content": "endless"}]}
    with httpx.Client(trust_env=False) as client:
        answer = http.send(client, endpoint, "chat/completions", body)
    assert "kept streaming after 16 token chunks" in answer.error, answer.error
    assert len(read) == 17, len(read)  # 16 token chunks, and the 17th that broke the limit


def test_an_unhealthy_endpoint_is_retried_on_rerun(cli, tmp_path, hostile, monkeypatch):
    """The unhealthy mark lasts for one sweep: a rerun asks the server again, and a server that recovered fills
    every cell."""
    state, url = hostile
    monkeypatch.chdir(tmp_path)
    res, runs, _ = _stalling_sweep(cli, tmp_path, url, "keepalive", 3, "--request-deadline", "1.5")
    assert set(runs["status"]) == {"failed"} and "passed its deadline of 1.5 s" in runs["error"].iloc[0]
    state.healthy = True
    res, runs, _ = _stalling_sweep(cli, tmp_path, url, "keepalive", 3, "--request-deadline", "1.5")
    assert res.exit_code == 0, res.stderr
    assert len(runs) == 6 and set(runs["status"]) == {"ok"}


def test_client_side_speed_is_sanity_checked():
    """Issue 17.10: tokens that arrive faster than any machine decodes are a failed measurement, not a figure."""
    from mtpbench.backends.http import Answer, RequestFailed, timing_fields

    with pytest.raises(RequestFailed, match="implausible client-side speed"):
        timing_fields(Answer(token_times=tuple(0.1 + i * 1e-7 for i in range(16)), completion_tokens=16))
    with pytest.raises(RequestFailed, match="in one chunk"):
        timing_fields(Answer(token_times=(0.2,), completion_tokens=16))
    assert timing_fields(Answer(token_times=tuple(0.1 + i * 0.01 for i in range(16))))["decode_tok_s"] > 0


# ------------------------------------------------------------------------------------------ 5. credentials


def test_credentials_in_endpoint_urls_never_reach_results_reports_or_logs(cli, tmp_path, hostile, monkeypatch):
    state, url = hostile
    monkeypatch.chdir(tmp_path)
    host = url.removeprefix("http://")
    endpoints = [f"userinfo=http://{SECRET_USER}:{SECRET_KEY}@{host}", f"query={url}?api_key={SECRET_QUERY}"]
    prompts = _chat_prompts(tmp_path / "creds.jsonl", ["ok", "echo401"])
    out = tmp_path / "res"
    res = cli("sweep", *[a for e in endpoints for a in ("--endpoint", e)], "--prompts", prompts, "--k", "1",
              "--temp", "0", "--max-tokens", "16", "--repeats", "1", "-o", out)
    assert res.exit_code == 1, res.stderr  # the two echo401 runs fail
    runs = read_table(out, "runs").set_index(["backend", "prompt_id"])
    assert set(runs.xs("ok", level="prompt_id")["status"]) == {"ok"}
    for backend in ("userinfo", "query"):
        err = runs.loc[(backend, "echo401"), "error"]
        assert "HTTP 401" in err and "***" in err and LEAK not in err, err
    # the ?api_key= base keeps its query on every request, after the path
    assert f"/v1/chat/completions?api_key={SECRET_QUERY}" in state.paths
    assert f"/v1/models?api_key={SECRET_QUERY}" in state.paths
    card = cli("card", out, "--model", "stub-model")
    _no_leak(out, tmp_path / "reports", res.stdout, res.stderr, card.stdout, card.stderr)
    assert list((tmp_path / "reports").glob("*.html"))


# ------------------------------------------------------------------------------------------ 4. prompt identity


def test_an_edited_prompt_is_rerun_and_said_so(cli, tmp_path, tiny):
    prompts = _code_prompts(tmp_path / "edit.jsonl", 2)
    out = tmp_path / "res"
    assert cli(*_quick(tiny, out, prompts)).exit_code == 0
    before = read_table(out, "runs").set_index("run_id")
    lines = prompts.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["prompt"] = "class Edited:\n    pass"
    prompts.write_text(lines[0] + "\n" + json.dumps(edited) + "\n")
    res = cli(*_quick(tiny, out, prompts))
    assert res.exit_code == 0, res.stderr
    assert "prompt text changed: edit/p1" in res.stderr and "rerunning" in res.stderr
    after = read_table(out, "runs")
    assert len(after) == len(before)  # rerun, not appended: no duplicates
    p1 = after[after["prompt_id"] == "p1"]
    assert set(p1["prompt_digest"]) != set(before[before["prompt_id"] == "p1"]["prompt_digest"])
    assert set(after[after["prompt_id"] == "p0"]["run_id"]) == set(before[before["prompt_id"] == "p0"].index)
    assert (out / "superseded" / "runs").is_dir()  # the old measurements are kept, out of the way


def test_two_prompt_files_with_one_stem_are_refused(cli, tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _code_prompts(tmp_path / "a" / "code.jsonl"), _code_prompts(tmp_path / "b" / "code.jsonl", text="x =")
    out = tmp_path / "res"
    line = _one_line_error(cli(*_quick(tiny, out, Path(f"{a},{b}"))))
    assert "'code'" in line and str(a.resolve()) in line and str(b.resolve()) in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 6. sweep file types


@pytest.mark.parametrize("toml,needle", [
    ('top_k = "abc"', "top_k"), ("out = 123", "out"), ('no_records = "false"', "no_records"),
    ('ignore_eos = "no"', "ignore_eos"), ("top_k = 2.9", "top_k"), (None, "invalid TOML"),
])
def test_sweep_file_values_of_the_wrong_type_are_one_line(cli, tmp_path, tiny, monkeypatch, toml, needle):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "sweep.toml"
    if toml is None:
        cfg.write_bytes(bytes(range(256)) * 4)  # a binary file
    else:
        cfg.write_text(toml + "\n")
    prompts = _code_prompts(tmp_path / "p.jsonl")
    line = _one_line_error(cli("sweep", "--config", cfg, "-m", tiny, "--prompts", prompts, "--k", "1",
                               "--quiet", "--no-report"))
    assert needle in line and str(cfg) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "sweep.toml"]  # nothing written


# ------------------------------------------------------------------------------------------ 7. the lock


def test_a_second_sweep_on_a_busy_directory_is_refused_naming_the_pid(cli, tmp_path, tiny):
    prompts = _code_prompts(tmp_path / "p.jsonl", 1)
    out = tmp_path / "res"
    long = _quick(tiny, out, prompts, "--repeats", "500", "--max-tokens", "64")
    proc = subprocess.Popen([sys.executable, "-m", "mtpbench", *long], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and (out / "manifest.json").exists()
        before = _snapshot(out)
        line = _one_line_error(cli(*long))
        assert f"PID {proc.pid}" in line and "in use" in line
        assert _snapshot(out).keys() >= before.keys()  # the first sweep's files are all still there
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the killed holder's lock: the next command gets past it
    line = _one_line_error(cli(*_quick(tiny, out, prompts)))  # another spec: refused for that, not for the lock
    assert "holds a different sweep" in line


def test_two_competing_sweeps_then_kill_9_lose_nothing_and_duplicate_nothing(tmp_path, tiny):
    """Issue 17.7 with kill -9: two processes start the same sweep on one new directory at once; one runs, the
    other is refused naming it; the runner is killed at a random moment; a rerun completes every cell once."""
    import random

    prompts = _code_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "mtpbench", *_quick(tiny, out, prompts, "--repeats", "3", "--max-tokens", "24")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read().strip()
        assert loser.returncode == 2 and err == err.splitlines()[0], err
        assert f"PID {winner.pid}" in err and "in use" in err
        while len(list((out / "runs").glob("part-*.parquet"))) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
        winner.kill()
        winner.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert rerun.returncode == 0, rerun.stderr
    runs = read_table(out, "runs")
    assert runs["run_id"].is_unique and runs["cell_id"].nunique() == 2 * 3 and len(runs) == 2 * 3 * 2
    assert set(runs["status"]) == {"ok"} and not list(out.rglob(".tmp-*"))


# ------------------------------------------------------------------------------------------ 8. damaged parts


def test_a_corrupt_runs_part_is_reported_skipped_and_rerun(cli, tmp_path, done_sweep, tiny):
    out = _copy(done_sweep, tmp_path / "res")
    victim = sorted((out / "runs").glob("part-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-file
    page = tmp_path / "page.html"
    res = cli("report", out, "-o", page)
    assert res.exit_code == 0, res.stderr
    assert victim.name in res.stderr and len(res.stderr.strip().splitlines()) == 1
    html = page.read_text()
    assert "damaged" in html and victim.name in html
    card = cli("card", out)
    assert card.exit_code == 0 and victim.name in card.stderr
    # a resumed sweep reruns the damaged cell, and only it
    res = cli(*_quick(tiny, out, done_sweep.parent / "two.jsonl")[:-1])
    assert res.exit_code == 0, res.stderr
    assert "resumed: 1 of 2 cells were already done" in res.stdout
    assert len(read_table(out, "runs")) == 2 * 2 and pq.read_metadata(victim)


# ------------------------------------------------------------------------------------------ 9. a real server


@pytest.fixture(scope="module")
def mlx_server_no_cache(tiny_agree, tmp_path_factory) -> Iterator[str]:
    """`python -m mlx_lm server` with HF_HUB_CACHE pointing at a directory that does not exist (a fresh machine):
    its /v1/models then answers HTTP 500."""
    port, tmp = free_port(), tmp_path_factory.mktemp("mlx-server-nocache")
    with mlx_lm_server(tiny_agree, tmp, tmp / "no-such-cache", port) as url:  # it answers, with whatever status
        yield url


def test_a_real_server_without_a_hub_cache_falls_back_to_model(cli, tmp_path, tiny_agree, mlx_server_no_cache):
    url = mlx_server_no_cache
    # mlx_lm.server 0.32 sends its 200 headers, then fails scanning the missing cache: no usable body
    answer = httpx.get(f"{url}/models", timeout=10, trust_env=False)
    status = answer.status_code
    try:
        listed = status < 400 and "data" in answer.json()
    except ValueError:
        listed = False
    assert not listed, "this mlx_lm.server lists models without a hub cache: the case is gone"
    prompts = _chat_prompts(tmp_path / "real.jsonl", ["def add(a, b):"])
    base = ["--prompts", prompts, "--k", "1", "--temp", "0", "--max-tokens", "8", "--repeats", "1", "--quiet",
            "--no-report", "--request-timeout", "30"]
    out = tmp_path / "fallback"
    res = cli("sweep", "--endpoint", f"mlx={url}", "-m", tiny_agree, "-o", out, *base)
    assert res.exit_code == 0, res.stderr
    said = [line for line in res.stderr.splitlines() if "/models failed" in line]
    assert len(said) == 1 and f"HTTP {status}" in said[0] and "using --model's" in said[0], res.stderr
    runs = read_table(out, "runs")
    server = runs[runs["backend"] == "mlx"]
    assert len(server) == 1 and set(server["status"]) == {"ok"} and set(server["model"]) == {str(tiny_agree)}
    assert set(runs["status"]) == {"ok"}

    out = tmp_path / "no-fallback"
    res = cli("sweep", "--endpoint", f"mlx={url}", "-o", out, *base)
    assert res.exit_code == 1
    err = read_table(out, "runs")["error"].iloc[0]
    assert err.startswith("could not learn the served model: ") and f"{url}/models" in err, err
    assert f"HTTP {status}" in err and ": ;" not in err and "pass --served-model" in err, err
    assert err in res.stderr or "could not learn the served model" in res.stderr


# ------------------------------------------------------------------------------------------ 10. smaller items


def test_a_prompt_file_that_is_not_utf8_is_one_line(cli, tmp_path, tiny):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"id": "p0", "category": "code", "prompt": "caf"}).encode()[:-2] + b"\xe9\"}\n")
    line = _one_line_error(cli(*_quick(tiny, tmp_path / "res", bad)))
    assert "not UTF-8" in line and str(bad) in line and not (tmp_path / "res").exists()


def test_a_full_disk_is_one_line_and_earlier_parts_stay_whole(cli, tmp_path, tiny, monkeypatch):
    prompts = _code_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "res"
    real, calls = pq.write_table, []

    def full_after_one_cell(table, where, *a, **kw):
        calls.append(where)
        if len(calls) > 3:  # steps, tokens and runs of the first cell went through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where, *a, **kw)

    monkeypatch.setattr(pq, "write_table", full_after_one_cell)
    line = _one_line_error(cli(*_quick(tiny, out, prompts)))
    assert "No space left on device" in line
    monkeypatch.setattr(pq, "write_table", real)
    assert len(read_table(out, "runs")) == 2 and not list(out.rglob(".tmp-*"))
    res = cli(*_quick(tiny, out, prompts)[:-1])
    assert res.exit_code == 0 and "resumed: 1 of 2" in res.stdout


def _sharded_copy(layout_dirs, tmp_path: Path) -> Path:
    return _copy(layout_dirs["sharded-inline"], tmp_path / "sharded")


def test_a_shard_missing_from_an_index_is_named(cli, tmp_path, layout_dirs):
    ck = _sharded_copy(layout_dirs, tmp_path)
    (ck / "model-00002-of-00002.safetensors").unlink()
    line = _one_line_error(cli("inspect", ck))
    assert "model-00002-of-00002.safetensors" in line and "missing" in line


def test_an_index_entry_outside_the_checkpoint_is_refused(cli, tmp_path, layout_dirs):
    ck = _sharded_copy(layout_dirs, tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shutil.move(ck / "model-00002-of-00002.safetensors", tmp_path / "elsewhere.safetensors")
    index["weight_map"] = {k: ("../elsewhere.safetensors" if v.startswith("model-00002") else v)
                           for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _one_line_error(cli("inspect", ck))
    assert "../elsewhere.safetensors" in line and "outside" in line


def test_stale_shards_beside_a_new_single_file_are_refused(cli, tmp_path, layout_dirs, tiny):
    ck = _sharded_copy(layout_dirs, tmp_path)
    shutil.copy(tiny / "model.safetensors", ck / "model.safetensors")
    before = _snapshot(ck)
    line = _one_line_error(cli("inspect", ck))
    assert "model.safetensors" in line and "model-00001-of-00002.safetensors" in line
    assert _snapshot(ck) == before


def test_a_nan_lm_head_gives_failed_rows(cli, tmp_path, tiny):
    import mlx.core as mx

    ck = _copy(tiny, tmp_path / "nan-head")
    weights = mx.load(str(ck / "model.safetensors"))
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key] = mx.full(weights[key].shape, float("nan"), dtype=weights[key].dtype)
    mx.save_safetensors(str(ck / "model.safetensors"), weights, metadata={"format": "mlx"})
    out = tmp_path / "res"
    res = cli(*_quick(ck, out, _code_prompts(tmp_path / "p.jsonl")))
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    runs = read_table(out, "runs")
    assert len(runs) == 2 and set(runs["status"]) == {"failed"}
    assert runs["error"].str.contains("not finite").all(), list(runs["error"])


def test_stale_temporaries_are_cleaned_on_rerun_and_only_ours(cli, tmp_path, done_sweep, tiny):
    out = _copy(done_sweep, tmp_path / "res")
    ours = [out / ".tmp-k2j3h4", out / "runs" / ".tmp-a8sd7f", out / "tokens" / ".tmp-zz"]
    for f in ours:
        f.write_bytes(b"half a part")
    theirs = [out / "runs" / "notes.tmp", out / "runs" / "tmp-keep"]
    for f in theirs:
        f.write_text("the user's")
    res = cli(*_quick(tiny, out, done_sweep.parent / "two.jsonl"))
    assert res.exit_code == 0, res.stderr
    assert not any(f.exists() for f in ours)
    assert all(f.read_text() == "the user's" for f in theirs)


def test_report_checks_schema_versions_when_merging(cli, tmp_path, done_sweep):
    newer = _copy(done_sweep, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    line = _one_line_error(cli("report", done_sweep, newer, "-o", tmp_path / "r.html"))
    assert "schema 99" in line and not (tmp_path / "r.html").exists()
    unversioned = _copy(done_sweep, tmp_path / "unversioned")
    (unversioned / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                           if k != "schema_version"}))
    _one_line_error(cli("report", done_sweep, unversioned, "-o", tmp_path / "r.html"))
    old = Path(__file__).parent / "data" / "schema1-sweep"  # an older schema is converted, then merged
    res = cli("report", done_sweep, old, "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.stderr


def test_make_tiny_never_overwrites_a_checkpoint_unless_forced(cli, tmp_path):
    ck = tmp_path / "t"
    assert cli("make-tiny", ck).exit_code == 0
    before = _snapshot(ck)
    line = _one_line_error(cli("make-tiny", ck, "--seed", "7"))
    assert str(ck) in line and "--force" in line and _snapshot(ck) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _one_line_error(cli("make-tiny", mine))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert cli("make-tiny", ck, "--seed", "7", "--force").exit_code == 0
    assert _snapshot(ck) != before


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """A read-only directory (a read-only bind mount: root writes through chmod)."""
    src, ro = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if os.geteuid() != 0:
        src.chmod(0o555)
        yield src
        src.chmod(0o755)
        return
    ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(ro)], capture_output=True)
        pytest.skip("running as root without mount rights: cannot make a read-only directory")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_read_only_working_directory(cli, tmp_path, tiny, read_only_dir, monkeypatch):
    monkeypatch.chdir(read_only_dir)
    prompts = _code_prompts(tmp_path / "p.jsonl")
    args = ["sweep", "-m", tiny, "--k", "1", "--temp", "0", "--max-tokens", "8", "--repeats", "1", "--prompts",
            prompts, "--quiet"]
    line = _one_line_error(cli(*args))  # default --out under the read-only directory: refused before any work
    assert "cannot write results" in line and not any(read_only_dir.iterdir())
    out = tmp_path / "res"
    res = cli(*args, "-o", out)  # results elsewhere: written, and one line says the report could not be
    assert len(read_table(out, "runs")) == 2 and "Traceback" not in res.stderr
    warn = [x for x in res.stderr.splitlines() if "report" in x]
    assert len(warn) == 1 and "reports" in warn[0], res.stderr


def test_the_markdown_card_escapes_raw_html_in_names(cli, tmp_path, done_sweep):
    from mtpbench.sweep.store import part_name, write_part

    out = _copy(done_sweep, tmp_path / "res")
    evil = "<img src=x onerror=alert(1)>"
    for table in ("runs", "verdicts"):
        for f in (out / table).glob("part-*.parquet"):
            rows = pq.read_table(f).to_pylist()
            write_part(out, table, part_name(f), [{**r, "model": evil} for r in rows])
    res = cli("card", out, "--model", evil)
    assert res.exit_code == 0, res.stderr
    assert "<img" not in res.stdout and "&lt;img" in res.stdout
