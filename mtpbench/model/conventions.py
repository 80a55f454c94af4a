"""The MTP head's feeding conventions, which runtimes disagree on: what feeds it, what it chains, what it remembers.

- hidden: the trunk hidden fed to the head, after the trunk's final norm (`post_norm`: vLLM, MTPLX, the default)
  or before it (`pre_norm`: mlx-lm PR #990);
- concat: the order of the head's input halves, `embedding_hidden` (vLLM, mlx-lm, the Qwen release: the default)
  or `hidden_embedding` (MTPLX's `concat_order` names both); the fc weights are read in that order;
- chain: the hidden a depth > 1 draft feeds back in as its "trunk hidden": the head's normed output (`normed`, the
  default; MTPLX `post_norm`), its output before the final norm (`prenorm`; MTPLX `pre_norm`), its fc output
  (`fc`), the embedding it was fed (`embedding`), the hidden it was fed (`prev`), or a blend
  `mix:A:B:ALPHA` = ALPHA * A + (1 - ALPHA) * B of two of those (MTPLX's experimental repair syntax);
- history: the true (trunk hidden, next token) pairs the head's cache holds when it drafts: every pair since the
  prompt (`committed`, the default, what `mtplx run` uses), only the newest one (`cycle`: a fresh head cache each
  step, no prompt history; MTPLX's API default, and the same as `window:1`), or the last N (`window:N`). On the
  demo (greedy, 15 held-out stdlib prompts) `cycle` reproduces MTPLX's published cycle acceptance to 0.001.

None of them changes what a decode emits (the exact rule decides that), only how often drafts are accepted. Pure
Python: the sweep's axes table parses these where mlx is not installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

POST_NORM, PRE_NORM = "post_norm", "pre_norm"
HIDDEN_VARIANTS = (POST_NORM, PRE_NORM)
HIDDEN_ALIASES = {"post": POST_NORM, "pre": PRE_NORM, POST_NORM: POST_NORM, PRE_NORM: PRE_NORM}
EMBEDDING_HIDDEN, HIDDEN_EMBEDDING = "embedding_hidden", "hidden_embedding"
CONCATS = (EMBEDDING_HIDDEN, HIDDEN_EMBEDDING)
NORMED, PRENORM, FC, EMBEDDING, PREV = "normed", "prenorm", "fc", "embedding", "prev"
CHAINS = (NORMED, PRENORM)  # the two the compiled fast path serves (and the tests sweep)
CHAIN_SOURCES = (NORMED, PRENORM, FC, EMBEDDING, PREV)
_CHAIN_ALIASES = {POST_NORM: NORMED, PRE_NORM: PRENORM, **{c: c for c in CHAIN_SOURCES}}  # MTPLX's names too
COMMITTED, CYCLE, WINDOW = "committed", "cycle", "window"


def hidden_variant(text: str, option: str = "--mtp-hidden") -> str:
    """'post' / 'pre' (or the long names) -> 'post_norm' / 'pre_norm'."""
    if text not in HIDDEN_ALIASES:
        raise UserError(f"{option} values are post, pre (post_norm, pre_norm), got {text!r}")
    return HIDDEN_ALIASES[text]


def concat(text: str, option: str = "--mtp-concat") -> str:
    if text not in CONCATS:
        raise UserError(f"{option} values are {', '.join(CONCATS)}, got {text!r}")
    return text


def chain(text: str, option: str = "--mtp-chain") -> str:
    """A chain value in mtpbench's names (MTPLX's `post_norm` / `pre_norm` are read as `normed` / `prenorm`;
    `mix:A:B:ALPHA` with ALPHA in [0, 1], written with '.' or MTPLX's 'p' as the decimal point)."""
    if text in _CHAIN_ALIASES:
        return _CHAIN_ALIASES[text]
    parts = str(text).split(":")
    if len(parts) == 4 and parts[0] == "mix" and parts[1] in _CHAIN_ALIASES and parts[2] in _CHAIN_ALIASES:
        try:
            alpha = float(parts[3].replace("p", "."))
        except ValueError:
            alpha = -1.0
        if 0.0 <= alpha <= 1.0:
            return f"mix:{_CHAIN_ALIASES[parts[1]]}:{_CHAIN_ALIASES[parts[2]]}:{alpha:g}"
    raise UserError(f"{option} values are {', '.join(CHAIN_SOURCES)} or mix:A:B:ALPHA (A, B among those, ALPHA in "
                    f"0..1), got {text!r}")


