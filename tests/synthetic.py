"""Schema-valid synthetic results directories for report/card tests (no mlx, no decoder: fast, seeded).

Acceptance is drawn per verify step from a chain of Bernoulli(a_d) draws, so `steps`, `accepted_at_depth` and
`verify_steps` agree exactly; decode tok/s follows AR tok/s * tau / cost(K) with noise, so speedups look real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtpbench.sweep.store import SCHEMA_VERSION, write_json, write_part

SETTINGS = {"greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "draft_temperature": 0.0},
            "T=0.6 top_p=0.95 top_k=20": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                          "draft_temperature": 0.6}}
CATEGORIES = ("code", "chat", "math")


@dataclass
class Spec:
    """What to synthesize; defaults give a small two-setting, three-K sweep with one failed run."""

    name: str = "synthetic"
    model: str = "tiny-mtp"
    policy: str = "bf16"
    backend: str = "mlx-cpu"
    settings: tuple[str, ...] = tuple(SETTINGS)
    ks: tuple[int, ...] = (1, 2, 3)
    prompts_per_category: int = 2
    repetitions: int = 2
    max_tokens: int = 48
    ar_tok_s: float = 40.0
    acceptance: tuple[float, ...] = (0.8, 0.7, 0.6)
    failed_runs: int = 1
    with_steps: bool = True
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    host: str = "ci-runner"
    seed: int = 0


PROVENANCE = {"mtpbench_version": "0.1.0", "mlx_version": "0.29.0", "mlx_lm_version": "0.30.0",
              "git_sha": "abc1234", "device": "cpu", "os": "Linux-6.1-x86_64", "python": "3.11.2",
              "blas": "openblas 0.3.28"}
FORMATS = {"attention": "q4 g64", "embedding": "bf16", "gated_deltanet": "q8 g64", "lm_head": "bf16",
           "mlp": "q4 g64", "norms": "bf16"}
MTP_FORMATS = {"mtp.attention": "bf16", "mtp.fc": "bf16", "mtp.mlp": "q4 g64", "mtp.norms": "bf16"}


def _base_row(spec: Spec, setting: str, mode: str, k: int, category: str, pid: str, rep: int,
              order: int) -> dict[str, Any]:
    cell = f"{spec.model}-{spec.policy}-{setting}-{mode}{k}".replace(" ", "_")
    return {
        "run_id": f"{cell}-{pid}-r{rep}", "cell_id": cell, "sweep": spec.name, "backend": spec.backend,
        "model": spec.model, "model_fingerprint": "f00d", "model_path": f"/models/{spec.model}",
        "policy": spec.policy, "kv_bits": 0, "context": 0, "mode": mode, "k": k, **SETTINGS[setting],
        "setting": setting, "thinking": "off",
        "prompt_set": category, "prompt_id": pid, "category": category, "repetition": rep, "seed": rep,
        "max_tokens": spec.max_tokens, "order": order, "prompt_tokens": 20, "hidden_variant": "post_norm",
        "mtp_chain": "normed", "mtp_history": "committed", "mtp_concat": "embedding_hidden",
        **{f: PROVENANCE[f] for f in ("mtpbench_version", "mlx_version", "mlx_lm_version", "git_sha", "device",
                                      "os", "python", "blas")},
        "host": spec.host, "started_at": f"2025-01-01T00:{order // 60:02d}:{order % 60:02d}",
        "status": "ok", "error": None, "finished_by": "length", "output_hash": f"h{order}",
    }


def _simulate_mtp(rng: np.random.Generator, spec: Spec, k: int, run_id: str) -> tuple[dict, list[dict]]:
    """Verify steps until max_tokens: per step accept drafts while Bernoulli(a_d) succeeds, then emit j + 1."""
    emitted, step, acc = 1, 0, [0] * k
    steps: list[dict[str, Any]] = []
    while emitted < spec.max_tokens:
        j = 0
        while j < k and rng.random() < spec.acceptance[j]:
            j += 1
        for d in range(min(j + 1, k)):
            acc[d] += d < j
            steps.append({"run_id": run_id, "step": step, "depth": d + 1, "drafted_token": int(rng.integers(100)),
                          "accepted": d < j, "p_draft": float(rng.random()), "q_draft": float(rng.random()),
                          "alpha": spec.acceptance[d]})
        emitted += j + 1
        step += 1
    emitted = min(emitted, spec.max_tokens)
    return {"verify_steps": step, "drafted_at_depth": [step] * k, "accepted_at_depth": acc,
            "drafted_tokens": step * k, "accepted_tokens": sum(acc),
            "mean_acceptance_length": 1 + sum(acc) / step, "generated_tokens": emitted}, steps


def _timing(rng: np.random.Generator, spec: Spec, k: int, generated: int, tau: float, base: float) -> dict:
    tok_s = base * (tau / (1 + 0.2 * k) if k else 1.0) * rng.lognormal(0, 0.05)
    decode_s = (generated - 1) / tok_s
    return {"decode_tok_s": tok_s, "decode_s": decode_s, "prefill_s": 0.05, "ttft_s": 0.06,
            "peak_memory_bytes": int((200 + 10 * k) * 2**20)}


def build_runs(spec: Spec) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(spec.seed)
    runs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    order = 0
    for setting in spec.settings:
        for category in CATEGORIES:
            for i in range(spec.prompts_per_category):
                pid = f"{category}-{i}"
                base = spec.ar_tok_s * rng.lognormal(0, 0.1)  # prompts differ: pairing matters
                for rep in range(spec.repetitions):
                    for k in (0, *spec.ks):
                        mode = "ar" if k == 0 else "mtp"
                        row = _base_row(spec, setting, mode, k, category, pid, rep, order)
                        order += 1
                        if k == 0:
                            sim = {"verify_steps": 0, "drafted_at_depth": [], "accepted_at_depth": [],
                                   "drafted_tokens": 0, "accepted_tokens": 0, "mean_acceptance_length": np.nan,
                                   "generated_tokens": spec.max_tokens}
                            st = []
                        else:
                            sim, st = _simulate_mtp(rng, spec, k, row["run_id"])
                        tau = sim["mean_acceptance_length"] if k else 1.0
                        runs.append({**row, **sim, **_timing(rng, spec, k, sim["generated_tokens"], tau, base)})
                        steps += st if spec.with_steps else []
    for n in range(spec.failed_runs):
        row = _base_row(spec, spec.settings[0], "mtp", spec.ks[-1], CATEGORIES[0], "code-0", 99 + n, order + n)
        runs.append({**row, "status": "error", "error": "RuntimeError: synthetic failure", "decode_tok_s": None,
                     "accepted_at_depth": None, "drafted_at_depth": None})
    return runs, steps


def build_results(root: Path, spec: Spec | None = None) -> Path:
    """Write a complete results directory (manifest + runs/steps/tokens/verdicts parts) and return it."""
    spec = spec or Spec()
    runs, steps = build_runs(spec)
    by_cell: dict[str, list[dict]] = {}
    for r in runs:
        by_cell.setdefault(r["cell_id"], []).append(r)
    ids = {r["run_id"]: r["cell_id"] for r in runs}
    for cell, rows in by_cell.items():
        write_part(root, "steps", cell, [s for s in steps if ids[s["run_id"]] == cell])
        write_part(root, "tokens", cell, [])
        write_part(root, "runs", cell, rows)
    write_part(root, "verdicts", "verify", spec.verdicts)
    write_json(root / "manifest.json", manifest(spec))
    return root


def manifest(spec: Spec) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "created_at": "2025-01-01T00:00:00Z",
        "command": f"mtpbench run --model {spec.model} --policy {spec.policy} --k {','.join(map(str, spec.ks))} "
                   f"--out results/{spec.name}",
        "spec": {"models": [spec.model], "ks": list(spec.ks), "settings": list(spec.settings),
                 "repetitions": spec.repetitions, "max_tokens": spec.max_tokens},
        "provenance": {**PROVENANCE, "host": spec.host},
        "models": {spec.model: {"name": spec.model, "formats": dict(FORMATS), "fingerprint": "f00d",
                                "mtp": {"formats": dict(MTP_FORMATS), "tensors": 15, "layers": 1}}},
    }


def verdict(spec: Spec, k: int, setting: str, test: str, p: float, rejected: bool,
            control: str | None = None, n: int = 4000) -> dict[str, Any]:
    """One schema-valid verdict row for `spec`'s model."""
    return {"scope": "verify", "model": spec.model, "policy": spec.policy, "kv_bits": 0, "context": 0, "hidden_variant": "post_norm",
            "mtp_chain": "normed", "mtp_history": "committed", "mtp_concat": "embedding_hidden", "backend": spec.backend, "k": k,
            "setting": setting, **SETTINGS[setting], "control": control, "test": test, "n": n,
            "statistic": 1.23, "p_value": p, "p_holm": min(1.0, 2 * p), "detectable": 0.021,
            "detectable_unit": "KS distance", "rejected": rejected, "note": None}


