"""The one table of sweep axes, and the one table of a sweep's scalar options.

Every axis is declared here once: its name (the sweep file's key and the plan's), its command-line option, its
runs-table column and parquet type, how its values are parsed, whether it is part of a cell's identity and of the
grouping keys every aggregate uses, and which backends it applies to. The CLI builds its options from this table,
the sweep file is validated against it, the plan takes the product over it, the row builder writes its columns,
the parquet schema includes them, and the statistics and the report group by `GROUP_KEYS`. Adding an axis is one
`Axis(...)` row here plus the code that uses its value (llama-bench's "declare every parameter once").

Pure Python and pyarrow types only: the report and the statistics import this where mlx is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..decode.limits import MAX_K
from ..errors import UserError
from ..model import conventions

REFERENCE, SERVER = "reference", "server"
BOTH = frozenset({REFERENCE, SERVER})
TARGET, CELL, RUN = "target", "cell", "run"  # an axis picks the loaded model, varies within one, or per run


# ------------------------------------------------------------------------------------------------- value parsers
# Each takes what a user wrote (command-line text, or a sweep-file value: a scalar, a list, or the same text) and
# returns a tuple of values, or raises one UserError line naming the option.


def _items(value: Any, option: str) -> list[Any]:
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _number(x: Any, option: str, integer: bool) -> float | int:
    kind = "integers" if integer else "numbers"
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise UserError(f"{option} {x!r}: expected {kind}")
    if isinstance(x, str):
        try:
            x = int(x) if integer else float(x)
        except ValueError:
            raise UserError(f"{option} {x!r}: expected {kind} separated by commas") from None
    if integer and (isinstance(x, float) and not x.is_integer()):
        raise UserError(f"{option} {x!r}: expected an integer")
    if not math.isfinite(x):
        raise UserError(f"{option} {x!r}: expected a finite number")
    return int(x) if integer else float(x)


def floats(value: Any, option: str) -> tuple[float, ...]:
    return tuple(float(_number(x, option, integer=False)) for x in _items(value, option))


def ints(value: Any, option: str) -> tuple[int, ...]:
    return tuple(int(_number(x, option, integer=True)) for x in _items(value, option))


def words(value: Any, option: str) -> tuple[str, ...]:
    items = _items(value, option)
    bad = next((x for x in items if not isinstance(x, str)), None)
    if bad is not None:
        raise UserError(f"{option} {bad!r}: expected text")
    return tuple(items)


def paths(value: Any, option: str) -> tuple[str, ...]:
    """Checkpoints: one per value (a repeated option or a list); a path may contain commas."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = next((x for x in items if not isinstance(x, str) or not x.strip()), None)
    if bad is not None:
        raise UserError(f"{option} {bad!r}: expected a checkpoint directory or repo id")
    return tuple(x.strip() for x in items)


def k_values(value: Any, option: str = "--k") -> tuple[int, ...]:
    """'1..4' -> (1, 2, 3, 4); '1,2,4'; 3; [1, 2]. Sorted, without repeats, each within 1..MAX_K."""
    if isinstance(value, str) and ".." in value:
        lo, _, hi = value.partition("..")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            raise UserError(f"{option} {value!r}: expected a depth like 3, a list like 1,2,4 or a range like 1..4") \
                from None
        if b < a:
            raise UserError(f"{option} {value}: empty range (write low..high, e.g. 1..4)")
        ks: Sequence[int] = range(a, b + 1)
    else:
        try:
            ks = ints(value, option)
        except UserError:
            raise UserError(f"{option} {value!r}: expected a depth like 3, a list like 1,2,4 or a range like 1..4") \
                from None
    if not ks:
        raise UserError(f"{option}: no depth given")
    bad = [k for k in ks if not 1 <= k <= MAX_K]
    if bad:
        raise UserError(f"{option}: depth {bad[0]} is out of range (1..{MAX_K})")
    return tuple(sorted(set(ks)))


def draft_temps(value: Any, option: str) -> tuple[float | None, ...]:
    """Draft temperatures; 'same' (None) means the target's own."""
    out: list[float | None] = []
    for x in _items(value, option):
        if x is None or x == "same":
            out.append(None)
            continue
        t = float(_number(x, option, integer=False))
        if t < 0:
            raise UserError(f"{option} must be >= 0, got {t:g}")
        out.append(t)
    return tuple(out)


