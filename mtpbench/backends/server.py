"""A running inference server (vLLM, SGLang, mlx_lm.server, MTPLX, ...) as a backend, over its OpenAI API.

The server is a black box: mtpbench sees only what comes over HTTP. Timing is client-side (request start -> first
streamed token is the TTFT; gaps between streamed chunks give the inter-token latency), and speculative counters
come from the server's own `/metrics`, read before and after each batch (`metrics.py`). One part per (endpoint,
cell); a part whose every request failed is run again on resume. Every request (`http.py`) is bounded in time
and size, and every failure is a row with its reason, never an exception.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from ..provenance import now_iso
from ..sweep.axes import SERVER
from ..sweep.rows import CellRows, run_row
from ..sweep.spec import Cell, SweepSpec, thinking_flag
from ..sweep.prompts import encode
from .audit import REPEAT, UNAUDITED, Audit, assumption, audit_run, detect_profile, logprobs_request
from .base import OnRun
from ..sweep.endpoint import Endpoint
from .http import Answer, RequestFailed, complete, send, served_model_entries, timing_fields
from .metrics import counter_fields, fetch_spec_counters


def request_body(cell: Cell, model: str, max_tokens: int, ignore_eos: bool,
                 audit_profile: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one cell's request: every sampling value sent explicitly, so server defaults
    (e.g. a model's generation_config) never change what is measured. An audited sampled cell (`audit_profile`
    not None) also asks for the tokens' log-probs and ids."""
    s = cell.setting
    body: dict[str, Any] = {
        "model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p, "seed": cell.seed,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    p = cell.prompt
    if audit_profile is not None and s.temperature > 0:
        body.update(logprobs_request())
    if p.completion:
        return "completions", {**body, "prompt": p.raw_text()}
    thinking = thinking_flag(cell.thinking)
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    return "chat/completions", {**body, "messages": p.chat_messages()}


@dataclass(frozen=True)
class Batch:
    """One concurrency level of one cell: its answers and the counter fields of the whole batch."""

    concurrency: int
    order: int
    started_at: str
    answers: tuple[Answer, ...]
    counters: dict[str, Any]


def measured(a: Answer) -> tuple[dict[str, Any] | None, str]:
    """(runs fields, error) of one answer: a failed request, or an answer whose timing is implausible, fails."""
    if a.error:
        return None, a.error
    try:
        return timing_fields(a), ""
    except RequestFailed as e:
        return None, str(e)


class ServerBackend:
    """One endpoint during a sweep: its HTTP client, its served model (asked once) and its warm-up."""

    kind = SERVER

    def __init__(self, spec: SweepSpec, endpoint: Endpoint, sweep: str = "", fallback_model: str | None = None,
                 say=None):
        self.spec, self.endpoint, self.sweep = spec, endpoint, sweep
        self.name = endpoint.name
        self.fallback_model = fallback_model
        self.say = say or (lambda _line: None)
        self.client: httpx.Client | None = None
        self.model: str | None = None
        self.model_note = ""  # how the served model was learned, or why it is unknown
        self.model_error = ""
        self.audit_bundle = None  # the local checkpoint an audit rescores with (`Endpoint.audit_model`)
        self.profile: str | None = None  # the audit's sampling profile ('' when auto could not decide)
        self.profile_note = ""

    def takes(self, cell: Cell) -> bool:
        return cell.backend == SERVER

    def part(self, cell: Cell) -> str:
        return f"{self.endpoint.name}-{cell.cell_id}"

    def runs_in(self, cell: Cell) -> int:
        return len(self.endpoint.concurrency)

    def prepare(self) -> None:
        e = self.endpoint
        top = max(e.concurrency)
        self.client = httpx.Client(
            headers=e.headers(), timeout=httpx.Timeout(e.timeout_s), trust_env=False, follow_redirects=False,
            limits=httpx.Limits(max_connections=top + 1, max_keepalive_connections=top + 1))
        entries, error = None, ""
        if not e.served_model or (e.audit_model and e.audit_profile == "auto"):
            try:
                entries = served_model_entries(self.client, e)
            except RequestFailed as err:
                error = str(err)
        if e.audit_model:
            from ..model.checkpoint import load

            self.audit_bundle = load(e.audit_model)
            self.profile, self.profile_note = detect_profile(e.audit_profile, entries, error)
        if e.served_model:
            self.model, self.model_note = e.served_model, "given with --served-model"
        elif entries:
            self.model, self.model_note = entries[0]["id"], "the first at /models"
        elif self.fallback_model:
            self.model = self.fallback_model
            self.model_note = f"/models failed ({error}); using --model's {self.fallback_model!r}"
            self.say(f"{e.name}: {self.model_note}")
        else:
            self.model_error = f"could not learn the served model: {error}; pass --served-model"
            self.say(f"{e.name}: {self.model_error}")

    def manifest_entry(self) -> tuple[str, str, dict[str, Any]]:
        audit = {"audit": {"model": self.endpoint.audit_model, "profile": self.profile or None,
                           "profile_source": self.profile_note,
                           "assumption": assumption(str(self.endpoint.audit_model))}} if self.audit_bundle else {}
        return "endpoints", self.name, {**self.endpoint.record(), "served_model": self.model,
                                        "served_model_source": self.model_note or self.model_error, **audit}

    def warm_up(self, cell: Cell) -> None:
        """One unrecorded request, so model loading and first-call costs never land in a timed row."""
        n = min(self.spec.warmup_tokens, cell.max_tokens)
        if self.model is None or n < 1 or self.client is None:
            return
        path, body = request_body(cell, self.model, n, ignore_eos=True)
        answer = send(self.client, self.endpoint, path, body)
        if answer.error:
            self.say(f"{self.name}: warm-up failed: {answer.error}")

    def _batch(self, cell: Cell, concurrency: int, order: int) -> Batch:
        """`concurrency` identical requests at once, between two reads of the speculative counters."""
        assert self.client is not None and self.model is not None
        path, body = request_body(cell, self.model, cell.max_tokens, self.spec.ignore_eos, self._profile())
        before = fetch_spec_counters(self.client, self.endpoint)
        started = now_iso()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = tuple(pool.map(lambda _: send(self.client, self.endpoint, path, body), range(concurrency)))
        after = fetch_spec_counters(self.client, self.endpoint) if before is not None else None
        delta = after.minus(before) if after is not None and before is not None else None
        return Batch(concurrency, order, started, answers, counter_fields(delta))

    def _profile(self) -> str | None:
        """The audit's profile when this endpoint is audited (None: not audited)."""
        return self.profile if self.audit_bundle is not None else None

    def _audit(self, cell: Cell, answer: Answer, run_id: str, rows: CellRows, first: bool) -> dict[str, Any]:
        """Rescore one sampled answer (tokens rows into `rows`); returns its runs fields (audit status, profile,
        rescoring seconds). Only a cell's first run is audited: the others (concurrency levels, parallel requests)
        repeat its request with the same seed, and a seeded server repeats its sample, which would count twice."""
        if self.audit_bundle is None or cell.setting.temperature == 0:
            return {}
        if not first:
            return {"audit": REPEAT, "audit_profile": self.profile or None, "audit_model": self.endpoint.audit_model}
        ids = encode(self.audit_bundle.tokenizer, cell.prompt, thinking_flag(cell.thinking))
        replay = None
        if answer.token_ids is None and self.client is not None and self.model is not None:
            # mlx_lm.server names token ids only outside streams: ask once more, unstreamed (outside all timing)
            replay = complete(self.client, self.endpoint, *request_body(cell, self.model, cell.max_tokens,
                                                                        self.spec.ignore_eos, self.profile or ""))
        try:
            audit = audit_run(self.audit_bundle, ids, answer, cell.setting.config(cell.seed), self.profile or "",
                              run_id, replay)
        except Exception as e:  # a failed audit is a recorded reason, never a lost measurement
            audit = Audit(f"{UNAUDITED}{type(e).__name__}: {e}"[:300], [], 0.0)
        rows.tokens += audit.tokens
        return {"audit": audit.status, "audit_profile": self.profile or None,
                "audit_model": self.endpoint.audit_model, "rescore_s": audit.seconds or None}

    def _facts(self) -> dict[str, Any]:
        e = self.endpoint
        return {"backend": e.name, "model": self.model, "model_path": e.url, "device": f"server {e.url}"}

    def run_cell(self, cell: Cell, on_run: OnRun | None = None) -> CellRows:
        """Server counters cover a whole batch, so they go on its first row only (sums over rows stay exact; the
        other rows' counters are null, i.e. unknown)."""
        rows = CellRows()
        audited = False
        for order, c in enumerate(self.endpoint.concurrency):
            batch = self._batch(cell, c, order) if self.model is not None else \
                Batch(c, order, now_iso(), (Answer(error=self.model_error),) * c, {})
            speeds = []
            for i, a in enumerate(batch.answers):
                fields, error = measured(a)
                run_id = f"{self.endpoint.name}-{cell.cell_id}-c{c}-{i}"
                if fields is not None:
                    fields = {**fields, **(batch.counters if i == 0 else {}),
                              **self._audit(cell, a, run_id, rows, first=not audited)}
                    audited = audited or "audit" in fields
                    speeds.append(fields.get("decode_tok_s") or np.nan)
                rows.runs.append(run_row(cell, self._facts(), self.endpoint.mode, 0, batch.order, batch.started_at,
                                         self.sweep, {**(fields or {}), "concurrency": c}, error, run_id=run_id))
            if on_run:
                on_run(f"{self.name} {cell.prompt.id} c={c}", float(np.nanmean(speeds)) if speeds else float("nan"))
        return rows

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.audit_bundle = None
