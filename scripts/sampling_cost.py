"""Sampled vs greedy cost at a wide vocabulary: `PYTHONPATH=. python scripts/sampling_cost.py [CHECKPOINT [REPEATS]]`.

Prints one JSON object: per-row sampling work (host `support`, device selection, dense oracle) at V = 248,320,
and, given a checkpoint (e.g. `mtpbench make-tiny DIR --layers 2 --hidden 256 --vocab-size 248320`), AR sampled
vs greedy time per token and MTP K=3 sampled vs greedy time per verify step (ABBA medians), with the bytes read
back per step, at top_k 20 (Qwen's recommended T=0.6 top_p=0.95 top_k=20) and at a wide support (T=0.6, top_k 0,
top_p 1: every id kept, the dense path of `sampling.alpha` / `sampling.residual`). The target: a sampled step at
most 1.15x the greedy one at both. See `mtpbench.perf.sampling_cost`.
"""

from __future__ import annotations

import json
import sys

from mtpbench.model.checkpoint import load
from mtpbench.perf.sampling_cost import QWEN_SAMPLED, decode_costs, row_costs
from mtpbench.sampling import SamplingConfig

WIDE = SamplingConfig(temperature=0.6, top_p=1.0, top_k=0)


def main(argv: list[str]) -> None:
    out: dict = {"rows": row_costs(248_320)}
    if argv:
        bundle = load(argv[0], require_mtp=True)
        prompt = bundle.tokenizer.encode("def merge(a, b):\n    out = []\n    i = j = 0\n")
        repeats = int(argv[1]) if len(argv) > 1 else 5
        out["decode"] = [row for cfg in (QWEN_SAMPLED, WIDE)
                         for row in decode_costs(bundle, prompt, (0, 3), max_tokens=24, repeats=repeats, cfg=cfg)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
