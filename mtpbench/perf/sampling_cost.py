"""What sampled decoding costs beside greedy: host work per row, bytes read back per step, sampled/greedy time.

At Qwen's vocabulary (248,320) a sampled step moves vocabulary-sized rows to the host and selects there
(`sampling.support`); on a fast device that host work can outweigh the forwards. This module measures it on the
machine it runs on, so the choice of where the selection runs (host numpy, see `decode.common.host_supports`, or
mlx on the device) rests on figures: `row_costs` times both, plus the dense float64 transform the decoder used
before (`sampling_probs`, now the test oracle). `decode_costs` times sampled against greedy decoding (AR per
token, MTP per verify step) in alternating rounds (ABBA), the ratio the bench reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..decode import generate_ar, generate_mtp
from ..decode.common import now
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig, sampling_probs, support

QWEN_SAMPLED = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20)
SETTINGS = {"T=0.6 top_p=0.95 top_k=20": QWEN_SAMPLED, "T=0.6 top_p=0.95": SamplingConfig(0.6, top_p=0.95),
            "T=1": SamplingConfig(1.0)}


def _median_ms(op: Callable[[], Any], repeats: int) -> float:
    op()
    times = []
    for _ in range(repeats):
        t0 = now()
        op()
        times.append(now() - t0)
    return 1e3 * statistics.median(times)


def device_selection(logits: mx.array, cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The top-k selection on the device (mlx argpartition, and the log-sum-exp top-p needs), bringing back only
    k ids and values: the alternative `host_supports` is measured against (timing only, ties at the cut ignored)."""
    k = cfg.top_k
    ids = mx.argpartition(-logits, k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, ids, axis=-1)
    lse = mx.logsumexp(logits, axis=-1) if cfg.top_p < 1 else mx.zeros(logits.shape[:-1])
    mx.eval(ids, vals, lse)
    return np.asarray(ids), np.asarray(vals) - np.asarray(lse)[..., None]


def row_costs(vocab: int, repeats: int = 15, rows: np.ndarray | None = None, dense: bool = True) -> list[dict]:
    """Milliseconds per row of `support` (host), of the device selection (top-k settings) and of the dense oracle,
    on `rows` (float32 logits; default: N(0, 3^2) rows of `vocab` ids) for each of `SETTINGS`."""
    if rows is None:
        rows = (np.random.default_rng(0).standard_normal((4, vocab)) * 3).astype(np.float32)
    out = []
    for name, cfg in SETTINGS.items():
        host = statistics.median(_median_ms(lambda r=r: support(r, cfg), repeats) for r in rows)
        entry = {"setting": name, "vocab": int(rows.shape[-1]), "host_ms": host,
                 "support_size": float(np.mean([len(support(r, cfg).ids) for r in rows]))}
        if cfg.top_k:
            on_device = mx.array(rows[:1])
            entry["device_ms"] = _median_ms(lambda: device_selection(on_device, cfg), repeats)
        if dense:
            entry["dense_oracle_ms"] = _median_ms(lambda: sampling_probs(rows[:1], cfg), max(3, repeats // 5))
        out.append(entry)
    return out


def read_back_bytes(vocab: int, k: int, sampled: bool) -> int:
    """Bytes the host reads per step: greedy MTP 2K+1 int32 ids (AR: one); sampled K draft rows and K+1 target
    rows of float32 logits (AR: one row)."""
    if k == 0:
        return 4 * vocab if sampled else 4
    return 4 * vocab * (2 * k + 1) if sampled else 4 * (2 * k + 1)


def decode_costs(bundle: Bundle, prompt: list[int], ks: Sequence[int] = (0, 3), max_tokens: int = 24,
                 repeats: int = 5, cfg: SamplingConfig = QWEN_SAMPLED) -> list[dict]:
    """Sampled vs greedy decode time per AR token (k = 0) and per MTP verify step (k > 0), ABBA medians, same
    checkpoint, prompt and length (EOS ignored), records on as in a sweep."""
    vocab = int(bundle.trunk.lm.args.vocab_size)
    out = []
    for k in ks:
        def run(c: SamplingConfig, k: int = k) -> float:
            if k == 0:
                r = generate_ar(bundle, prompt, c, max_tokens, ignore_eos=True)
                return r.decode_s / (len(r.tokens) - 1)
            r = generate_mtp(bundle, prompt, c, k, max_tokens, ignore_eos=True)
            return r.decode_s / r.verify_steps

        greedy, sampled = [], []
        for i in range(repeats + 1):  # round 0 warms up; odd rounds reverse the order
            arms = [(greedy, SamplingConfig()), (sampled, cfg)]
            for times, c in arms if i % 2 == 0 else arms[::-1]:
                t = run(c)
                if i:
                    times.append(t)
        g, s = statistics.median(greedy), statistics.median(sampled)
        out.append({"k": k, "unit": "token" if k == 0 else "verify step", "setting": cfg.label(), "greedy_s": g,
                    "sampled_s": s, "ratio": s / g, "extra_share": (s - g) / s,
                    "read_back_bytes_greedy": read_back_bytes(vocab, k, False),
                    "read_back_bytes_sampled": read_back_bytes(vocab, k, True), "repeats": repeats})
    return out


def sampling_section(bundle: Bundle, prompt: list[int], k: int, max_tokens: int, repeats: int) -> dict[str, Any]:
    """`mtpbench bench`'s sampling section: per-row work at Qwen's vocabulary and at the checkpoint's, and the
    sampled/greedy decode ratios (AR and MTP at depth `k`) on the checkpoint."""
    vocab = int(bundle.trunk.lm.args.vocab_size)
    return {"rows": row_costs(248_320) + (row_costs(vocab) if vocab != 248_320 else []),
            "decode": decode_costs(bundle, prompt, (0, k), max_tokens, repeats)}
