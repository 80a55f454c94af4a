"""`mtpbench bench`: what the checkpoint costs on this machine, and how much of that the decoder delivers.

The reference decoder must measure the checkpoint, not its own overhead. So `run_bench` times the terms of the
speculative step in isolation (`perf.costs`), feeds them to the cost model (`perf.efficiency`) and compares the
prediction with the speedup the decoder realizes; it also checks our AR loop against mlx_lm's (`perf.parity`),
prices the rich records (`perf.overhead`), places throughput on a bandwidth roofline (`perf.roofline`), shows how
decode speed scales with context (`perf.context`) and what sampling costs beside greedy (`perf.sampling_cost`).
Every figure is a ratio of things measured side by side in this one process (shared/DESIGN.md, timing protocol).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from ..atomic import write_json
from ..errors import UserError
from ..model.blas import active_blas
from ..model.checkpoint import Bundle, load
from ..model.roofline import draft_step_bytes, weight_bytes
from ..provenance import now_iso, provenance
from ..sampling import SamplingConfig
from .blas import blas_comparison
from .context import context_scaling
from .costs import MeasuredCosts, measure_costs, measure_sampled_terms
from .efficiency import cost_model, mtp_efficiency
from .large import bench_targets
from .overhead import records_overhead
from .parity import ar_parity
from .roofline import roofline
from .sampling_cost import QWEN_SAMPLED, sampling_section
from .settings import BenchSettings, Log, bench_prompt

SCHEMA = "mtpbench.bench/1"


def _model_facts(bundle: Bundle) -> dict[str, Any]:
    text = bundle.text_config
    params = sum(v.size for _, v in tree_flatten(bundle.model.parameters()))
    return {"name": bundle.name, "path": str(bundle.path), "fingerprint": bundle.fingerprint,
            "hidden_size": text.get("hidden_size"), "layers": text.get("num_hidden_layers"),
            "vocab_size": text.get("vocab_size"), "trunk_params": int(params),
            "mtp_params": int(sum(v.size for _, v in tree_flatten(bundle.require_mtp().parameters()))),
            "hidden_variant": bundle.hidden_variant.value, "max_position_embeddings": bundle.context_length}


def run_bench(model: str | Path, out_dir: Path, ks: Sequence[int] = (1, 2, 3), settings: BenchSettings | None = None,
              log: Log | None = None) -> dict[str, Any]:
    """Run every measurement on one checkpoint and write `out_dir/bench.json`; return what was written.

    The file is rewritten (atomically) after each section with `complete: false`, so a long run that is killed
    still leaves what it measured.
    """
    s = replace(settings or BenchSettings(), ks=tuple(ks))
    if not s.ks or s.repeats < 1 or s.max_tokens < 4:
        raise UserError("bench needs at least one K, --repeats >= 1 and --max-tokens >= 4")
    say = log or (lambda _msg: None)
    bundle = load(model, require_mtp=True)
    prompt = bench_prompt(bundle, s)
    path = Path(out_dir) / "bench.json"
    bench: dict[str, Any] = {
        "schema": SCHEMA, "created_at": now_iso(), "complete": False, "blas": active_blas(),
        "provenance": dict(provenance()), "model": _model_facts(bundle),
        "settings": {**asdict(s), "prompt_tokens": len(prompt), "sampling": "greedy"},
    }

    def section(key: str, message: str, measure: Callable[[], Any], to_json: Callable[[Any], Any] = lambda x: x) -> Any:
        say(message)
        value = measure()
        bench[key] = to_json(value)
        write_json(path, bench)
        return value

    costs = section("costs", f"costs: AR step, draft step, verify K={list(s.ks)}, rollback ({s.repeats} repeats)",
                    lambda: measure_costs(bundle, prompt, s.ks, s.repeats, s.warmup), MeasuredCosts.to_dict)
    section("ar_parity", "AR parity with mlx_lm.stream_generate",
            lambda: ar_parity(bundle, prompt, s.max_tokens, s.repeats))
    eff = section("mtp", "predicted vs realized speedup, greedy (terms and runs in the same rounds)",
                  lambda: mtp_efficiency(bundle, prompt, s.ks, s.max_tokens, s.repeats))
    cm = section("cost_model", f"cost model per setting: greedy and {QWEN_SAMPLED.label()} with its own terms",
                 lambda: cost_model(bundle, prompt, s.ks, s.max_tokens, s.repeats, eff, QWEN_SAMPLED),
                 lambda c: {k: v for k, v in c.items() if k != "sampled_terms"})
    bench["sampled_terms"] = cm["sampled_terms"]  # top level, where a sweep's cost_model.json keeps them too
    section("records_overhead", "records overhead",
            lambda: records_overhead(bundle, prompt, s.ks, s.max_tokens, s.repeats))
    section("sampling", f"sampled ({QWEN_SAMPLED.label()}) vs greedy: host work per row, bytes read back, step time",
            lambda: sampling_section(bundle, prompt, max(s.ks), s.max_tokens, s.repeats))
    section("roofline", "roofline", lambda: roofline(
        bundle, {0: eff[0]["ar_tok_s"], **{e["k"]: e["mtp_tok_s"] for e in eff}}, {e["k"]: e["tau"] for e in eff},
        s.copy_mb))
    section("context_scaling", f"context scaling {list(s.contexts)}",
            lambda: context_scaling(bundle, s.contexts, s.ks, s.max_tokens, s.context_repeats))
    if s.blas:
        section("blas_vs_reference", "the same costs with mlx's bundled reference BLAS (child process)", lambda: blas_comparison(
            str(bundle.path), len(prompt), s.ks, s.max_tokens, s.repeats,
            {"blas": active_blas(), "costs": costs.to_dict(), "ar_tok_s": eff[0]["ar_tok_s"]}))
    bench["complete"] = True
    write_json(path, bench)
    return bench


def bench_into(out: Path, models: list[str], ks: tuple[int, ...], large: bool, log: Log | None = None) -> None:
    """`mtpbench bench` per checkpoint into out/bench/<name>/bench.json (what `sweep --bench` keeps next to a
    sweep's results); a complete one is kept (resume)."""
    for model, settings in bench_targets(models, ks, large):
        where = out / "bench" / safe_name(model)
        done = where / "bench.json"
        if done.exists() and json.loads(done.read_text()).get("complete"):
            continue
        run_bench(model, where, ks, settings, log=log)


COST_MODEL = "cost_model.json"


def measure_cost_model(model: str | Path, out_dir: Path, ks: Sequence[int],
                       settings: Sequence[SamplingConfig] = ()) -> dict[str, Any]:
    """The cost terms and weight bytes a sweep's summary predicts and projects speedups from, written to
    `out_dir/cost_model.json`: `measure_costs` (the decoder's own ops, interleaved medians), the sampled step's
    own terms at each sampled setting of `settings` (`measure_sampled_terms`) and the roofline's byte counts,
    without bench's decode runs, parity or context scaling (seconds, not minutes)."""
    s = BenchSettings(ks=tuple(ks))
    bundle = load(model, require_mtp=True)
    prompt = bench_prompt(bundle, s)
    costs = measure_costs(bundle, prompt, s.ks, s.repeats, s.warmup)
    sampled = {cfg.label(): cfg for cfg in settings if not cfg.greedy}
    doc = {"schema": SCHEMA, "created_at": now_iso(), "complete": True, "kind": "cost_model",
           "blas": active_blas(), "provenance": dict(provenance()), "model": _model_facts(bundle),
           "costs": costs.to_dict(),
           "sampled_terms": [measure_sampled_terms(bundle, prompt, s.ks, cfg, s.repeats, s.warmup).to_dict()
                             for cfg in sampled.values()],
           "roofline": {"trunk_bytes": weight_bytes(bundle), "draft_step_bytes": draft_step_bytes(bundle)}}
    write_json(Path(out_dir) / COST_MODEL, doc)
    return doc


def cost_models_into(out: Path, models: list[str], ks: tuple[int, ...], log: Log | None = None,
                     settings: Sequence[SamplingConfig] = ()) -> None:
    """`measure_cost_model` per checkpoint into out/bench/<name>/ (what a sweep keeps by default; `--bench`
    keeps the whole bench instead); one already there, or a bench, is kept."""
    for model in models:
        where = out / "bench" / safe_name(model)
        if (where / COST_MODEL).exists() or (where / "bench.json").exists():
            continue
        if log:
            log(f"cost model of {safe_name(model)}: AR step, draft steps, verify K={list(ks)}, rollback, and the "
                f"sampled step's terms at each sampled setting")
        try:
            measure_cost_model(model, where, ks, settings)
        except Exception as e:  # the sweep's results stand without it; the summary then shows realized speedups only
            if log:
                log(f"no cost model for {safe_name(model)}: {e}")


def safe_name(model: str) -> str:
    """A checkpoint's directory name (or repo id), made safe for a directory name."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
