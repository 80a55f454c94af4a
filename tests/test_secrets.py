"""No credential in any file (issue 32): a server that echoes the Authorization header (and the URL it was asked)
back in every place an answer can carry text, and every file a sweep and its report write is grepped for every
encoding of every credential the client sent."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mtpbench.sweep.endpoint import Endpoint
from mtpbench.cli.main import main
from mtpbench.secrets import encodings, redact_command, redact_urls, scrub
from mtpbench.sweep.store import read_table
from tests.conftest import loopback
from tests.test_server_backend import StubHandler, StubState, prompt_file

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD, QUERY_KEY, BEARER = "alice-SeCrEt0", "pw-SeCrEt123", "qs-SeCrEt456", "sk-SeCrEt789"
KEY_VAR = "MTPBENCH_TEST_SECRET_KEY"


def _forms() -> dict[str, str]:
    """Every encoding of the credentials the client sends, by what it is."""
    pair = f"{USER}:{PASSWORD}"
    b64 = base64.b64encode(pair.encode()).decode()
    return {"user": USER, "password": PASSWORD, "query key": QUERY_KEY, "bearer key": BEARER,
            "basic base64": b64.rstrip("="), "basic pair": pair, "percent-encoded pair": quote(pair, safe=""),
            "bearer base64": base64.b64encode(BEARER.encode()).decode().rstrip("=")}


class Echo(StubHandler):
    """Echoes what it was sent (the Authorization header, the path with its query) in every place an answer can
    carry text: /models entries, error bodies, a non-SSE body, a mid-stream error, a finish reason, bad JSON."""

    def _seen(self) -> str:
        auth = self.headers.get("Authorization", "")
        decoded = base64.b64decode(auth.split()[-1]).decode() if auth.startswith("Basic ") else ""
        return f"auth={auth} decoded={decoded} path={self.path}"

    def do_GET(self) -> None:
        self.state.auth.append(self.headers.get("Authorization", ""))
        if self.path.split("?")[0] == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "stub-model", "owned_by": self._seen()},
                                                                   {"id": self._seen()}]}).encode())
        else:
            self._send(404, self._seen().encode(), "text/plain")

    def do_POST(self) -> None:
        self.state.auth.append(self.headers.get("Authorization", ""))
        super().do_POST()

    def _echo401(self, body: dict) -> None:
        self._send(401, json.dumps({"error": {"message": f"bad credentials {self._seen()}"}}).encode())

    def _echo_html(self, body: dict) -> None:
        self._send(200, f"<html>{self._seen()}</html>".encode(), "text/html")

    def _echo_midstream(self, body: dict) -> None:
        self._events([self._delta("t0"), {"error": {"message": self._seen()}}])

    def _echo_finish(self, body: dict) -> None:
        self._events([self._delta(f"t{i}") for i in range(4)] + [self._delta("", self._seen()[:200]), "[DONE]"])

    def _echo_badjson(self, body: dict) -> None:
        self._events([f"not json {self._seen()}"])


ECHOES = ["echo401", "echo_html", "echo_midstream", "echo_finish", "echo_badjson"]


@pytest.fixture
def echo() -> Iterator[tuple[StubState, str]]:
    state = StubState()
    state.auth = []
    with loopback(type("E", (Echo,), {"state": state}), state.release.set) as url:
        yield state, url


def _files(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file under `root` as text: raw bytes, and for parquet also the text of every value (compression would
    hide a value from a byte grep)."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p, p.read_bytes().decode("utf-8", "replace")
            if p.suffix == ".parquet":
                yield p, pq.read_table(p).to_pandas().astype(str).to_csv()


def _grep(root: Path, texts: dict[str, str]) -> int:
    """Assert no encoding of a credential is in any file under `root` nor in `texts`; returns the files grepped."""
    forms = _forms()
    n = 0
    for p, text in _files(root):
        n += 1
        for what, form in forms.items():
            assert form not in text, f"{what} ({form}) stored in {p}"
    for name, text in texts.items():
        for what, form in forms.items():
            assert form not in text, f"{what} ({form}) in {name}"
    return n


def test_no_encoding_of_a_credential_reaches_any_file(echo, tmp_path):
    """A sweep and its reports against a server that echoes every credential back, in every form: the stored
    command line, the rows, the manifest, the HTML report (its "Reproduce with"), the card and every log line hold
    none of them. The sweep runs as `python -m mtpbench` so the manifest stores the real command line."""
    state, url = echo
    host = url.removeprefix("http://")
    prompts = prompt_file(tmp_path / "echo.jsonl",
                          [{"id": k, "category": "chat", "prompt": k} for k in ["ok", *ECHOES]])
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "mtpbench", "sweep", "--endpoint", f"basic=http://{USER}:{PASSWORD}@{host}",
           "--endpoint", f"query={url}?api_key={QUERY_KEY}&x=1", "--prompts", str(prompts), "--k", "1", "--temp",
           "0", "--max-tokens", "8", "--repeats", "1", "-o", str(out), "--request-timeout", "5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1, res.stderr  # the echo cells fail
    runs = read_table(out, "runs").set_index(["backend", "prompt_id"])
    assert set(runs.xs("ok", level="prompt_id")["status"]) == {"ok"}
    assert runs.loc[("basic", "echo401"), "error"].startswith("HTTP 401")
    assert runs.loc[("basic", "echo_finish"), "status"] == "ok"  # the echoed finish reason is stored scrubbed
    assert "***" in runs.loc[("basic", "echo_finish"), "finished_by"]
    assert any(a.startswith("Basic ") for a in state.auth)  # the client did send them
    command = json.loads((out / "manifest.json").read_text())["command"]
    assert "basic=http://***@127.0.0.1" in command and "api_key=***" in command and "x=1" in command, command
    runner = CliRunner()
    page = runner.invoke(main, ["report", str(out), "-o", str(tmp_path / "page.html")], catch_exceptions=False)
    card = runner.invoke(main, ["card", str(out), "--model", "stub-model"], catch_exceptions=False)
    assert page.exit_code == 0 and "Reproduce with" in (tmp_path / "page.html").read_text()
    assert "api_key=***" in (tmp_path / "page.html").read_text()
    n = _grep(tmp_path, {"stdout": res.stdout, "stderr": res.stderr, "report log": page.output,
                         "card": card.output})
    assert n >= 10 and list((tmp_path / "reports").glob("*.html"))
    print(f"\ngrepped {n} files (results, manifest, reports) and 4 logs for {len(_forms())} encodings: none found")


def test_url_credentials_with_an_api_key_say_which_auth_is_sent(echo, tmp_path, monkeypatch):
    """User info in the URL and --api-key-env: one Authorization header can carry only one; the bearer key is sent
    (never silently dropped), one line says so, and the query key is sent as well."""
    state, url = echo
    monkeypatch.setenv(KEY_VAR, BEARER)
    monkeypatch.chdir(tmp_path)
    host = url.removeprefix("http://")
    prompts = prompt_file(tmp_path / "p.jsonl", [{"id": k, "category": "chat", "prompt": k}
                                                 for k in ["ok", "echo401"]])
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["sweep", "--endpoint", f"both=http://{USER}:{PASSWORD}@{host}?api_key={QUERY_KEY}",
                                    "--api-key-env", KEY_VAR, "--prompts", str(prompts), "--k", "1", "--temp", "0",
                                    "--max-tokens", "8", "--repeats", "1", "-o", str(out), "--quiet", "--no-report"],
                             catch_exceptions=False)
    said = [line for line in res.stderr.splitlines() if "user info" in line]
    assert len(said) == 1 and KEY_VAR in said[0] and "bearer" in said[0] and "query" in said[0], res.stderr
    assert set(state.auth) == {f"Bearer {BEARER}"}, state.auth
    runs = read_table(out, "runs").set_index("prompt_id")
    assert runs.loc["ok", "status"] == "ok"
    assert "auth=*** " in runs.loc["echo401", "error"] and "api_key=***" in runs.loc["echo401", "error"]
    _grep(out, {"stderr": res.stderr, "stdout": res.stdout})


def test_redaction_and_scrubbing_units():
    argv = ["sweep", "--endpoint", f"a=https://{USER}:{PASSWORD}@h.example:8443/v1?api_key={QUERY_KEY}&top=2",
            "--endpoint", f"http://h/v1?access_token={QUERY_KEY}", "--prompts", "my file.jsonl"]
    line = redact_command(argv)
    assert line.startswith("mtpbench sweep ") and "'my file.jsonl'" in line
    assert "a=https://***@h.example:8443/v1?api_key=***&top=2" in line and "access_token=***" in line
    assert USER not in line and PASSWORD not in line and QUERY_KEY not in line
    assert redact_urls("see http://h/v1?Password=x&token=y&k=v") == "see http://h/v1?Password=***&token=***&k=v"
    forms = encodings([USER, PASSWORD, QUERY_KEY], [(USER, PASSWORD)], [BEARER])
    text = " ".join(_forms().values())
    assert all(f not in scrub(text, forms) for f in _forms().values())
    e = Endpoint(address=f"http://{quote(USER)}:{quote(PASSWORD + '@x', safe='')}@h:1/v1?key={QUERY_KEY}")
    b64 = base64.b64encode(f"{USER}:{PASSWORD}@x".encode()).decode()
    assert e.scrub(f"Basic {b64} / {PASSWORD}@x / {QUERY_KEY}") == "*** / *** / ***"
    assert e.url == "http://***@h:1/v1?key=***"
