"""`mtpbench doctor`: is the instrument sound on this machine and checkpoint? One verdict per check, in under a
minute on the demo: what a user runs before publishing a card.

Each check is a small function returning a `Check`; `run_doctor` runs them in order (a check that raises fails with
its message, the others still run). The short decodes are deterministic (greedy, EOS ignored) except the cost
model's, which is the one timing verdict; the machine check reads the machine before and after all the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..decode import generate_ar, generate_mtp
from ..decode.counts import count_problems
from ..decode.limits import ROLLBACKS
from ..machine import busy_reasons, snapshot
from ..model.blas import active_blas
from ..model.checkpoint import Bundle, load
from ..sampling import SamplingConfig
from .efficiency import TARGET_ERROR, mtp_efficiency
from .runs import abba
from .settings import GREEDY, pattern_prompt

TOKENS = 48  # tokens per identity decode
K = 3
LONG_PROMPT = 512  # prompt tokens of the prefill split check
PREFILL_ROUNDS = 7
# MTP prefill / AR prefill below this fails: the demo head's share of a 512-token prefill is a few percent, inside
# the timing noise, so the ratio catches gross slips only; where the head's pass runs (between the prefill clock's
# two readings) is held exactly by the call-order test.
PREFILL_FLOOR = 0.9
COST_ROUNDS = 7


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def check_blas(bundle: Bundle, prompt: list[int]) -> Check:
    """The BLAS in use loads and multiplies right (a float32 matmul against numpy's float64)."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((96, 64)).astype(np.float32), rng.standard_normal((64, 80)).astype(np.float32)
    got = np.asarray(mx.matmul(mx.array(a), mx.array(b)))
    err = float(np.max(np.abs(got - a.astype(np.float64) @ b.astype(np.float64))))
    return Check("BLAS", err < 1e-3, f"{active_blas()} BLAS, matmul max error {err:.1e}")


def check_ar_parity(bundle: Bundle, prompt: list[int]) -> Check:
    """Our greedy AR equals `mlx_lm.stream_generate` token for token."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(bundle.path))
    tokenizer.eos_token_ids = set()
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=TOKENS)]
    ours = generate_ar(bundle, prompt, GREEDY, TOKENS, records=False, ignore_eos=True).tokens
    same = _common_prefix(ours, theirs)
    return Check("greedy AR = mlx_lm.stream_generate", ours == theirs,
                 f"{same} of {len(theirs)} tokens identical")


def check_mtp_identity(bundle: Bundle, prompt: list[int]) -> Check:
    """Greedy MTP (K=3, both rollbacks) emits exactly the greedy AR tokens."""
    ar = generate_ar(bundle, prompt, GREEDY, TOKENS, records=False, ignore_eos=True).tokens
    runs = {rb: generate_mtp(bundle, prompt, GREEDY, K, TOKENS, records=False, ignore_eos=True, rollback=rb).tokens
            for rb in ROLLBACKS}
    bad = [f"{rb} diverges at token {_common_prefix(ar, t)}" for rb, t in runs.items() if t != ar]
    return Check(f"greedy MTP K={K} = AR", not bad, "; ".join(bad) or f"{len(ar)} tokens identical, both rollbacks")


def check_counts(bundle: Bundle, prompt: list[int]) -> Check:
    """The counter invariants (`decode.counts`) hold with records on, greedy and sampled (EOS honoured)."""
    problems = []
    for cfg in (GREEDY, SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, seed=1)):
        r = generate_mtp(bundle, prompt, cfg, K, TOKENS, records=True)  # decoders check too: this names the breaks
        problems += [f"{cfg.label()}: {p}" for p in count_problems(r)]
    return Check("counter invariants", not problems, "; ".join(problems) or
                 "emitted = 1 + accepted + residual/bonus, per-depth monotone, steps/tokens tables agree")


def check_prefill_split(bundle: Bundle, prompt: list[int]) -> Check:
    """The head's prompt pass is prefill: the decoder's prefill leaves the MTP cache holding every prompt pair, and
    MTP's prefill (trunk + head) is not below AR's (trunk) on a long prompt (`PREFILL_FLOOR`; medians of
    `PREFILL_ROUNDS`, the order alternated: one prefill is milliseconds on the demo, and 3 rounds read 0.95-1.06x
    on a quiet 2-core VM)."""
    from ..decode.speculative import prefill

    long = pattern_prompt(bundle, min(LONG_PROMPT, bundle.context_length - TOKENS - K - 2))
    cache, mtp_cache = bundle.trunk.make_cache(), bundle.draft_head.make_cache()
    prefill(bundle, long, cache, mtp_cache)
    held = mtp_cache[0].offset
    ar, mtp = abba([lambda: generate_ar(bundle, long, GREEDY, 2, records=False, ignore_eos=True).prefill_s,
                    lambda: generate_mtp(bundle, long, GREEDY, 1, 2, records=False, ignore_eos=True).prefill_s],
                   PREFILL_ROUNDS)
    ratio = float(np.median(mtp) / np.median(ar))
    ok = held == len(long) - 1 and ratio >= PREFILL_FLOOR
    return Check("prefill/decode split", ok, f"head holds {held} of {len(long) - 1} prompt pairs after prefill; "
                 f"MTP/AR prefill {ratio:.2f}x at {len(long)} tokens (head included)")


def check_cost_model(bundle: Bundle, prompt: list[int]) -> Check:
    """The cost model predicts a short greedy K=2 run's speedup within its stated error (`TARGET_ERROR`), terms and
    runs timed in the same rounds (`COST_ROUNDS`: with 3, a quiet 2-core VM read +2% to +33%)."""
    (row,) = mtp_efficiency(bundle, prompt, (2,), 128, COST_ROUNDS)
    ok = abs(row["error"]) <= TARGET_ERROR
    return Check("cost model", ok, f"K=2 predicted {row['predicted_speedup']:.3f}x, realized "
                 f"{row['realized_speedup']:.3f}x ({100 * row['error']:+.1f}%, stated error "
                 f"{100 * TARGET_ERROR:.0f}%)")


CHECKS: tuple[Callable[[Bundle, list[int]], Check], ...] = (
    check_blas, check_ar_parity, check_mtp_identity, check_counts, check_prefill_split, check_cost_model)


def run_doctor(model: str, say: Callable[[str], None] = print) -> list[Check]:
    """Every check on `model`, each line said as it completes; the machine check last, over the whole run."""
    t0, start = time.perf_counter(), snapshot()
    bundle = load(model, require_mtp=True)
    prompt = pattern_prompt(bundle, 64)
    out = []
    for check in CHECKS:
        try:
            c = check(bundle, prompt)
        except Exception as e:  # a check that cannot run is a failed check, and the rest still run
            c = Check(check.__name__.removeprefix("check_"), False, f"{type(e).__name__}: {e}")
        out.append(c)
        say(c.line())
    busy = busy_reasons(start, snapshot())
    quiet = Check("machine quiet", not busy, "; ".join(busy) or
                  f"load {'?' if start.load_1m is None else f'{start.load_1m:.2f}'} on {start.cores} cores")
    out.append(quiet)
    say(quiet.line())
    say(f"{sum(c.ok for c in out)} of {len(out)} checks hold ({time.perf_counter() - t0:.0f} s)")
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
