"""Verification controls: deliberately broken (negative) or different-but-unbiased (positive) acceptance rules.

Each is the one exact rule with one switch flipped (see rule.py), selectable only by `mtpbench verify --control`,
so a test that rejects a control is shown to catch exactly that mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .rule import Rule


@dataclass(frozen=True)
class Control:
    name: str
    kind: str  # negative | positive
    description: str
    rule: Rule


CONTROLS: dict[str, Control] = {c.name: c for c in [
    Control("argmax-accept", "negative", "accept a draft when it equals the target's argmax, even at T > 0",
            Rule(accept="target_argmax")),
    Control("resample-target", "negative", "on rejection, resample from p instead of the residual max(0, p - q)",
            Rule(correction="target")),
    Control("correction-from-draft", "negative", "on rejection, sample the correction from q",
            Rule(correction="draft")),
    Control("draft-only-transform", "negative",
            "apply temperature/top-p/top-k to the draft only (the target stays raw softmax)",
            Rule(target_transform="raw")),
    Control("bonus-argmax", "negative", "take the bonus token as the target's argmax instead of sampling it",
            Rule(bonus="argmax")),
    Control("sample-match", "positive",
            "accept when the draft equals an independent sample of the target: unbiased, but accepts less",
            Rule(accept="target_sample")),
]}


def get_control(name: str | None) -> Control | None:
    if name is None or name == "none":
        return None
    if name not in CONTROLS:
        raise UserError(f"unknown control {name!r}; see `mtpbench verify --list-controls`")
    return CONTROLS[name]
