"""Achieved weight bandwidth of each mode's measured tok/s, against the machine's copy bandwidth (the byte counts
are `model.roofline`'s)."""

from __future__ import annotations

from typing import Any

from ..model.checkpoint import Bundle
from ..model.roofline import bytes_per_token, copy_bandwidth, draft_step_bytes, nbytes, weight_bytes


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