def chain_mix(value: str) -> tuple[str, str, float] | None:
    """(A, B, ALPHA) of a parsed `mix:A:B:ALPHA` chain; None for a plain source."""
    if not value.startswith("mix:"):
        return None
    _, a, b, alpha = value.split(":")
    return a, b, float(alpha)


@dataclass(frozen=True)
class History:
    """Which true pairs the head's cache holds when it drafts; `window` is N for `window:N` (0 otherwise)."""

    kind: str = COMMITTED
    window: int = 0

    @classmethod
    def parse(cls, text: str, option: str = "--mtp-history") -> History:
        kind, sep, n = text.partition(":")
        if kind in (COMMITTED, CYCLE) and not sep:
            return cls(kind)
        if kind == WINDOW and sep:
            try:
                size = int(n)
            except ValueError:
                size = 0
            if size >= 1:
                return cls(WINDOW, size)
        raise UserError(f"{option} values are committed, cycle or window:N (N >= 1 true pairs), got {text!r}")

    def __str__(self) -> str:
        return f"{WINDOW}:{self.window}" if self.kind == WINDOW else self.kind


DEFAULT_HISTORY = History()


# ------------------------------------------------------------------------------------- conventions a checkpoint declares
# MTPLX 2.12.2 (`mtplx.mtp_patch.MTPContract`, `mtplx.commands.forge._stamp_runtime_metadata`) writes its contract
# as `mtp_contract` at the top of `mtplx_runtime.json` and again under `forge_provenance.mtp_contract`, and copies
# it into `config.json` as `mtplx_mtp_contract`; a runtime file without `mtp_contract` is read flat (MTPLX's
# `with_runtime_metadata`). History is not part of it: `mtplx run` uses committed, its Python API cycle.
RUNTIME_CONTRACT = "mtplx_runtime.json"  # MTPLX's runtime contract, shipped next to its checkpoints
CONFIG_CONTRACT = "mtplx_mtp_contract"
CONVENTION_AXES = ("mtp_hidden", "mtp_concat", "mtp_chain", "mtp_history")
CACHE_POSITIONS, ABSOLUTE_POSITIONS = "cache", "absolute"
_POSITION_MODES = {"": CACHE_POSITIONS, "cache": CACHE_POSITIONS, "local": CACHE_POSITIONS, "default": CACHE_POSITIONS,
                   "absolute": ABSOLUTE_POSITIONS}
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")  # what mx.quantize supports (mlx 0.32)
_QUANT_POLICIES = {"all": "all", "cyankiwi": "layers", "prequantized-int4": "layers"}


@dataclass(frozen=True)
class Declared:
    """One convention a checkpoint declares: what mtpbench calls it (a sweep axis, or a fact of the head), its
    value in mtpbench's terms, and the file and key it was read from (what `inspect` shows)."""

    name: str
    value: str
    source: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object")
    return doc


