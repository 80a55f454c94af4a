"""mtpbench's own decoder as a backend: one checkpoint under one quantization policy, AR and MTP at every K.

A cell's runs go AR then each K (reversed on odd repetitions: ABBA), on the same prompt ids, after a warm-up per
group of like cells. Before any work `check` tokenizes every prompt with every checkpoint's tokenizer and checks
the position budget and the KV-cache settings, so bad input ends before a model is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..decode import DecodeResult, generate_ar, generate_mtp
from ..decode.rescore import Prefix, Rescoring, fresh_prefix, greedy_gaps, rescore
from ..errors import UserError
from ..machine import snapshot
from ..model.checkpoint import Bundle, context_length, load, preflight, read_config, text_config
from ..model.kvcache import KVCacheSpec
from ..model.roofline import (bytes_per_token, copy_bandwidth, draft_step_bytes, kv_bytes_per_step, kv_layout,
                              weight_bytes)
from ..provenance import now_iso
from ..sweep.axes import NATIVE, REFERENCE, context_label
from ..sweep.longctx import bucket_prompts, edge_lines, load_documents
from ..sweep.prompts import Prompt, encode, supports_thinking
from ..sweep.rows import CellRows, record_rows, run_row
from ..sweep.spec import Cell, SweepSpec, thinking_flag
from .base import OnRun

DRAFTED_NOTHING = "drafted nothing: generation ended after the first token, so MTP was never exercised"
NOT_FINITE = "the model's logits are not finite (NaN or inf) on a probe token: broken or mis-converted weights"


def logits_finite(bundle: Bundle) -> bool:
    """One forward of one token: NaN or inf logits (a broken lm head, a bad conversion) make every run of this
    checkpoint meaningless, so its rows fail with the reason instead of reading `ok` with log-prob -inf."""
    import mlx.core as mx

    logits = bundle.model(mx.array([[0]]))
    return bool(mx.all(mx.isfinite(logits)).item())


def display_names(models: tuple[str, ...]) -> dict[str, str]:
    """A short name per checkpoint for tables and titles: the directory name (or the repo id), with parent
    directories added only where two would read the same. The full path stays in `model_path`."""
    def parts(m: str) -> list[str]:
        p = Path(m).expanduser()
        return list(p.resolve().parts) if p.exists() else [m]

    names = {m: parts(m) for m in models}
    depth = dict.fromkeys(models, 1)
    for _ in range(8):
        shown = {m: "/".join(names[m][-depth[m]:]) for m in models}
        clash = [m for m in models if list(shown.values()).count(shown[m]) > 1]
        if not clash:
            break
        for m in clash:
            depth[m] += 1
    return {m: "/".join(names[m][-depth[m]:]) or m for m in models}


def check(spec: SweepSpec, prompts: list[Prompt]) -> dict[str, Path]:
    """Every check that needs no model in memory, for every checkpoint: path, config, weights, MTP head, KV-cache
    groups, chat template, each context bucket's and each prompt's position budget. Returns the resolved paths."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    paths = {m: preflight(m, require_mtp=True, mtp_from=spec.mtp_from or None) for m in spec.models}
    generation = spec.max_tokens + max(spec.ks) + 1
    for model, path in paths.items():
        config = read_config(path)
        ctx = context_length(config)
        for bucket in (b for b in spec.values("context") if b):
            if bucket + generation > ctx:
                raise UserError(f"--context {context_label(bucket)} needs {bucket + generation} positions ({bucket} "
                                f"prompt tokens + generation) but {model} has a context of {ctx}")
        tok = load_tokenizer(path)
        head_dim = int(text_config(config).get("head_dim", 0) or 0)
        for bits in (b for b in spec.values("kv_bits") if b):
            try:
                KVCacheSpec(bits, spec.kv_group_size).resolved_group_size(head_dim)
            except UserError as e:
                raise UserError(f"{model}: --kv-bits {bits}: {e}") from None
        if any(t != "n/a" for t in spec.values("thinking")) and not supports_thinking(tok):
            raise UserError(f"{model}: --thinking needs a chat template with enable_thinking; this one has none")
        native = prompts if NATIVE in spec.values("context") else []
        for p in native:
            for th in spec.values("thinking"):
                n = len(encode(tok, p, thinking_flag(th)))
                budget = n + (p.max_tokens or spec.max_tokens) + max(spec.ks) + 1
                if budget > ctx:
                    raise UserError(f"prompt {p.set_name}/{p.id} needs {budget} positions ({n} prompt tokens + "
                                    f"generation) but {model} has a context of {ctx}")
    return paths


