"""Audit of a server's sampled output against a fresh target from a local checkpoint (shared/STATS.md, 5).

A server is a black box, so the only independent truth is the model itself: the user names a local checkpoint of
the weights the server serves (an assertion mtpbench cannot check; every report of an audit repeats it), and each
sampled run's tokens are scored against one teacher-forced forward of that checkpoint over prompt + output
(`decode.rescore.rescore_tokens`, the one rescoring). The run's prompt ids are the reference backend's encoding
(the same chat template), and the server must agree on their count, else the run is left unaudited.

Token ids come from the server's log-probs where it names them (an `id`, or vLLM's "token_id:123" strings with
`return_tokens_as_token_ids`); a stream that names none (mlx_lm.server sends log-probs only unstreamed) is
followed by one non-streamed replay of the same request, outside all timing, whose ids are audited; otherwise the
streamed text is re-tokenised with the local tokenizer chunk by chunk, and
the run is audited only if every streamed chunk is exactly one token, the count matches the server's, and
decode(ids) == text (a sampled, non-canonical split or a stripped special token would change the ids: never guess;
see `server_tokens`). Where the server reports log-probs, their drift from
the fresh untransformed log p is recorded (mlx_lm.server and vLLM report the model's raw log-softmax by default).

The sampling profile (`sampling.SamplingConfig.order`, `sampling.PROFILE_TABLE`) must be the server's: `mlx` for
mlx_lm.server and its forks (filters on the untempered log-probs, then temperature), `vllm` and `hf` (temperature
first, top-p renormalised over what top-k left), `temper-first` for SGLang (top-p on the whole tempered distribution), `llama.cpp` for llama-server (top_k, then top_p renormalised over what top_k left,
min_p, then temperature; a reordered `--samplers` chain is read from /props). `auto` is decided in `profiles.py`.
The profile used is recorded per run and in every verdict's note, so a profile mismatch is never read as a
sampler bug.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..decode.rescore import HIDDEN, rescore_tokens
from ..decode.teacher import head_alphas
from ..model.checkpoint import Bundle
from ..sampling import SamplingConfig
from .http import Answer

SOURCE = "server"  # the tokens table's source of an audited server token
FROM_IDS = "token ids reported by the server"
FROM_REPLAY = "token ids from a non-streamed replay of the request (the stream named none)"
FROM_NATIVE = "token ids from a replay at llama.cpp's native /completion (return_tokens; the stream named too few)"
EOS_ADDED = " (+ the EOS the server counted but did not show)"
EOS_IMPUTED = " (+ the EOS the server counted but did not show, imputed from the target over the {} EOS ids)"
FROM_TEXT = "re-tokenised text, one token per streamed chunk (round trip checked)"
UNAUDITED = "unaudited: "
REPEAT = "not audited: repeats the cell's audited request (same seed), whose sample it would count twice"


def assumption(model: str) -> str:
    """The sentence every audit result carries: what it rests on and who vouches for it."""
    return f"assumes the server serves the same weights as {model} (asserted by the user, not checked)"


def logprobs_request() -> dict[str, Any]:
    """The body fields that ask for the generated tokens' log-probs and ids. `logprobs: true` for chat and
    completions alike: mlx_lm.server refuses anything but a boolean (measured: an integer is HTTP 400), and the
    pydantic-validated servers (vLLM, SGLang) read true as 1 where the completions API wants a count. vLLM's
    `return_tokens_as_token_ids` names the ids (other servers ignore it)."""
    return {"logprobs": True, "return_tokens_as_token_ids": True}


@dataclass(frozen=True)
class ServerTokens:
    ids: list[int] | None  # None: unaudited
    how: str  # FROM_IDS, FROM_TEXT, or UNAUDITED + the reason


def server_tokens(answer: Answer, tokenizer: Any, eos_ids: frozenset[int] | set[int] = frozenset()) -> ServerTokens:
    """The generated ids of one answer: as the server named them, else its streamed text re-tokenised chunk by chunk
    when that is unambiguous.

    Re-tokenising the whole text is not enough: a sampled sequence is often not the tokenizer's canonical split
    (measured on mlx_lm.server with the demo: 29 of 30 runs re-tokenised to more tokens than were generated, and
    the one whose count matched still had 10 tokens the target could not have emitted: a different split, not a
    sampler bug). So the text is used only when the server streamed one chunk per token (mlx_lm.server does) and
    every chunk is exactly one token's text: then the ids are determined, and decode(ids) == text is checked.

    An EOS the server counts but never shows (finish 'stop', one token fewer than counted) is part of the sample:
    left out, each run's last position would keep only non-EOS draws and the PIT sample would have a hole (KS p
    1.5e-12 in a simulation at mean length 20). With one EOS id in the checkpoint it is appended; with several it
    is appended as `rescore.HIDDEN`, which the rescoring imputes from the fresh row over the EOS ids (exact under
    the null: the hidden token's law given that it is an EOS)."""
    n = answer.completion_tokens
    stop_uncounted = answer.finish_reason == "stop"  # an EOS the server counts but never shows

    def count_ok(m: int) -> bool:
        return n is None or m == n or (stop_uncounted and m == n - 1)

    def with_eos(ids: list[int], how: str) -> ServerTokens:
        if n is None or not stop_uncounted or len(ids) != n - 1 or (ids and ids[-1] in eos_ids):
            return ServerTokens(ids, how)
        if len(eos_ids) == 1:
            return ServerTokens(ids + list(eos_ids), how + EOS_ADDED)
        if eos_ids:
            return ServerTokens(ids + [HIDDEN], how + EOS_IMPUTED.format(len(eos_ids)))
        return ServerTokens(ids, how + " (the token the server counted but did not show is not scored: the "
                                       "checkpoint names no EOS id)")

    if answer.token_ids is not None:
        ids = list(answer.token_ids)
        if not count_ok(len(ids)):
            return ServerTokens(None, f"{UNAUDITED}the server named {len(ids)} token ids but reported {n} tokens (a "
                                      f"speculative server names only tokens it did not take from a draft), and no "
                                      f"replay named them all")
        return with_eos(ids, FROM_IDS)
    if answer.ids_named:
        return ServerTokens(None, f"{UNAUDITED}the server named ids for {answer.ids_named} of its {n} tokens (a "
                                  f"speculative server names only tokens it did not take from a draft), and no "
                                  f"replay named them all")
    pieces = answer.pieces or ((answer.text,) if answer.text else ())
    if n is None or not count_ok(len(pieces)):
        return ServerTokens(None, f"{UNAUDITED}no token ids, and the {len(pieces)} streamed chunks do not map one to "
                                  f"one onto the {n} generated tokens")
    ids = []
    for piece in pieces:
        one = list(tokenizer.encode(piece, add_special_tokens=False))
        if len(one) != 1 or tokenizer.decode(one) != piece:
            return ServerTokens(None, f"{UNAUDITED}no token ids, and a streamed chunk is not exactly one token")
        ids += one
    if tokenizer.decode(ids) != "".join(pieces):
        return ServerTokens(None, f"{UNAUDITED}tokenization round trip failed")
    return with_eos(ids, FROM_TEXT)


def names_every_token(answer: Answer) -> bool:
    """Whether an answer names an id for each token it counts (an EOS counted but not shown aside): a speculative
    server's stream names only the tokens it did not take from a draft."""
    if answer.error or answer.token_ids is None:
        return False
    n, m = answer.completion_tokens, len(answer.token_ids)
    return n is None or m == n or (answer.finish_reason == "stop" and m == n - 1)


@dataclass(frozen=True)
class Audit:
    status: str  # how the tokens were obtained, or UNAUDITED + why
    tokens: list[dict[str, Any]]  # tokens-table rows (source "server") with the fresh columns
    seconds: float  # the rescoring's cost (not in any timing)
    alphas: tuple[float, ...] = ()  # teacher-forced alpha at each draftable position (decode.teacher.head_alphas)


def audit_run(bundle: Bundle, prompt: list[int], answer: Answer, cfg: SamplingConfig, profile: str,
              run_id: str, replay: Answer | None = None, native: Answer | None = None) -> Audit:
    """Rescore one server answer against the local checkpoint under the server's profile, as tokens rows.

    `replay`: a non-streamed answer to the same request, for a stream that named no ids. When it names them, it is
    the sample audited (another draw from the same sampler at the same settings and seed: as valid a test of the
    server's sampling as the streamed one, which it usually repeats token for token); else the stream's text is
    re-tokenised chunk by chunk. `native`: llama.cpp's `/completion` replay (ids for every token), used when
    neither the stream nor the replay named them all (a speculative llama-server).

    The teacher-forced alpha of the local checkpoint's MTP head at each draftable position rides along: what an
    exact optimal rule would accept there, against which the server's own acceptance is its rule's efficiency."""
    for other, how in ((replay, FROM_REPLAY), (native, FROM_NATIVE)):
        if not names_every_token(answer) and other is not None and names_every_token(other):
            audited = audit_run(bundle, prompt, other, cfg, profile, run_id)
            return replace(audited, status=audited.status.replace(FROM_IDS, how, 1)) \
                if audited.status.startswith(FROM_IDS) else audited
    if not names_every_token(answer) and native is not None and native.error and answer.ids_named:
        return Audit(f"{UNAUDITED}the server named ids for {answer.ids_named} of its {answer.completion_tokens} "
                     f"tokens and the /completion replay failed: {native.error}"[:300], [], 0.0)
    if not profile:
        return Audit(f"{UNAUDITED}no sampling profile (see the endpoint's manifest entry)", [], 0.0)
    if answer.prompt_tokens is not None and answer.prompt_tokens != len(prompt):
        return Audit(f"{UNAUDITED}the server encoded the prompt as {answer.prompt_tokens} tokens, the local "
                     f"checkpoint as {len(prompt)}", [], 0.0)
    got = server_tokens(answer, bundle.tokenizer, bundle.eos_ids)
    if got.ids is None:
        return Audit(got.how, [], 0.0)
    if not got.ids:
        return Audit(f"{UNAUDITED}no tokens", [], 0.0)
    vocab = int(bundle.trunk.lm.args.vocab_size)
    if any(not 0 <= t < vocab for t in got.ids if t != HIDDEN):
        return Audit(f"{UNAUDITED}a token id outside the local checkpoint's vocabulary ({vocab})", [], 0.0)
    reported = list(answer.token_logprobs) if answer.token_logprobs is not None and \
        len(answer.token_logprobs) == len(got.ids) else None
    cfg = replace(cfg, order=profile)
    fresh = rescore_tokens(bundle, prompt, got.ids, cfg, compare=reported, compare_raw=True,
                           hidden_among=frozenset(bundle.eos_ids))
    rows = [{"run_id": run_id, "index": i, "token_id": t, "source": SOURCE,
             "server_logprob": reported[i] if reported is not None else None, **asdict(f)}
            for i, (t, f) in enumerate(zip(fresh.tokens, fresh.records))]
    alphas = tuple(head_alphas(bundle, prompt, fresh.tokens, cfg)) if bundle.mtp is not None else ()
    return Audit(got.how, rows, fresh.seconds, alphas)