# ---- server endpoints (rows as mtpbench.backends.server.batch_rows writes them) --------------------------------

def server_rows(spec: Spec, backend: str, mode: str, concurrency: tuple[int, ...] = (1, 2), positions: int = 3,
                speedup: float | dict[str, float] = 1.0, failed: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """One endpoint's runs over `spec`'s settings, prompts and repetitions: k = 0, policy "as-is", a cell_id shared
    by every endpoint for the same (setting, prompt, repetition), one row per concurrent request, and (MTP only)
    vLLM-style speculative counters over the whole batch on its first row (null on the others).

    A prompt's base speed depends on the prompt only (widely spread), so endpoints agree per prompt and pairing by
    anything but the prompt gives a visibly different speedup; `speedup` (per category when a dict) scales the MTP
    endpoint, with noise."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for setting in spec.settings:
        for p, (category, i) in enumerate((c, i) for c in CATEGORIES for i in range(spec.prompts_per_category)):
            pid = f"{category}-{i}"
            for rep in range(spec.repetitions):
                cell = f"srv-{setting}-{pid}-r{rep}".replace(" ", "_")
                for c in concurrency:
                    counters = _batch_counters(rng, spec, positions, c) if mode == "mtp" else {}
                    for j in range(c):
                        gain = (speedup[category] if isinstance(speedup, dict) else speedup) if mode == "mtp" else 1
                        tok_s = spec.ar_tok_s * 1.6 ** p * c ** -0.3 * gain
                        tok_s *= rng.lognormal(0, 0.05)
                        row = {**_base_row(spec, setting, mode, 0, category, pid, rep, len(rows)),
                               "run_id": f"{backend}-{cell}-c{c}-{j}", "cell_id": cell, "backend": backend,
                               "policy": "as-is", "kv_bits": None, "context": None, "draft_temperature": None, "hidden_variant": None,
                               "mtp_chain": None, "mtp_history": None, "mtp_concat": None,
                               "model_path": f"http://127.0.0.1/{backend}/v1", "concurrency": c,
                               "generated_tokens": spec.max_tokens, "decode_tok_s": tok_s,
                               "decode_s": (spec.max_tokens - 1) / tok_s, "ttft_s": 0.05 * c,
                               "itl_p50_s": 1 / tok_s, "itl_p95_s": 1.5 / tok_s, "itl_p99_s": 2 / tok_s,
                               "server_completion_tokens": spec.max_tokens}
                        rows.append({**row, **(counters if j == 0 else {})})
    for n in range(failed):
        row = _base_row(spec, spec.settings[0], mode, 0, CATEGORIES[0], "code-0", 0, len(rows))
        rows.append({**row, "run_id": f"{backend}-failed-{n}", "cell_id": "srv-failed", "backend": backend,
                     "policy": "as-is", "kv_bits": None, "context": None, "hidden_variant": None, "mtp_chain": None,
                     "mtp_history": None, "mtp_concat": None, "concurrency": concurrency[0], "status": "failed",
                     "error": "RequestFailed: timed out", "decode_tok_s": None})
    return rows


def _batch_counters(rng: np.random.Generator, spec: Spec, positions: int, requests: int) -> dict[str, Any]:
    """Counter deltas of one batch: the sum over its requests of the same Bernoulli chain as _simulate_mtp."""
    sims = [_simulate_mtp(rng, spec, positions, "")[0] for _ in range(requests)]
    drafts = sum(s["verify_steps"] for s in sims)
    accepted = [sum(s["accepted_at_depth"][d] for s in sims) for d in range(positions)]
    return {"verify_steps": drafts, "drafted_tokens": drafts * positions, "accepted_tokens": sum(accepted),
            "accepted_at_depth": accepted, "drafted_at_depth": [drafts] * positions,
            "mean_acceptance_length": 1 + sum(accepted) / drafts}


def add_server_runs(root: Path, spec: Spec, rows: list[dict[str, Any]], part: str, shuffle_seed: int = 0) -> Path:
    """Write `rows` as one runs part of `root` in shuffled order (a results directory is made when missing)."""
    order = np.random.default_rng(shuffle_seed).permutation(len(rows))
    write_part(root, "runs", part, [rows[i] for i in order])
    if not (root / "manifest.json").exists():
        write_json(root / "manifest.json", manifest(spec))
    return root
