"""Verification controls: deliberately broken (negative) or different-but-unbiased (positive) acceptance rules.

Each is the one exact rule with one switch flipped (see rule.py), selectable only by `mtpbench verify --control`,
so a test that rejects a control is shown to catch exactly that mistake. The decoder-side switches (draft
temperature, filters, rollback, causal mask) act only in the sampled step: the greedy fast path runs the exact
rule alone, so these bugs are confined to the sampled path as the field's were.
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
    Control("bonus-previous-row", "negative", "draw the bonus token from the last draft's target row p_K, not p_K+1",
            Rule(bonus="previous")),
    Control("draft-hotter", "negative", "draw drafts at temperature T x 1.3 while q (the rule's) stays at T",
            Rule(draft_temperature_scale=1.3)),
    Control("shared-uniform", "negative", "reuse the acceptance test's uniform to draw the residual token",
            Rule(uniform="shared")),
    Control("lenient-ratio", "negative", "accept with probability min(1, (p/q)^0.8) instead of min(1, p/q)",
            Rule(accept="ratio_power")),
    Control("filters-accept-only", "negative",
            "top-p/top-k/min-p applied to the acceptance test, not to the residual", Rule(filters="accept_only")),
    Control("filters-residual-only", "negative",
            "top-p/top-k/min-p applied to the residual, not to the acceptance test", Rule(filters="residual_only")),
    Control("ratio-at-t1", "negative",
            "the acceptance ratio uses p and q at temperature 1 while drafts and residuals are sampled at T",
            Rule(ratio_temperature="one")),
    Control("rollback-commit-next", "negative",
            "after j accepted drafts, commit the trunk state of position j+1 (keeps one rejected draft)",
            Rule(rollback="commit_next")),
    Control("rollback-keep-gdn", "negative",
            "after a rejection, trim the KV caches but leave the GatedDeltaNet states un-rolled-back",
            Rule(rollback="keep_gdn")),
    Control("no-causal-mask", "negative",
            "run the verify forward without the causal mask (positions attend to later drafts)",
            Rule(causal_mask=False)),
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
