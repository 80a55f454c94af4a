"""The cost terms of a speculative step, each timed in isolation as the decoder runs it (AR step, draft chain,
(K+1)-token verify, both rollbacks), as interleaved medians on a cache primed with the prompt."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import numpy as np

from ..decode.cache import restore, snapshot, state_arrays
from ..decode.common import choose, host_supports, now as _clock
from ..decode.rule import EXACT, apply_rule
from ..decode.speculative import prefill, verify_forward
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from ..stats.acceptance import StepCosts


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


def _put_back(st: _Primed) -> Callable[[], None]:
    """What puts the primed caches back after each timed op (a snapshot of the trunk's, the head's offset)."""
    snap, mtp_offset = snapshot(st.cache), st.mtp_cache[0].offset

    def put_back() -> None:
        restore(st.cache, snap)
        for c in st.mtp_cache:
            c.trim(c.offset - mtp_offset)
    return put_back


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
    put_back = _put_back(st)
    roll_backs: list[Callable[[int], None]] = []

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


@dataclass(frozen=True)
class SampledTerms:
    """The sampled step's own terms at one setting (`measure_sampled_terms`): what the greedy terms leave out."""

    setting: str
    drafts: dict[int, float]  # K -> K sampled drafts: head step, one host row, a sample, a sync each
    verify: dict[int, float]  # K -> (K+1)-token verify (capture), K+1 host rows, the rule

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "drafts_s": [{"k": k, "seconds": s} for k, s in sorted(self.drafts.items())],
                "verify_s": [{"k": k, "seconds": s} for k, s in sorted(self.verify.items())]}


def measure_sampled_terms(bundle: Bundle, prompt_ids: list[int], ks: Sequence[int], cfg: SamplingConfig,
                          repeats: int = 5, warmup: int = 2) -> SampledTerms:
    """Median seconds of the sampled step's drafts and verify at `cfg`, run as `decode.speculative._sampled_step`
    runs them: each draft brings its row to the host and samples before the next (K syncs), the verify brings K+1
    rows and applies the exact rule. The rollback is the greedy one's (the same commit)."""
    trunk, head = bundle.trunk, bundle.draft_head
    st = _prime(bundle, prompt_ids)
    rng = np.random.default_rng(cfg.seed)
    kmax = max(ks)
    put_back = _put_back(st)
    q_rows = host_supports(head.lm_head(head(mx.repeat(st.hidden, kmax, axis=1), head.embed(
        mx.array([[st.last] * kmax])), head.make_cache()))[0], cfg)  # draft rows the rule is fed (values matter little)
    drafts = [choose(q, cfg, rng) for q in q_rows]
    window = mx.array([[st.last] + drafts])

    def draft_chain(k: int) -> Callable[[], None]:
        def op() -> None:
            z, tok = st.hidden, st.last
            for _ in range(k):
                z = head(z, head.embed(mx.array([[tok]])), st.mtp_cache)
                tok = choose(host_supports(head.lm_head(z)[0], cfg)[0], cfg, rng)
        return op

    def verify(k: int) -> Callable[[], None]:
        def op() -> None:
            out, _ = verify_forward(trunk, st.cache, window[:, : k + 1], "capture")
            apply_rule(host_supports(out.logits[0], cfg), q_rows[:k], drafts[:k], rng, EXACT)
        return op

    ops = {f"draft{k}": (draft_chain(k), None) for k in sorted(set(ks))}
    ops |= {f"verify{k}": (verify(k), None) for k in sorted(set(ks))}
    t = _interleaved_medians(ops, put_back, repeats, warmup)
    return SampledTerms(cfg.label(), {k: t[f"draft{k}"] for k in sorted(set(ks))},
                        {k: t[f"verify{k}"] for k in sorted(set(ks))})



def _median(values: Sequence[Any]) -> Any:
    """The element-wise median of like values: numbers, dicts by key, tuples by index; anything else the first's."""
    first = values[0]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return type(first)(statistics.median(values))
    if isinstance(first, dict):
        return {key: _median([v[key] for v in values]) for key in first}
    if isinstance(first, tuple):
        return tuple(_median([v[i] for v in values]) for i in range(len(first)))
    return first


def median_terms(rounds: Sequence[Any]) -> Any:
    """The median of one kind of terms (`MeasuredCosts`, `SampledTerms`) measured in several rounds, term by term:
    what the cost model prices a setting with when its terms were timed in the same rounds as its runs."""
    return type(rounds[0])(**{f.name: _median([getattr(r, f.name) for r in rounds]) for f in fields(rounds[0])})
