"""The same cost terms with mlx's bundled reference BLAS, in a child process without the OpenBLAS preload (a
library cannot be unloaded); `python -m mtpbench.perf.blas` is that child."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..model.blas import active_blas, env_without_openblas
from ..model.checkpoint import load
from .costs import measure_costs
from .runs import decode, median
from .settings import context_cap, pattern_prompt


def _costs_and_ar(model: str, prompt_tokens: int, ks: Sequence[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    """Cost terms and AR decode tok/s of one checkpoint in this process (whatever BLAS it has mapped)."""
    bundle = load(model, require_mtp=True)
    prompt = pattern_prompt(bundle, min(prompt_tokens, context_cap(bundle, max_tokens, ks)))
    costs = measure_costs(bundle, prompt, ks, repeats, warmup=1)
    ar = [decode(bundle, prompt, 0, max_tokens).decode_tok_s for _ in range(repeats + 1)][1:]
    return {"blas": active_blas(), "costs": costs.to_dict(), "ar_tok_s": median(ar)}


def blas_comparison(model: str, prompt_tokens: int, ks: Sequence[int], max_tokens: int, repeats: int,
                    here: dict[str, Any]) -> dict[str, Any]:
    """The same cost terms and AR tok/s with mlx's bundled reference BLAS, measured in a child process without the
    OpenBLAS preload (a library cannot be unloaded), next to this process's. Only where OpenBLAS is active."""
    import subprocess
    import sys

    if active_blas() != "openblas":
        return {"available": False, "note": f"this process runs {active_blas()} BLAS; nothing to compare with"}
    env = env_without_openblas()
    args = [sys.executable, "-m", "mtpbench.perf.blas", model, str(prompt_tokens), ",".join(map(str, ks)),
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


if __name__ == "__main__":  # the reference-BLAS child of blas_comparison: MODEL PROMPT_TOKENS KS MAX_TOKENS REPEATS
    import sys

    _m, _p, _ks, _n, _r = sys.argv[1:6]
    print(json.dumps(_costs_and_ar(_m, int(_p), [int(k) for k in _ks.split(",")], int(_n), int(_r))))