NATIVE = 0  # the context axis's "native" value: the prompt sets' own prompts, uncut
MIN_CONTEXT = 16  # the shortest bucket (tests use 64 or 128 tokens; real sweeps 1k to 32k)


def context_buckets(value: Any, option: str = "--context") -> tuple[int, ...]:
    """'1k,4k,16k,32k' -> (1024, 4096, 16384, 32768): prompt lengths in tokens ('k' = 1024; a plain number is
    tokens, e.g. 128); 'native' (0) keeps the prompt sets' own prompts. Without repeats, in the order given."""
    out: list[int] = []
    for x in _items(value, option):
        text = str(x).strip().lower() if not isinstance(x, bool) else ""
        if text in ("native", "0"):
            out.append(NATIVE)
            continue
        scale = 1024 if text.endswith("k") else 1
        try:
            n = int(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise UserError(f"{option} {x!r}: expected token counts like 1k,4k,16k or 128 (or native)") from None
        if n < MIN_CONTEXT:
            raise UserError(f"{option} {x!r}: a context bucket needs at least {MIN_CONTEXT} tokens")
        out.append(n)
    if not out:
        raise UserError(f"{option}: no context bucket given")
    return tuple(dict.fromkeys(out))


def context_label(tokens: Any) -> str:
    """1024 -> '1k', 1536 -> '1536', 0 or missing -> 'native' (how tables and prompt keys name a bucket)."""
    try:
        n = int(tokens)
    except (TypeError, ValueError):
        return "native"
    if n <= 0:
        return "native"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def choices(allowed: Sequence[str]) -> Callable[[Any, str], tuple[str, ...]]:
    def parse(value: Any, option: str) -> tuple[str, ...]:
        got = words(value, option)
        bad = next((x for x in got if x not in allowed), None)
        if bad is not None:
            raise UserError(f"{option} values are {', '.join(allowed)}, got {bad!r}")
        return got
    return parse


def each(one: Callable[[str, str], Any]) -> Callable[[Any, str], tuple[Any, ...]]:
    """A parser of comma-separated words that checks and normalizes every value with `one(value, option)`."""
    def parse(value: Any, option: str) -> tuple[Any, ...]:
        return tuple(one(x, option) for x in words(value, option))
    return parse


# ------------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Axis:
    """One dimension of the sweep grid."""

    name: str  # the plan's and the Cell's key (the sweep file uses `key`, the long option's name)
    flags: tuple[str, ...]  # command-line option names
    column: str  # runs-table column
    arrow: pa.DataType  # its parquet type
    parse: Callable[[Any, str], tuple[Any, ...]]
    default: tuple[Any, ...]  # () : chosen by the spec builder from the other values (models, prompt sets)
    help: str
    scope: str = CELL  # TARGET: a loaded model; CELL: varies within one; RUN: the runs of one cell (K)
    group: bool = False  # its column is one of the grouping keys of every aggregate
    backends: frozenset[str] = BOTH  # backends whose cells take this axis (the others record null)
    repeatable: bool = False  # `--model A --model B` rather than `--policy a,b`
    legacy: Any = None  # the value rows written before the axis existed carry (report loading)
    metavar: str = "LIST"
    title: str = ""  # its column header in reports (default: the name)

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name.replace("_", " ").capitalize())

    @property
    def option(self) -> str:
        return self.flags[0]

    @property
    def key(self) -> str:
        """Its sweep-file key: the long option without dashes (`--temp` -> `temp`, `--kv-bits` -> `kv_bits`)."""
        return self.option.lstrip("-").replace("-", "_")


