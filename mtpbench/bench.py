"""`mtpbench bench`: what the checkpoint costs on this machine, and how much of that the decoder delivers.

The reference decoder must measure the checkpoint, not its own overhead. So this module times the terms of the
speculative step in isolation (AR step, draft step, (K+1)-token verify, rollback), feeds them to the cost model of
`stats.acceptance`, and compares the prediction with the speedup the decoder realizes (efficiency). It also checks
our AR loop against mlx_lm's own (parity), prices the rich records, places throughput on a memory-bandwidth
roofline, and shows how decode speed scales with context. Every figure is a ratio of things measured side by side
in this one process, alternating (ABBA) so drift hits both sides (shared/DESIGN.md, timing protocol).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .model.blas import active_blas, env_without_openblas
from .model.checkpoint import Bundle, load
from .decode import DecodeResult, generate_ar, generate_mtp
from .decode.cache import restore, snapshot, state_arrays
from .decode.common import now as _clock
from .decode.speculative import prefill, verify_forward
from .errors import UserError
from .provenance import now_iso, provenance
from .atomic import write_json
from .model.roofline import bytes_per_token, copy_bandwidth, draft_step_bytes, nbytes, weight_bytes
from .sampling import SamplingConfig
from .sampling_cost import QWEN_SAMPLED, sampling_section
from .stats.acceptance import (
    StepCosts,
    break_even_acceptance,
    expected_tokens,
    predicted_speedup,
)
from .builders.tiny import TinySpec, make_tiny

SCHEMA = "mtpbench.bench/1"
GREEDY = SamplingConfig(temperature=0.0)
Log = Callable[[str], None]
# Held-out-looking code text: tiled to build prompts of any length from the checkpoint's own tokenizer.
PROMPT_TEXT = (
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]\n\n"
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens and verifies them.\n"
)


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one bench run; `quick()` is for smoke tests, where only the plumbing matters."""

    ks: tuple[int, ...] = (1, 2, 3)
    max_tokens: int = 128
    repeats: int = 5
    contexts: tuple[int, ...] = (512, 2048, 8192)
    context_repeats: int = 1
    prompt_tokens: int = 64
    warmup: int = 2
    copy_mb: int = 256
    blas: bool = True  # also measure with the reference BLAS (Linux with OpenBLAS preloaded only)

    @classmethod
    def large(cls, ks: Sequence[int] = (1, 2, 3)) -> BenchSettings:
        """Sizes for the ~118M-parameter checkpoint, where one token costs ~100x the demo's: a few minutes in all."""
        return cls(ks=tuple(ks), max_tokens=48, repeats=3, contexts=(512, 2048), warmup=1)

    @classmethod
    def quick(cls, ks: Sequence[int] = (1, 2), contexts: Sequence[int] = (64, 128)) -> BenchSettings:
        return cls(ks=tuple(ks), max_tokens=12, repeats=2, contexts=tuple(contexts), prompt_tokens=24, warmup=1,
                   copy_mb=16, blas=False)


# --- the larger generated checkpoint ---------------------------------------------------------------------------

# ~118M trunk parameters in float32 (8 layers in the hybrid pattern, hidden 1024, 128-wide heads, 16k vocab): big
# enough that a (K+1)-token verify costs little more than one decode step, as on real checkpoints. Random weights
# with a head built to agree with the trunk (see tiny._agree), so drafts get accepted; built in seconds, cached.
LARGE = TinySpec(seed=7, hidden=1024, layers=8, vocab=16384, head_dim=128, agree=0.98, dtype="float32")


