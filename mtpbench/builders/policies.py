"""Quantization policies as data: which component gets which bits, for the trunk and for the MTP head.

A policy is a table "component -> bits" for the trunk and one for the MTP head (see shared/MTP.md, "Quantization
policies seen in the wild"). Components are the ones `mtpbench inspect` shows (`describe.component`), so what a
policy asks for is exactly what `inspect` reports back. Pure Python: the sweep spec validates policy names here
without loading mlx; `quantize.py` applies them.

"bf16" means "leave every tensor in its stored dtype": real releases are bf16, the tiny test checkpoints fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

MODE = "affine"
VALID_BITS = (2, 3, 4, 5, 6, 8)
KEEP_BITS = 16  # lm_head_bits=16: leave the vocab-sized matrices unquantized
DEFAULT_GROUP_SIZE = 64

Rules = tuple[tuple[str, int], ...]  # (component, bits); a component not listed stays unquantized
# `experts` (routed experts, switch layers) and `router` (the expert gate and the shared expert's gate) exist in MoE
# checkpoints only; a dense checkpoint simply has no tensor of theirs. Routers stay at 8 bits under every quantizing
# policy, as mlx_lm's own conversions keep them: their few rows decide which experts run at all.
TRUNK_COMPONENTS = ("gated_deltanet", "attention", "mlp", "experts", "router", "embedding", "lm_head")
VOCAB_COMPONENTS = ("embedding", "lm_head")
ROUTER_BITS = 8


def _uniform(bits: int) -> Rules:
    return tuple((c, ROUTER_BITS if c == "router" else bits) for c in TRUNK_COMPONENTS)


def _head(bits: int) -> Rules:
    return (("attention", bits), ("mlp", bits), ("experts", bits), ("router", ROUTER_BITS))


# name -> (description, rules). Data, not code: add a policy by adding a row.
TRUNK_POLICIES: dict[str, tuple[str, Rules]] = {
    "bf16": ("no quantization: every tensor keeps its stored dtype (bf16 releases stay bf16, fp32 stays fp32)", ()),
    "q8": ("8-bit affine linears (experts too), embedding and lm_head; norms, conv1d and GDN gates untouched", _uniform(8)),
    "q4": ("4-bit affine linears (experts too; routers 8-bit), embedding and lm_head; norms, conv1d and GDN gates "
           "untouched", _uniform(4)),
    "mixed-gdn8-mlp4": (
        "GatedDeltaNet + full-attention linears 8-bit, MLP (experts too) 4-bit, router 8-bit, embedding 8-bit, lm_head "
        "4-bit; norms untouched",
        (("gated_deltanet", 8), ("attention", 8), ("mlp", 4), ("experts", 4), ("router", ROUTER_BITS), ("embedding", 8),
         ("lm_head", 4)),
    ),
}
MTP_VARIANTS: dict[str, tuple[str, Rules]] = {
    "mtp-bf16": ("MTP head unquantized", ()),
    "mtp-int4": ("MTP attention/MLP (experts too) linears 4-bit, router 8-bit; fc and norms unquantized", _head(4)),
    "mtp-q8": ("MTP attention/MLP (experts too) linears 8-bit; fc and norms unquantized", _head(8)),
}
UNQUANTIZED_HEAD = "mtp-bf16"


@dataclass(frozen=True)
class Policy:
    """One trunk policy combined with one MTP-head variant, e.g. `q4+mtp-int4`."""

    name: str
    description: str
    trunk_rules: Rules
    mtp_rules: Rules
    mode: str = MODE


def _combine(trunk: str, head: str) -> Policy:
    t_desc, t_rules = TRUNK_POLICIES[trunk]
    h_desc, h_rules = MTP_VARIANTS[head]
    name = trunk if head == UNQUANTIZED_HEAD else f"{trunk}+{head}"
    return Policy(name=name, description=f"{t_desc}; {h_desc}", trunk_rules=t_rules, mtp_rules=h_rules)


POLICIES: dict[str, Policy] = {
    p.name: p for p in (_combine(t, h) for t in TRUNK_POLICIES for h in MTP_VARIANTS)
}


def get_policy(name: str | Policy) -> Policy:
    """Parse "TRUNK[+MTP]" (a plain trunk name keeps the head unquantized)."""
    if isinstance(name, Policy):
        return name
    trunk, _, head = str(name).strip().partition("+")
    head = head or UNQUANTIZED_HEAD
    if trunk not in TRUNK_POLICIES or head not in MTP_VARIANTS:
        raise UserError(f"unknown policy {name!r}: use TRUNK[+MTP] with TRUNK one of {', '.join(TRUNK_POLICIES)} "
                        f"and MTP one of {', '.join(MTP_VARIANTS)} (see `mtpbench policies`)")
    return _combine(trunk, head)


def policy_lines() -> list[str]:
    """One line per built-in policy: `NAME  description`."""
    width = max(map(len, POLICIES))
    return [f"{name:<{width}}  {p.description}" for name, p in POLICIES.items()]