AXES: tuple[Axis, ...] = (
    Axis("model", ("--model", "-m"), "model", pa.string(), paths, (),
         "Checkpoint dir or cached repo id; repeat for several (default: the embedded demo).",
         scope=TARGET, group=True, backends=frozenset({REFERENCE}), repeatable=True, metavar="MODEL"),
    Axis("policy", ("--policy",), "policy", pa.string(), words, ("as-is",),
         "Quantization policies, comma-separated, applied in memory (see `mtpbench policies`).",
         scope=TARGET, group=True, backends=frozenset({REFERENCE}), legacy="as-is"),
    Axis("kv_bits", ("--kv-bits",), "kv_bits", pa.int32(), ints, (0,),
         "Trunk KV-cache bits, comma-separated (0: unquantized; 8, 4, ...: mlx_lm's quantized KV cache).",
         group=True, backends=frozenset({REFERENCE}), legacy=0, title="KV-cache bits"),
    Axis("temperature", ("--temp",), "temperature", pa.float64(), floats, (0.0, 0.6),
         "Temperatures, comma-separated (0 = greedy)."),
    Axis("top_p", ("--top-p",), "top_p", pa.float64(), floats, (0.95,),
         "Nucleus mass for sampled settings, comma-separated (1 disables; greedy ignores it)."),
    Axis("top_k", ("--top-k",), "top_k", pa.int32(), ints, (20,),
         "Top-k for sampled settings, comma-separated (0 disables; greedy ignores it)."),
    Axis("min_p", ("--min-p",), "min_p", pa.float64(), floats, (0.0,),
         "Min-p for sampled settings, comma-separated (0 disables; greedy ignores it)."),
    Axis("draft_temp", ("--draft-temp",), "draft_temperature", pa.float64(), draft_temps, (None,),
         "Draft temperatures, comma-separated; 'same' = the target's (greedy ignores it).",
         backends=frozenset({REFERENCE})),
    Axis("mtp_hidden", ("--mtp-hidden",), "hidden_variant", pa.string(), each(conventions.hidden_variant),
         (conventions.POST_NORM,), "Trunk hidden fed to the MTP head, comma-separated: post (after the final norm) "
         "or pre (before it).", group=True, backends=frozenset({REFERENCE}), legacy=conventions.POST_NORM,
         title="MTP hidden"),
    Axis("mtp_concat", ("--mtp-concat",), "mtp_concat", pa.string(), each(conventions.concat),
         (conventions.EMBEDDING_HIDDEN,), "Order of the MTP head's input halves, comma-separated: embedding_hidden "
         "(vLLM, mlx-lm, the Qwen release) or hidden_embedding (MTPLX's concat_order names both).", group=True,
         backends=frozenset({REFERENCE}), legacy=conventions.EMBEDDING_HIDDEN, title="MTP concat"),
    Axis("mtp_chain", ("--mtp-chain",), "mtp_chain", pa.string(), each(conventions.chain), (conventions.NORMED,),
         "Hidden chained into drafts at depth > 1, comma-separated: normed (the head's output; MTPLX post_norm), "
         "prenorm (before its final norm; pre_norm), fc (its fc output), embedding (the embedding it was fed), "
         "prev (the hidden it was fed) or mix:A:B:ALPHA (ALPHA*A + (1-ALPHA)*B).", group=True,
         backends=frozenset({REFERENCE}), legacy=conventions.NORMED, title="MTP chain"),
    Axis("mtp_history", ("--mtp-history",), "mtp_history", pa.string(),
         each(lambda x, o: str(conventions.History.parse(x, o))), (conventions.COMMITTED,),
         "MTP head history, comma-separated: committed (every true pair since the prompt), cycle (a fresh head "
         "cache each step, fed the newest true pair) or window:N (the last N true pairs).", group=True,
         backends=frozenset({REFERENCE}), legacy=conventions.COMMITTED, title="MTP history"),
    Axis("thinking", ("--thinking",), "thinking", pa.string(), choices(("on", "off", "n/a")), ("n/a",),
         "on,off: an axis when the chat template supports enable_thinking.", legacy="n/a"),
    Axis("prompts", ("--prompts",), "prompt_set", pa.string(), words, (),
         "Prompt sets by name or .jsonl path, comma-separated (default: stdlib for the embedded demo, else every "
         "bundled set)."),
    Axis("context", ("--context",), "context", pa.int32(), context_buckets, (NATIVE,),
         "Prompt lengths in tokens, e.g. 1k,4k,16k,32k: each bucket's prompts are the long-context set's stdlib "
         "documents cut to that length per checkpoint, task kept at the end (default: native, the prompt sets' "
         "own prompts).", group=True, backends=frozenset({REFERENCE}), legacy=NATIVE, title="Context"),
    Axis("k", ("--k",), "k", pa.int32(), k_values, (1, 2, 3, 4), "Draft depths: 3, 1,2,4 or 1..4.",
         scope=RUN, backends=frozenset({REFERENCE}), metavar="K"),
)
BY_NAME: dict[str, Axis] = {a.name: a for a in AXES}
BY_KEY: dict[str, Axis] = {a.key: a for a in AXES}
SAMPLING_AXES = ("temperature", "top_p", "top_k", "min_p", "draft_temp")  # together: the `setting` label