def contract_sources(directory: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The MTPLX contract blocks a checkpoint directory holds, highest precedence first, each with its label."""
    d = Path(directory)
    out: list[tuple[str, dict[str, Any]]] = []
    if (d / RUNTIME_CONTRACT).is_file():
        runtime = _read_json(d / RUNTIME_CONTRACT)
        if isinstance(runtime.get("mtp_contract"), dict):
            out.append((f"{RUNTIME_CONTRACT} mtp_contract", runtime["mtp_contract"]))
        else:
            out.append((RUNTIME_CONTRACT, runtime))
        forge = runtime.get("forge_provenance")
        if isinstance(forge, dict) and isinstance(forge.get("mtp_contract"), dict):
            out.append((f"{RUNTIME_CONTRACT} forge_provenance.mtp_contract", forge["mtp_contract"]))
    if (d / "config.json").is_file():
        config = _read_json(d / "config.json")
        if isinstance(config.get(CONFIG_CONTRACT), dict):
            out.append((f"config.json {CONFIG_CONTRACT}", config[CONFIG_CONTRACT]))
    return out


def _position(value: str, where: str) -> str:
    key = value.strip().lower().replace("-", "_")
    if key not in _POSITION_MODES:
        raise UserError(f"{where} = {value!r}: mtpbench models the position modes cache (local) and absolute only")
    return _POSITION_MODES[key]


def _quant_mode(value: str, where: str) -> str:
    if value not in QUANT_MODES:
        raise UserError(f"{where} = {value!r}: mlx quantizes in {', '.join(QUANT_MODES)} only")
    return value


def _quant_policy(value: str, where: str) -> str:
    if value not in _QUANT_POLICIES:
        raise UserError(f"{where} = {value!r}: expected all, cyankiwi or prequantized-int4 (MTPLX's policies)")
    return _QUANT_POLICIES[value]


def _positive(value: str, where: str) -> str:
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{where} = {value!r}: expected a positive integer")
    return value


def _prequantized(value: str, where: str) -> str:
    if value.lower() not in ("true", "false"):
        raise UserError(f"{where} = {value!r}: expected true or false")
    return value.lower()


# MTPLX's contract keys (its `MTPContract.with_metadata` field map, aliases included) -> (mtpbench's name, parser).
_KEYS: dict[str, tuple[str, Any]] = {
    "base_hidden_variant": ("mtp_hidden", hidden_variant),
    "hidden_variant": ("mtp_chain", chain),
    "mtp_hidden_variant": ("mtp_chain", chain),
    "concat_order": ("mtp_concat", concat),
    "mtp_position_mode": ("mtp_position", _position),
    "position_mode": ("mtp_position", _position),
    "mtp_quant_mode": ("mtp_quant_mode", _quant_mode),
    "mtp_quant_bits": ("mtp_quant_bits", _positive),
    "mtp_quant_group_size": ("mtp_quant_group_size", _positive),
    "mtp_quant_policy": ("mtp_quant_policy", _quant_policy),
    "mtp_prequantized": ("mtp_prequantized", _prequantized),
}


def contract(directory: str | Path) -> tuple[Declared, ...]:
    """Every convention a checkpoint directory declares in MTPLX's files, mapped onto mtpbench's names (the sweep
    axes mtp_hidden, mtp_concat, mtp_chain; the facts mtp_position, mtp_quant_*), each from the first source that
    holds it; () when there is none. A value mtpbench cannot model is one UserError line naming file, key and value.
    A null value (MTPLX writes `mtp_quant_bits: null` for a head it leaves unquantized) declares nothing."""
    found: dict[str, Declared] = {}
    for label, block in contract_sources(directory):
        for key, (name, parse) in _KEYS.items():
            if key not in block or block[key] is None or name in found:
                continue
            value = block[key]
            text = str(value).lower() if isinstance(value, bool) else str(value)
            found[name] = Declared(name, _parse(parse, text, f"{label}.{key}"), f"{label}.{key}")
    return tuple(found.values())


def _parse(parse: Any, text: str, where: str) -> str:
    """A contract value in mtpbench's terms; one line naming file, key and value when it cannot be modelled."""
    try:
        return parse(text, where)
    except UserError as e:
        msg = str(e)
        if f"= {text!r}" in msg:
            raise
        modelled = msg.split(" values are ", 1)[-1].rsplit(", got", 1)[0]
        raise UserError(f"{where} = {text!r}: mtpbench cannot model it (it models {modelled})") from None


def declared(directory: str | Path) -> dict[str, str]:
    """The sweep-axis values a checkpoint directory declares (`mtp_hidden`, `mtp_concat`, `mtp_chain`); {} when it
    declares none."""
    return {d.name: d.value for d in contract(directory) if d.name in CONVENTION_AXES}


def declared_defaults(models: "list[str] | tuple[str, ...]") -> dict[str, str]:
    """Axis -> value for each convention every one of `models` (local directories) declares alike: what a sweep
    uses where the user names no value. Checkpoints that declare nothing or disagree keep the standard default."""
    if not models or not all(Path(m).is_dir() for m in models):
        return {}
    each = [declared(m) for m in models]
    return {a: each[0][a] for a in CONVENTION_AXES if all(a in d and d[a] == each[0][a] for d in each)}
