"""Sampled vs greedy cost at a wide vocabulary: `PYTHONPATH=. python scripts/sampling_cost.py [CHECKPOINT]`.

Prints one JSON object: per-row sampling work (host `support`, device selection, dense oracle) at V = 248,320,
and, given a checkpoint (e.g. `mtpbench make-tiny DIR --layers 2 --hidden 256 --vocab-size 248320`), AR sampled
vs greedy time per token and MTP K=3 sampled vs greedy time per verify step (ABBA medians), with the bytes read
back per step. See `mtpbench.perf.sampling_cost`.
"""

from __future__ import annotations

import json
import sys

from mtpbench.model.checkpoint import load
from mtpbench.perf.sampling_cost import decode_costs, row_costs


def main(argv: list[str]) -> None:
    out: dict = {"rows": row_costs(248_320)}
    if argv:
        bundle = load(argv[0], require_mtp=True)
        prompt = bundle.tokenizer.encode("def merge(a, b):\n    out = []\n    i = j = 0\n")
        repeats = int(argv[1]) if len(argv) > 1 else 5
        out["decode"] = decode_costs(bundle, prompt, (0, 3), max_tokens=24, repeats=repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