# The columns every aggregate groups by: the target axes, then the backend and the sampling setting (derived
# columns), then every other grouping axis, in table order.
GROUP_KEYS: list[str] = [*(a.column for a in AXES if a.group and a.scope == TARGET), "backend", "setting",
                         *(a.column for a in AXES if a.group and a.scope != TARGET)]


# Axes whose values the report and the card compare side by side, paired per prompt (the model has its own rows).
COMPARED: list[Axis] = [a for a in AXES if a.group and a.name != "model"]


def axes_for(backend: str) -> tuple[Axis, ...]:
    """The axes a backend's cells vary over (the others are null in its rows)."""
    return tuple(a for a in AXES if backend in a.backends)


# ------------------------------------------------------------------------------------------- the scalar options


@dataclass(frozen=True)
class Option:
    """One scalar setting of a sweep (not an axis: it has one value for the whole sweep)."""

    name: str
    flags: tuple[str, ...]
    kind: type  # int | float | bool | str
    default: Any
    help: str
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    in_spec: bool = True  # part of the sweep's identity (what rows it produces); else how it runs
    minimum: float | None = None
    metavar: str | None = None
    toml: bool = True  # may be given in a sweep file

    def coerce(self, value: Any, label: str) -> Any:
        """A value checked by type (strings are not booleans; integers are integers) and range; `label` names it
        in the message (the flag, or the sweep file and key)."""
        if self.kind is tuple:  # a list of integers: "1,4" or [1, 4]
            levels = ints(value, label)
            if not levels or (self.minimum is not None and min(levels) < self.minimum):
                raise UserError(f"{label} {value!r}: expected integers of at least {self.minimum:g}")
            return levels
        if self.repeatable:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(self._one(v, label) for v in items)
        return self._one(value, label)

    def _one(self, v: Any, label: str) -> Any:
        if self.kind is bool:
            if not isinstance(v, bool):
                raise UserError(f"{label} = {v!r}: expected true or false")
            return v
        if self.kind is str:
            if not isinstance(v, str):
                raise UserError(f"{label} = {v!r}: expected a string")
            if self.choices and v not in self.choices:
                raise UserError(f"{label} = {v!r}: expected one of {', '.join(self.choices)}")
            return v
        value = _number(v, label, integer=self.kind is int)
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{label} must be >= {self.minimum:g}, got {v!r}")
        return value