def context_prompts(spec: SweepSpec) -> dict[tuple[str, int], list[Prompt]]:
    """Each (checkpoint, context bucket)'s prompts: the long-context documents cut with that checkpoint's
    tokenizer (the first `--prompt-limit` documents). Run after `check`, before any model is loaded."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    buckets = [b for b in spec.values("context") if b]
    if not buckets:
        return {}
    docs = load_documents()
    docs = docs[: spec.prompt_limit] if spec.prompt_limit else docs
    thinking = [thinking_flag(t) for t in spec.values("thinking")]
    out: dict[tuple[str, int], list[Prompt]] = {}
    for model in spec.models:
        tok = load_tokenizer(preflight(model, require_mtp=True, mtp_from=spec.mtp_from or None))
        for b in buckets:
            out[(model, b)] = bucket_prompts(tok, docs, b, thinking, f" with {model}'s tokenizer")
    return out


def context_manifest(spec: SweepSpec, bucketed: dict[tuple[str, int], list[Prompt]]) -> dict[str, Any]:
    """What the manifest records of the cut prompts: per model and `set/id@bucket`, the content digest and the
    first and last lines of the document part (where the bucket starts and where it was cut); the runs table has
    each prompt's token count."""
    names = display_names(spec.models)
    tasks = {d.id: d.task for d in load_documents()} if bucketed else {}
    out: dict[str, Any] = {}
    for (model, bucket), prompts in bucketed.items():
        entry = out.setdefault(names[model], {})
        for p in prompts:
            first, last = edge_lines(p, tasks.get(p.id, ""))
            entry[f"{p.set_name}/{p.id}@{context_label(bucket)}"] = {
                "digest": p.digest, "first_line": first, "last_line": last, "sources": p.source}
    return out


