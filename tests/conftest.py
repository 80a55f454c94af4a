"""Session fixtures: tiny checkpoints built once, in every layout users meet."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (two workers, `addopts`), give each worker its own share of this process's cores, before
    mlx starts its threads: mlx's host thread and CPU-stream thread hand off at every evaluation, and two workers'
    threads spread over the same two cores cost more in cross-core wake-ups than they overlap (README, CPU
    affinity). Subprocesses inherit the share; outside xdist, or with fewer cores than workers, nothing changes."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if count < 2 or len(cores) < count:
        return
    share = set(cores[int(worker[2:]) % count::count])
    for tid in os.listdir("/proc/self/task"):  # every thread already started, not only this one
        try:
            os.sched_setaffinity(int(tid), share)
        except OSError:
            pass


_pin_xdist_worker()
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from mtpbench.model.checkpoint import load
from mtpbench.cli.main import main
from mtpbench.builders.tiny import TinySpec, make_tiny

LAYOUTS = {
    "inline-mtp": TinySpec(),  # exactly as Qwen publishes Qwen3.5 on Hugging Face
    "mlx-inline-mtp": TinySpec(layout="mlx"),
    "mlx-model.mtp": TinySpec(layout="mlx", mtp_prefix="model.mtp."),
    "mlx-language_model.mtp": TinySpec(layout="mlx", mtp_prefix="language_model.mtp."),
    "inline-model.language_model.mtp-hf": TinySpec(mtp_prefix="model.language_model.mtp."),
    "mlx-sidecar": TinySpec(layout="mlx", mtp_layout="sidecar"),
    "sidecar-hf-sharded": TinySpec(mtp_layout="sidecar", shards=3),
    "sharded-inline": TinySpec(layout="mlx", shards=2, mtp_prefix="model.mtp."),
    "bf16-hf-language_model.mtp": TinySpec(dtype="bfloat16", mtp_prefix="language_model.mtp."),
}


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def layout_dirs(ckpt_root) -> dict[str, Path]:
    return {name: make_tiny(ckpt_root / name, spec) for name, spec in LAYOUTS.items()}


@pytest.fixture(scope="session")
def tiny(layout_dirs) -> Path:
    """The plain tiny checkpoint (seed 0, Hugging Face layout, MTP inline under `mtp.`): random, drafts rarely
    accepted."""
    return layout_dirs["inline-mtp"]


@pytest.fixture(scope="session")
def tiny_agree(ckpt_root) -> Path:
    """A tiny checkpoint whose head is built to agree with the trunk: real acceptance at every temperature."""
    return make_tiny(ckpt_root / "agree", TinySpec(seed=1, agree=0.9))


@pytest.fixture(scope="session")
def tiny_agree2(ckpt_root) -> Path:
    """A second agreeing checkpoint (other seed, MLX layout, sharded sidecar)."""
    return make_tiny(ckpt_root / "agree2", TinySpec(seed=2, agree=0.9, layout="mlx", shards=2, mtp_layout="sidecar"))


@pytest.fixture(scope="session")
def tiny_kv(ckpt_root) -> Path:
    """An agreeing checkpoint with 32-wide attention heads, so its KV cache can be quantized."""
    return make_tiny(ckpt_root / "kv", TinySpec(seed=3, agree=0.9, head_dim=32))


@pytest.fixture(scope="session")
def tiny_no_mtp(ckpt_root) -> Path:
    return make_tiny(ckpt_root / "no-mtp", TinySpec(mtp=False))


@pytest.fixture(scope="session")
def bundle_agree(tiny_agree):
    return load(tiny_agree)


@pytest.fixture(scope="session")
def bundle(tiny):
    return load(tiny)


@pytest.fixture
def cli():
    """Invoke the `mtpbench` CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@contextmanager
def mlx_lm_server(model: Path, tmp: Path, hf_cache: Path, port: int,
                  ready: Callable[[httpx.Response], bool] = lambda r: True) -> Iterator[str]:
    """`python -m mlx_lm server --model MODEL` on 127.0.0.1:PORT with HF_HUB_CACHE at `hf_cache` and the hub
    offline; yields its /v1 URL once /v1/models answers as `ready` accepts (60 s at most), stops it after."""
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlx_lm server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if ready(httpx.get(f"{url}/models", timeout=2, trust_env=False)):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlx_lm server did not answer /v1/models within 60 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextmanager
def loopback(handler: type[BaseHTTPRequestHandler], before_close: Callable[[], None] = lambda: None) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (a free port) with `handler`; yields its /v1 URL. `before_close` runs
    first on the way out (e.g. releases a handler stuck in a slow answer), then the server stops."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        before_close()
        server.shutdown()
        server.server_close()
        thread.join(5)