OPTIONS: tuple[Option, ...] = (
    Option("max_tokens", ("--max-tokens",), int, 128, "Tokens per run. Given (here or in the sweep file), it "
           "applies to every prompt; not given, a prompt line's own max_tokens wins over the default.", minimum=2),
    Option("repeats", ("--repeats",), int, 2, "Repetitions of every cell.", minimum=1),
    Option("seed", ("--seed",), int, 0, "Base seed (each prompt and repetition gets its own)."),
    Option("prompt_limit", ("--prompt-limit",), int, 0, "Use only the first N prompts of each set (0: all).",
           minimum=0),
    Option("kv_group_size", ("--kv-group-size",), int, 0,
           "Quantization group of the KV cache (default: 64, or what divides the head dim)."),
    Option("ignore_eos", ("--ignore-eos",), bool, False, "Generate exactly --max-tokens tokens per run."),
    Option("no_records", ("--no-records",), bool, False,
           "Skip the steps/tokens tables (no per-cell preservation verdicts)."),
    Option("mtp_from", ("--mtp-from",), str, None, "Draft with the MTP head of this directory or cached repo (a "
           "checkpoint, or a standalone qwen3_5_mtp head repo), checked compatible with every --model; nothing is "
           "copied.", metavar="DIR"),
    Option("out", ("--out", "-o"), str, None,
           "Results dir (default: results/<model>-<spec hash>, so reruns resume).", in_spec=False),
    # servers (see mtpbench.sweep.endpoint): the URL, mode and concurrency decide rows; the rest how they run
    Option("endpoint", ("--endpoint",), str, (), "Measure a running OpenAI-compatible server at this base URL "
           "(e.g. http://127.0.0.1:8000/v1); [NAME=]URL, repeatable. Mixes with --model.", repeatable=True,
           in_spec=False, metavar="[NAME=]URL"),
    Option("served_model", ("--served-model",), str, (), "Model name to request, per --endpoint by position "
           "(default: the first at /v1/models, else --model's name).", repeatable=True, in_spec=False,
           metavar="NAME"),
    Option("endpoint_mode", ("--endpoint-mode",), str, (), "What each --endpoint runs: mtp (speculative) or ar; "
           "per endpoint by position [mtp].", repeatable=True, choices=("mtp", "ar"), in_spec=False),
    Option("api_key_env", ("--api-key-env",), str, None, "Environment variable holding the API key (sent as a "
           "bearer token, never stored).", in_spec=False, metavar="VAR"),
    Option("concurrency", ("--concurrency",), tuple, (1,), "Simultaneous requests per level, e.g. 1,4.",
           in_spec=False, metavar="LEVELS", minimum=1),
    Option("request_timeout", ("--request-timeout",), float, 60.0, "Longest silence allowed from a server "
           "(connect, or since the last useful streamed event: keep-alive comments, empty events and a line trickled "
           "byte by byte do not count).", in_spec=False, metavar="S"),
    Option("request_deadline", ("--request-deadline",), float, 0.0, "Longest whole request, in seconds (0: "
           "30 s + 1 s per requested token: 158 s at the default 128). The first request that passes it, or the "
           "silence timeout, marks its endpoint unhealthy for the rest of the sweep (its later cells fail at once; "
           "a rerun retries): a stalling server costs about one deadline per endpoint (plus at most 10 s per "
           "/metrics read), whatever the number of prompts.", in_spec=False, metavar="S"),
    Option("retries", ("--retries",), int, 0, "Retries of a request that failed before its first token (connect "
           "errors, HTTP 5xx/429).", in_spec=False, minimum=0),
    Option("audit_model", ("--audit-model",), str, None, "Audit every --endpoint's sampled output against this "
           "local checkpoint (the same weights the server serves: you assert it): token ids and log-probs are "
           "requested, each run rescored with a fresh forward, and each cell gets preservation verdicts.",
           in_spec=False, metavar="CHECKPOINT"),
    Option("audit_profile", ("--audit-profile",), str, (), "The sampling order each audited server uses, per "
           "--endpoint by position (repeatable or a comma list): mlx (filters, then temperature), vllm and hf "
           "(temperature, then top_p over what top_k left), temper-first (SGLang: temperature, then top_p on the "
           "whole distribution), llama.cpp (top_k, top_p over what top_k left, min_p, then temperature) or auto (from "
           "llama.cpp's /props, the Server header or /v1/models owned_by) [auto].", repeatable=True, in_spec=False),
)
OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Values:
    """What the user gave, by axis and option name (None: not given), with where it came from for messages."""

    given: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def read_sweep_file(data: dict[str, Any], path: str) -> Values:
    """A parsed sweep file (TOML) checked against the tables: unknown keys and wrong types are one line each."""
    given: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in BY_KEY:
            axis = BY_KEY[key]
            given[axis.name] = axis.parse(value, f"{path}: {raw_key}")
        elif key in OPTION_BY_NAME:
            opt = OPTION_BY_NAME[key]
            if not opt.toml:
                raise UserError(f"{path}: {raw_key} cannot be set in a sweep file")
            given[key] = opt.coerce(value, f"{path}: {raw_key}")
        else:
            known = sorted([*BY_KEY, *OPTION_BY_NAME])
            raise UserError(f"{path}: unknown key {raw_key!r} (known: {', '.join(known)})")
    return Values(given, path)