def decode_fields(r: DecodeResult, mode: str, k: int, weights: tuple[int, int],
                  kv: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The measured columns of one decode; `weights` = (trunk, draft step) weight bytes and `kv` = (trunk, head)
    KV-cache bytes per cached position, for the roofline. A step's KV bytes are taken at the run's mean cache
    length, prompt tokens + half the generated ones."""
    tau = r.mean_acceptance_length if mode == "mtp" else 1.0
    context = r.prompt_tokens + r.generated_tokens / 2
    return dict(
        weight_bytes_per_token=bytes_per_token(*weights, k, tau), memory_gb_s=copy_bandwidth(),
        kv_bytes_per_step=kv_bytes_per_step(kv, k if mode == "mtp" else 0, context),
        prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens, prefill_s=r.prefill_s,
        decode_s=r.decode_s, decode_tok_s=r.decode_tok_s, ttft_s=r.prefill_s, peak_memory_bytes=r.peak_memory_bytes,
        verify_steps=r.verify_steps, drafted_tokens=r.drafted_tokens, accepted_tokens=r.accepted_tokens,
        mean_acceptance_length=r.mean_acceptance_length if mode == "mtp" else None,
        drafted_at_depth=r.drafted_at_depth, accepted_at_depth=r.accepted_at_depth,
        reached_at_depth=r.reached_at_depth if mode == "mtp" else None, finished_by=r.finished_by,
        output_hash=hashlib.sha1(json.dumps(r.tokens).encode()).hexdigest()[:16],
    )


@dataclass
class ReferenceBackend:
    """The reference decoder on `model` under `policy` (applied in memory once, at `prepare`)."""

    spec: SweepSpec
    model: str
    policy: str = "as-is"
    display: str = ""
    sweep: str = ""
    kind: str = REFERENCE

    def __post_init__(self) -> None:
        self.display = self.display or display_names((self.model,))[self.model]
        self.name = self.display if self.policy == "as-is" else f"{self.display}@{self.policy}"
        self.bundle: Bundle | None = None
        self._views: dict[tuple[str, str], Bundle] = {}  # the loaded bundle per head-input convention (hidden, concat)
        self._weights: dict[int, tuple[int, int]] = {}
        self._broken = ""  # why no run of this checkpoint can be measured (set by `prepare`)

    def takes(self, cell: Cell) -> bool:
        return cell.backend == REFERENCE and cell.model == self.model and cell.policy == self.policy

    def part(self, cell: Cell) -> str:
        return cell.cell_id

    def runs_in(self, cell: Cell) -> int:
        return 1 + len(cell.ks)

    def prepare(self) -> None:
        bundle = load(self.model, require_mtp=True, mtp_from=self.spec.mtp_from or None)
        if self.policy != "as-is":
            from ..builders.quantize import apply_policy

            bundle = apply_policy(bundle, self.policy)
        self.bundle = bundle
        self._views = {(bundle.hidden_variant.value, bundle.concat): bundle}
        self._weights = {k: (weight_bytes(bundle, k + 1), draft_step_bytes(bundle)) for k in (0, *self.spec.ks)}
        self._broken = "" if logits_finite(bundle) else NOT_FINITE

    def manifest_entry(self) -> tuple[str, str, dict[str, Any]]:
        from ..model.describe import describe

        assert self.bundle is not None
        return "models", self.name, describe(self.bundle)

    def _facts(self) -> dict[str, Any]:
        b = self.bundle
        assert b is not None
        return {"backend": REFERENCE, "model": self.display, "model_fingerprint": b.fingerprint,
                "model_path": str(b.path)}

    def _kv(self, cell: Cell) -> KVCacheSpec:
        return KVCacheSpec(cell["kv_bits"] or 0, self.spec.kv_group_size)

    def _bundle(self, cell: Cell) -> Bundle:
        """The loaded model fed as the cell says (trunk hidden, concat order: one view each, built once)."""
        assert self.bundle is not None
        key = (cell["mtp_hidden"] or self.bundle.hidden_variant.value, cell["mtp_concat"] or self.bundle.concat)
        if key not in self._views:
            self._views[key] = self.bundle.with_conventions(*key)
        return self._views[key]

    def _kv_layout(self, cell: Cell) -> tuple[float, float]:
        assert self.bundle is not None
        kv = self._kv(cell)
        group = kv.resolved_group_size(int(self.bundle.text_config.get("head_dim", 64) or 64)) if kv.bits else 64
        return kv_layout(self.bundle, kv.bits, group)

    def _decode(self, cell: Cell, ids: list[int], mode: str, k: int, max_tokens: int, records: bool,
                ignore_eos: bool) -> DecodeResult:
        assert self.bundle is not None
        bundle = self._bundle(cell)  # AR runs the loaded trunk: its logits do not depend on the hidden variant
        cfg, kv = cell.setting.config(cell.seed), self._kv(cell)
        if mode == "ar":
            return generate_ar(self.bundle, ids, cfg, max_tokens, records=records, ignore_eos=ignore_eos, kv=kv)
        return generate_mtp(bundle, ids, cfg, k, max_tokens, cell.setting.draft_temperature, records=records,
                            ignore_eos=ignore_eos, kv=kv, chain=cell["mtp_chain"] or "normed",
                            history=cell["mtp_history"] or "committed")

    def _ids(self, cell: Cell) -> list[int]:
        assert self.bundle is not None
        return encode(self.bundle.tokenizer, cell.prompt, thinking_flag(cell.thinking))

    def _rescores(self, cell: Cell) -> bool:
        """Whether the cell's MTP runs are rescored against a fresh target: sampled, with records."""
        return cell.setting.temperature > 0 and self.spec.records and bool(cell.ks)

    def _fresh_prefix(self, cell: Cell, ids: list[int]) -> tuple[Prefix | None, float]:
        """The prompt's fresh prefix, shared by the cell's rescorings, and the seconds it took (None, 0 when the
        cell rescores nothing)."""
        if not self._rescores(cell):
            return None, 0.0
        assert self.bundle is not None
        t0 = time.perf_counter()
        prefix = fresh_prefix(self.bundle, ids, self._kv(cell))
        return prefix, time.perf_counter() - t0

    def _rescore(self, cell: Cell, ids: list[int], mode: str, result: DecodeResult,
                 prefix: Prefix | None) -> Rescoring | None:
        """The fresh-target rescoring of a sampled MTP run with records (after the decode, outside its timing)."""
        if mode != "mtp" or not self._rescores(cell) or not result.token_records:
            return None
        assert self.bundle is not None
        return rescore(self.bundle, ids, result, cell.setting.config(cell.seed), self._kv(cell), prefix)

    def warm_up(self, cell: Cell) -> None:
        if self._broken:
            return
        ids = self._ids(cell)
        n = min(self.spec.warmup_tokens, cell.max_tokens)
        for mode, k in cell.order(cell.ks):
            self._decode(cell, ids, mode, k, n, self.spec.records, ignore_eos=True)

    def run_cell(self, cell: Cell, on_run: OnRun | None = None) -> CellRows:
        machine_start = snapshot()
        ids, layout = self._ids(cell), self._kv_layout(cell)
        rows = CellRows()
        prefix, prefix_s = self._fresh_prefix(cell, ids) if not self._broken else (None, 0.0)
        for order, (mode, k) in enumerate(cell.order(cell.ks)):
            if cell.redo is not None and cell.run_id(mode, k) not in cell.redo:
                continue  # succeeded before, kept: a resume reruns only the failed runs
            started, error, result = now_iso(), self._broken, None
            if not error:
                try:
                    result = self._decode(cell, ids, mode, k, cell.max_tokens, self.spec.records,
                                          self.spec.ignore_eos)
                    if mode == "mtp" and result.verify_steps == 0:
                        error = DRAFTED_NOTHING
                except UserError:
                    raise
                except Exception as e:  # a failed run is recorded and the sweep goes on
                    error = f"{type(e).__name__}: {e}"
            measured = decode_fields(result, mode, k, self._weights[k], layout) if result is not None else None
            fresh = self._rescore(cell, ids, mode, result, prefix) if result is not None and not error else None
            if fresh is not None and measured is not None:
                measured["rescore_s"] = fresh.seconds + prefix_s
                prefix_s = 0.0  # the shared prefix is counted once, with the cell's first rescoring
            row = run_row(cell, self._facts(), mode, k, order, started, self.sweep, measured, error)
            rows.runs.append(row)
            if result is not None:
                rows.steps += record_rows(row["run_id"], result.steps)
                tokens = record_rows(row["run_id"], result.token_records)
                if fresh is not None:
                    tokens = [{**t, **asdict(f)} for t, f in zip(tokens, fresh.records)]
                if mode == "ar" and tokens and cell.setting.temperature == 0 and cell.ks and not error:
                    # the greedy-identity verdict's near-tie excuse (after the decode, outside its timing)
                    gaps = greedy_gaps(self.bundle, ids, result.tokens, self._kv(cell))
                    tokens = [{**t, "top2_gap": g} for t, g in zip(tokens, gaps)]
                rows.tokens += tokens
            if on_run:
                on_run(f"{cell.prompt.id} {mode}{k if k else ''}", row.get("decode_tok_s") or float("nan"))
        rows.stamp_machine(machine_start, snapshot())
        return rows

    def close(self) -> None:
        self.bundle = None
        self._views = {}
        gc.collect()
