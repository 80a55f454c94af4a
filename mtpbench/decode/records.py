"""Plain records a decoder hands back; the sweep turns them into parquet rows (the decoder knows no parquet)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepRecord:
    """One drafted position of one verify step."""

    step: int
    depth: int  # 1-based
    drafted_token: int
    accepted: bool
    p_draft: float  # target probability of the drafted token (after the sampling transform)
    q_draft: float  # draft probability of the drafted token
    alpha: float  # sum_v min(p_v, q_v): the exact acceptance probability of an unbiased rule here


@dataclass(frozen=True)
class TokenRecord:
    """One emitted token."""

    index: int
    token_id: int
    source: str  # ar | accepted | residual | bonus
    target_logprob: float  # log p(token) under the sampling distribution the token should follow
    pit_u: float  # randomized PIT value, Uniform(0, 1) under exact sampling
    logprob_mean: float = float("nan")  # E_p[log p(X)] (= -entropy) of the row the token should follow
    logprob_var: float = float("nan")  # Var_p[log p(X)]: with the mean, gives the log-likelihood score test
    logprob_m3: float = float("nan")  # E_p[(log p(X) - mean)^3]: the skew the score test's tail correction needs
    cond_pit_u: float = float("nan")  # PIT under the token's law given its source (accepted | residual | bonus)


@dataclass(frozen=True)
class DecodeResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float  # prompt forward and the first token
    decode_s: float  # every later token
    k: int = 0
    verify_steps: int = 0
    drafted_at_depth: list[int] = field(default_factory=list)
    accepted_at_depth: list[int] = field(default_factory=list)  # accepted drafts emitted, by depth
    # drafts that reached each depth: drafted, verified, every earlier draft of the step accepted and emitted (the
    # steps table's rows; `decode.counts` has the definition and the invariants)
    reached_at_depth: list[int] = field(default_factory=list)
    bonus_tokens: int = 0  # residual/bonus tokens emitted (at most one per verify step)
    accepted_per_step: list[int] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    token_records: list[TokenRecord] = field(default_factory=list)
    finished_by: str = "length"  # length | eos
    peak_memory_bytes: int = 0
    # Sampled MTP with records: the decoder's target row (ids, probs of its support; None when too wide) per
    # emitted token, for the drift against a fresh rescoring (decode/rescore.py). Never written to parquet as is.
    target_rows: list = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second of decode: the same definition for AR and MTP."""
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else float("nan")

    @property
    def drafted_tokens(self) -> int:
        return sum(self.drafted_at_depth)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_at_depth)

    @property
    def mean_acceptance_length(self) -> float:
        """tau = 1 + accepted drafts per verify step (tokens per target forward)."""
        return 1 + self.accepted_tokens / self.verify_steps if self.verify_steps else float("nan")