def large_checkpoint(cache_root: Path | None = None) -> Path:
    """The LARGE checkpoint's directory, built on first use under ~/.cache/mtpbench (atomically renamed in).

    Only this run's temporary directory is ever removed: an incomplete directory at the checkpoint's path was not
    written by this function (it renames complete ones in) and is refused, never deleted."""
    root = cache_root or Path.home() / ".cache" / "mtpbench"
    key = hashlib.sha1(json.dumps(asdict(LARGE), sort_keys=True).encode()).hexdigest()[:10]
    out = root / f"bench-large-{key}"
    if (out / "config.json").exists():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists but is not a complete bench checkpoint; move it away and rerun")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-large-", dir=root))
    try:
        make_tiny(tmp, LARGE)
        try:
            tmp.rename(out)  # onto nothing, or an empty directory
        except OSError:
            if not (out / "config.json").exists():  # another process renamed its own complete copy in meanwhile
                raise UserError(f"cannot place the bench checkpoint at {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this run's mkdtemp (gone after a successful rename)
    return out


def bench_targets(models: Sequence[str], ks: Sequence[int], large: bool = False, quick: bool = False,
                  **overrides: Any) -> list[tuple[str, BenchSettings]]:
    """The checkpoints one bench command measures, with their sizes: each model at the standard (or quick) sizes,
    plus the generated LARGE checkpoint at its own; `overrides` (max_tokens, repeats, contexts) apply to all."""
    base = BenchSettings.quick(ks) if quick else BenchSettings(ks=tuple(ks))
    targets = [(str(m), replace(base, **overrides)) for m in models]
    if large:
        big = BenchSettings.quick(ks) if quick else BenchSettings.large(ks)
        targets.append((str(large_checkpoint()), replace(big, **overrides)))
    return targets


# --- prompts -------------------------------------------------------------------------------------------------


def pattern_prompt(bundle: Bundle, length: int) -> list[int]:
    """About `length` tokens: the checkpoint's own encoding of PROMPT_TEXT, repeated (never empty)."""
    pattern = [int(t) for t in bundle.tokenizer.encode(PROMPT_TEXT)] or [0]
    reps = -(-max(1, length) // len(pattern))
    return (pattern * reps)[: max(1, length)]


def bench_prompt(bundle: Bundle, s: BenchSettings) -> list[int]:
    """The prompt every cost term is timed on: `s.prompt_tokens` of the pattern, capped so generation still fits."""
    return pattern_prompt(bundle, min(s.prompt_tokens, _context_cap(bundle, s.max_tokens, s.ks)))


def _context_cap(bundle: Bundle, max_tokens: int, ks: Sequence[int]) -> int:
    """The longest prompt that still leaves room for the decode and the verify window in the position budget."""
    return max(1, bundle.context_length - max_tokens - max(ks, default=0) - 2)


# --- cost terms ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredCosts(StepCosts):
    """StepCosts of the decoder's default (capture) rollback, plus the detail behind them: both rollback modes by
    accepted prefix j, and the context they were measured at.

    `verify` / `rollback` (inherited) are the capture mode's: a verify that keeps every position's GatedDeltaNet
    state, and a commit. `verify_plain` / `reforward_by_j` are the snapshot + re-forward fallback's.
    """

    rollback_by_j: tuple[float, ...] = ()  # capture: commit of position j, j = 0..max K - 1
    # Extra seconds of a step's first draft when it also feeds the head the previous step's r accepted positions
    # (index r - 1; the head catches up on j + 1 true pairs after j accepted drafts), over the one-row draft.
    catch_up_by_rows: tuple[float, ...] = ()
    verify_plain: dict[int, float] = field(default_factory=dict)  # K -> plain (K+1)-token verify forward
    reforward_by_j: tuple[float, ...] = ()  # restore + re-forward of j + 1 tokens
    context_tokens: int = 0
    repeats: int = 0

    def for_k(self, k: int, rejected_js: Sequence[int] = (), rollback: str = "capture",
              catch_up_rows: Sequence[int] = ()) -> StepCosts:
        """Costs for depth K, the rollback weighted by how often each prefix j < K was actually rejected at, and
        the drafts by how many positions the head caught up on at the start of each step."""
        js = [j for j in rejected_js if j < k] or list(range(k))
        by_j, verify = ((self.rollback_by_j, self.verify) if rollback == "capture"
                        else (self.reforward_by_j, self.verify_plain))
        extra = [self.catch_up_by_rows[r - 1] for r in catch_up_rows if r <= len(self.catch_up_by_rows)]
        chain = {k: self.draft_chain[k] + (float(np.mean(extra)) if extra else 0.0)} if k in self.draft_chain else {}
        return StepCosts(self.ar_step, self.draft_step, {k: verify[k]}, float(np.mean([by_j[j] for j in js])),
                         chain)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ar_step_s": self.ar_step, "draft_step_s": self.draft_step, "rollback_s": self.rollback,
            "verify_s": [{"k": k, "seconds": s, "over_ar_step": s / self.ar_step,
                          "plain_seconds": self.verify_plain.get(k, float("nan"))}
                         for k, s in sorted(self.verify.items())],
            "rollback_by_j_s": list(self.rollback_by_j), "reforward_by_j_s": list(self.reforward_by_j),
            "draft_over_ar_step": self.draft_step / self.ar_step,
            "draft_chain_s": [{"k": k, "seconds": t} for k, t in sorted(self.draft_chain.items())],
            "catch_up_by_rows_s": list(self.catch_up_by_rows),
            "context_tokens": self.context_tokens, "repeats": self.repeats,
        }


@dataclass(frozen=True)
class _Primed:
    """A trunk and MTP cache holding the prompt, exactly as the decoder holds them before its first step."""

    cache: list
    mtp_cache: list
    last: int
    hidden: mx.array  # (1, 1, H): the trunk hidden at the last prompt position


def _prime(bundle: Bundle, prompt: list[int]) -> _Primed:
    cache, mtp_cache = bundle.trunk.make_cache(), bundle.draft_head.make_cache()
    out, _, _ = prefill(bundle, prompt, cache, mtp_cache)  # the decoder's own prefill
    last = int(np.asarray(mx.argmax(out.logits[0, -1])))
    hidden = out.hidden[:, -1:]
    mx.eval(hidden, *state_arrays(cache), *state_arrays(mtp_cache))
    return _Primed(cache, mtp_cache, last, hidden)


def _host_argmax(logits: mx.array) -> np.ndarray:
    """The host sync every decode step ends with: argmax ids on the host."""
    return np.asarray(mx.argmax(logits, axis=-1))


def _interleaved_medians(ops: dict[str, tuple[Callable[[], object], Callable[[], None] | None]],
                         reset: Callable[[], None], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each op (each must end in a host sync), timed round-robin so drift hits every term.

    Each op is `(op, setup)`: `setup` and `reset` run untimed before and after every call.
    """
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(warmup + repeats):
        for name, (op, setup) in ops.items():
            if setup:
                setup()
            t0 = _clock()
            op()
            dt = _clock() - t0
            reset()
            if i >= warmup:
                samples[name].append(dt)
    return {name: float(statistics.median(xs)) for name, xs in samples.items()}


def measure_costs(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], repeats: int = 5,
                  warmup: int = 2) -> MeasuredCosts:
    """Median seconds of each cost term, on a cache primed with the prompt and put back after every call.

    Each term is timed as the decoder runs it: the AR step and each verify end in their host sync; the drafts of
    a step are a chain of K drafts ended by one sync, timed per K (the draft step is the chain of one).
    """
    trunk, head = bundle.trunk, bundle.draft_head
    st = _prime(bundle, prompt_ids)
    kmax = max(ks)
    drafts = [st.last] * kmax  # token values do not change the cost of a forward
    window = mx.array([[st.last] + drafts])
    snap, mtp_offset = snapshot(st.cache), st.mtp_cache[0].offset
    roll_backs: list[Callable[[int], None]] = []

    def put_back() -> None:
        restore(st.cache, snap)
        for c in st.mtp_cache:
            c.trim(c.offset - mtp_offset)

    def ar_step() -> None:
        _host_argmax(trunk(mx.array([[st.last]]), st.cache).logits[0, -1:])

    def draft_chain(k: int, rows: int = 1) -> Callable[[], None]:
        def op() -> None:  # the first call also feeds `rows - 1` earlier positions, as after accepted drafts
            ids = head.greedy_chain(mx.repeat(st.hidden, rows, axis=1), mx.array([[st.last] * rows]), st.mtp_cache, k)
            np.asarray(ids)  # the ids themselves: an argmax over them would not need the chain computed
        return op

    def verify(k: int, capture: bool) -> Callable[[], None]:  # the decoder's own verify forward, as it runs it
        rollback = "capture" if capture else "reforward"
        return lambda: _host_argmax(verify_forward(trunk, st.cache, window[:, : k + 1], rollback)[0].logits[0])

    def verified(rollback: str) -> Callable[[], None]:
        def setup() -> None:  # the state a rollback starts from: the whole window verified, as the decoder leaves it
            out, rb = verify_forward(trunk, st.cache, window, rollback)
            mx.eval(out.logits, *state_arrays(st.cache))
            roll_backs[:] = [rb]
        return setup

    def roll_back(j: int) -> Callable[[], None]:  # the decoder's own rollback to j accepted drafts
        def op() -> None:
            roll_backs[0](j)
            mx.eval(*state_arrays(st.cache))
        return op

    ops = {"ar": (ar_step, None)}
    ops |= {f"draft{k}": (draft_chain(k), None) for k in sorted({1, *ks})}
    ops |= {f"catch_up{r}": (draft_chain(1, r), None) for r in range(2, kmax + 2)}
    ops |= {f"verify{k}": (verify(k, False), None) for k in sorted(set(ks))}
    ops |= {f"verify_capture{k}": (verify(k, True), None) for k in sorted(set(ks))}
    ops |= {f"reforward{j}": (roll_back(j), verified("reforward")) for j in range(kmax)}
    ops |= {f"commit{j}": (roll_back(j), verified("capture")) for j in range(kmax)}
    t = _interleaved_medians(ops, put_back, repeats, warmup)
    commit_by_j = tuple(t[f"commit{j}"] for j in range(kmax))
    return MeasuredCosts(
        ar_step=t["ar"], draft_step=t["draft1"], draft_chain={k: t[f"draft{k}"] for k in sorted(set(ks))},
        verify={k: t[f"verify_capture{k}"] for k in sorted(set(ks))}, rollback=float(np.mean(commit_by_j)),
        rollback_by_j=commit_by_j,
        catch_up_by_rows=(0.0, *(max(0.0, t[f"catch_up{r}"] - t["draft1"]) for r in range(2, kmax + 2))),
        verify_plain={k: t[f"verify{k}"] for k in sorted(set(ks))},
        reforward_by_j=tuple(t[f"reforward{j}"] for j in range(kmax)), context_tokens=len(prompt_ids),
        repeats=repeats)


# --- decode runs ---------------------------------------------------------------------------------------------


def _decode(bundle: Bundle, prompt: list[int], k: int, max_tokens: int, records: bool = False) -> DecodeResult:
    """One greedy run of AR (k = 0) or MTP at depth k, EOS ignored so every run decodes the same length."""
    if k == 0:
        return generate_ar(bundle, prompt, GREEDY, max_tokens, records=records, ignore_eos=True)
    return generate_mtp(bundle, prompt, GREEDY, k, max_tokens, records=records, ignore_eos=True)


def _abba(arms: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[list[Any]]:
    """Run every arm `warmup + repeats` times, reversing the order on every other round; keep the timed rounds."""
    out: list[list[Any]] = [[] for _ in arms]
    for r in range(warmup + repeats):
        order = list(range(len(arms))) if r % 2 == 0 else list(range(len(arms)))[::-1]
        for i in order:
            value = arms[i]()
            if r >= warmup:
                out[i].append(value)
    return out


def _geomean_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Geometric mean of the paired (same round) ratios num/den."""
    logs = [math.log(a / b) for a, b in zip(num, den) if a > 0 and b > 0 and math.isfinite(a / b)]
    return math.exp(float(np.mean(logs))) if logs else float("nan")


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --- AR parity with mlx_lm -----------------------------------------------------------------------------------


def _mlx_lm_tok_s(model, tokenizer, prompt: list[int], max_tokens: int) -> float:
    """mlx_lm.stream_generate's decode tok/s, put on our definition: tokens after the first / time after the first.

    Its `generation_tps` divides all N tokens by the time after the first, so it reads N/(N-1) high.
    """
    import mlx_lm

    last = None
    for last in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    if last is None or last.generation_tokens < 2:
        return float("nan")
    elapsed = last.generation_tokens / last.generation_tps
    return (last.generation_tokens - 1) / elapsed


def ar_parity(bundle: Bundle, prompt_ids: list[int], max_tokens: int, repeats: int = 5) -> dict[str, Any]:
    """Our AR decode tok/s against mlx_lm's own loop on the same checkpoint, prompt and greedy settings."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(bundle.path))
    tokenizer.eos_token_ids = set()  # ours runs with ignore_eos: both decode exactly max_tokens

    def ours() -> float:
        return _decode(bundle, prompt_ids, 0, max_tokens).decode_tok_s

    def theirs() -> float:
        return _mlx_lm_tok_s(model, tokenizer, prompt_ids, max_tokens)

    ours_s, theirs_s = _abba([ours, theirs], repeats)
    return {
        "ours_tok_s": ours_s, "mlx_lm_tok_s": theirs_s, "ours_median": _median(ours_s),
        "mlx_lm_median": _median(theirs_s), "ratio": _geomean_ratio(ours_s, theirs_s),
        "max_tokens": max_tokens, "prompt_tokens": len(prompt_ids), "repeats": repeats,
        "note": "decode tok/s excluding the first token on both sides (mlx_lm's generation_tps rescaled by (N-1)/N)",
    }


# --- predicted vs realized speedup ---------------------------------------------------------------------------


def _survival(runs: Sequence[DecodeResult], k: int) -> list[float]:
    """Survival to depth d = steps whose first d drafts were all accepted / verify steps, pooled over runs."""
    steps = sum(r.verify_steps for r in runs)
    return [sum(r.accepted_at_depth[d] for r in runs) / steps if steps else 0.0 for d in range(k)]


def _rejected_js(runs: Sequence[DecodeResult], k: int) -> list[int]:
    return [j for r in runs for j in r.accepted_per_step if j < k]


def _catch_up_rows(runs: Sequence[DecodeResult]) -> list[int]:
    """Positions the head is fed at each step's first draft: 1 after the prompt, then the previous step's j + 1."""
    return [rows for r in runs for rows in [1, *(j + 1 for j in r.accepted_per_step[:-1])]]


def _k_efficiency(k: int, ar: list[DecodeResult], mtp: list[DecodeResult], costs: MeasuredCosts) -> dict[str, Any]:
    """Predicted speedup = tau x (AR seconds per token) / (modelled MTP step), realized = paired tok/s ratio.

    The AR term is the AR loop's own seconds per token in these very runs (it keeps one forward in flight, so it
    beats an isolated step that ends in a sync): the prediction is then "what the checkpoint allows over the AR
    baseline it is compared with", and efficiency below 1 is time the MTP loop spends beyond its measured terms.
    """
    survival = _survival(mtp, k)
    rejected, rows = _rejected_js(mtp, k), _catch_up_rows(mtp)
    real_ar = sum(r.decode_s for r in ar) / sum(r.generated_tokens - 1 for r in ar)
    ck = replace(costs.for_k(k, rejected, catch_up_rows=rows), ar_step=real_ar)
    predicted = predicted_speedup(survival, ck)
    predicted_reforward = predicted_speedup(survival, replace(
        costs.for_k(k, rejected, rollback="reforward", catch_up_rows=rows), ar_step=real_ar))
    realized = _geomean_ratio([r.decode_tok_s for r in mtp], [r.decode_tok_s for r in ar])
    p_reject = 1.0 - (survival[-1] if survival else 0.0)
    model_step = ck.drafts(k) + ck.verify[k] + p_reject * ck.rollback
    steps = sum(r.verify_steps for r in mtp)
    real_step = sum(r.decode_s for r in mtp) / steps if steps else float("nan")
    return {
        "k": k, "survival": survival, "tau": expected_tokens(survival), "rollback_s": ck.rollback,
        "drafts_s": ck.drafts(k), "catch_up_s": ck.drafts(k) - costs.draft_chain.get(k, ck.drafts(k)),
        "ar_tok_s": _median([r.decode_tok_s for r in ar]), "mtp_tok_s": _median([r.decode_tok_s for r in mtp]),
        "predicted_speedup": predicted, "predicted_speedup_reforward": predicted_reforward,
        "realized_speedup": realized, "efficiency": realized / predicted,
        "break_even_acceptance": break_even_acceptance(k, ck),
        "model_step_s": model_step, "measured_step_s": real_step, "step_overhead": real_step / model_step,
        "model_ar_step_s": costs.ar_step, "measured_ar_step_s": real_ar, "ar_overhead": real_ar / costs.ar_step,
        "verify_steps": steps, "no_draft_accepted": sum(r.accepted_tokens for r in mtp) == 0,
    }


def mtp_efficiency(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int, repeats: int,
                   costs: MeasuredCosts) -> list[dict[str, Any]]:
    """Per K: realized speedup (MTP vs AR, side by side) over the speedup the measured costs predict."""
    modes = [0, *ks]
    arms = [lambda m=m: _decode(bundle, prompt_ids, m, max_tokens) for m in modes]
    runs = dict(zip(modes, _abba(arms, repeats)))
    return [_k_efficiency(k, runs[0], runs[k], costs) for k in ks]


def records_overhead(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], max_tokens: int,
                     repeats: int) -> list[dict[str, Any]]:
    """What the rich records (p, q, alpha, PIT) cost: decode tok/s with and without them, per mode (K = 0 is AR)."""
    out = []
    for m in [0, *ks]:
        arms = [lambda m=m, r=r: _decode(bundle, prompt_ids, m, max_tokens, records=r).decode_tok_s
                for r in (False, True)]
        lean, rich = _abba(arms, repeats)
        ratio = _geomean_ratio(rich, lean)
        out.append({"k": m, "records_tok_s": _median(rich), "no_records_tok_s": _median(lean),
                    "ratio": ratio, "overhead": 1.0 - ratio})
    return out


# --- roofline ------------------------------------------------------------------------------------------------


def roofline(bundle: Bundle, tok_s: dict[int, float], tau: dict[int, float] | None = None,
             copy_mb: int = 256) -> dict[str, Any]:
    """Weight bytes read per token x tok/s = achieved weight bandwidth, and its share of the machine's.

    AR reads every trunk weight once per token. An MTP step reads the trunk once plus K draft steps of the head
    and the lm head (drafts use the trunk's), and emits tau tokens. The untied embedding table is counted whole
    although a step reads one row of it (`embedding_bytes` says how much that is). For MoE a (K+1)-token verify
    reads the routed experts of up to (K+1) x experts-per-token per layer (the bound `weight_bytes` states), so
    each mode counts its own trunk bytes.
    """
    tau = tau or {}
    trunk = weight_bytes(bundle)
    head = draft_step_bytes(bundle)
    machine = copy_bandwidth(copy_mb)
    rows = []
    for k, ts in sorted(tok_s.items()):
        per_token = bytes_per_token(weight_bytes(bundle, k + 1), head, k, tau.get(k, 1.0))
        gbs = per_token * ts / 1e9
        rows.append({"k": k, "tok_s": ts, "bytes_per_token": per_token, "achieved_gb_s": gbs,
                     "share": gbs / machine})
    emb = bundle.trunk.lm.model.embed_tokens
    return {"trunk_bytes": trunk, "draft_step_bytes": head, "embedding_bytes": nbytes(emb),
            "tied_embeddings": bool(bundle.trunk.lm.args.tie_word_embeddings),
            "machine_gb_s": machine, "copy_mb": copy_mb, "modes": rows}


# --- context scaling -----------------------------------------------------------------------------------------


def context_scaling(bundle: Bundle, lengths: Sequence[int] = (512, 2048, 8192), ks: Sequence[int] = (1, 2, 3),
                    max_tokens: int = 64, repeats: int = 1) -> list[dict[str, Any]]:
    """AR and MTP(K) decode tok/s at prompts of about each length (capped at the model's position budget)."""
    cap = _context_cap(bundle, max_tokens, ks)
    out = []
    for target in lengths:
        prompt = pattern_prompt(bundle, min(target, cap))
        modes = [0, *ks]
        arms = [lambda m=m, p=prompt: _decode(bundle, p, m, max_tokens) for m in modes]
        runs = dict(zip(modes, _abba(arms, repeats, warmup=0)))
        ar = _median([r.decode_tok_s for r in runs[0]])
        out.append({
            "target_tokens": target, "prompt_tokens": len(prompt), "capped": target > cap,
            "prefill_tok_s": _median([len(prompt) / r.prefill_s for r in runs[0]]), "ar_tok_s": ar,
            "mtp": [{"k": k, "tok_s": _median([r.decode_tok_s for r in runs[k]]),
                     "speedup": _geomean_ratio([r.decode_tok_s for r in runs[k]], [r.decode_tok_s for r in runs[0]]),
                     "tau": float(np.mean([r.mean_acceptance_length for r in runs[k]]))} for k in ks],
        })
    return out


# --- BLAS ----------------------------------------------------------------------------------------------------


def _costs_and_ar(model: str, prompt_tokens: int, ks: Sequence[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    """Cost terms and AR decode tok/s of one checkpoint in this process (whatever BLAS it has mapped)."""
    bundle = load(model, require_mtp=True)
    prompt = pattern_prompt(bundle, min(prompt_tokens, _context_cap(bundle, max_tokens, ks)))
    costs = measure_costs(bundle, prompt, ks, repeats, warmup=1)
    ar = [_decode(bundle, prompt, 0, max_tokens).decode_tok_s for _ in range(repeats + 1)][1:]
    return {"blas": active_blas(), "costs": costs.to_dict(), "ar_tok_s": _median(ar)}


def blas_comparison(model: str, prompt_tokens: int, ks: Sequence[int], max_tokens: int, repeats: int,
                    here: dict[str, Any]) -> dict[str, Any]:
    """The same cost terms and AR tok/s with mlx's bundled reference BLAS, measured in a child process without the
    OpenBLAS preload (a library cannot be unloaded), next to this process's. Only where OpenBLAS is active."""
    import subprocess
    import sys

    if active_blas() != "openblas":
        return {"available": False, "note": f"this process runs {active_blas()} BLAS; nothing to compare with"}
    env = env_without_openblas()
    args = [sys.executable, "-m", "mtpbench.bench", model, str(prompt_tokens), ",".join(map(str, ks)),
            str(max_tokens), str(repeats)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"available": False, "note": f"reference-BLAS child failed: {done.stderr.strip().splitlines()[-1:]}"}
    ref = json.loads(done.stdout.strip().splitlines()[-1])
    verify = {v["k"]: v["seconds"] for v in here["costs"]["verify_s"]}
    return {"available": True, "reference": ref, "openblas": here,
            "ar_tok_s_ratio": here["ar_tok_s"] / ref["ar_tok_s"],
            "ar_step_ratio": ref["costs"]["ar_step_s"] / here["costs"]["ar_step_s"],
            "verify_ratio": {str(v["k"]): v["seconds"] / verify[v["k"]] for v in ref["costs"]["verify_s"]}}


# --- the whole bench -----------------------------------------------------------------------------------------


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
    eff = section("mtp", "predicted vs realized speedup",
                  lambda: mtp_efficiency(bundle, prompt, s.ks, s.max_tokens, s.repeats, costs))
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


def measure_cost_model(model: str | Path, out_dir: Path, ks: Sequence[int]) -> dict[str, Any]:
    """The cost terms and weight bytes a sweep's summary predicts and projects speedups from, written to
    `out_dir/cost_model.json`: `measure_costs` (the decoder's own ops, interleaved medians) and the roofline's
    byte counts, without bench's decode runs, parity or context scaling (seconds, not minutes)."""
    s = BenchSettings(ks=tuple(ks))
    bundle = load(model, require_mtp=True)
    prompt = bench_prompt(bundle, s)
    costs = measure_costs(bundle, prompt, s.ks, s.repeats, s.warmup)
    doc = {"schema": SCHEMA, "created_at": now_iso(), "complete": True, "kind": "cost_model",
           "blas": active_blas(), "provenance": dict(provenance()), "model": _model_facts(bundle),
           "costs": costs.to_dict(),
           "roofline": {"trunk_bytes": weight_bytes(bundle), "draft_step_bytes": draft_step_bytes(bundle)}}
    write_json(Path(out_dir) / COST_MODEL, doc)
    return doc


def cost_models_into(out: Path, models: list[str], ks: tuple[int, ...], log: Log | None = None) -> None:
    """`measure_cost_model` per checkpoint into out/bench/<name>/ (what a sweep keeps by default; `--bench`
    keeps the whole bench instead); one already there, or a bench, is kept."""
    for model in models:
        where = out / "bench" / safe_name(model)
        if (where / COST_MODEL).exists() or (where / "bench.json").exists():
            continue
        if log:
            log(f"cost model of {safe_name(model)}: AR step, draft steps, verify K={list(ks)}, rollback")
        try:
            measure_cost_model(model, where, ks)
        except Exception as e:  # the sweep's results stand without it; the summary then shows realized speedups only
            if log:
                log(f"no cost model for {safe_name(model)}: {e}")


def safe_name(model: str) -> str:
    """A checkpoint's directory name (or repo id), made safe for a directory name."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"


if __name__ == "__main__":  # the reference-BLAS child of blas_comparison: MODEL PROMPT_TOKENS KS MAX_TOKENS REPEATS
    import sys

    _m, _p, _ks, _n, _r = sys.argv[1:6]
    print(json.dumps(_costs_and_ar(_m, int(_p), [int(k) for k in _ks.split(",")], int(_n), int(_r))))
