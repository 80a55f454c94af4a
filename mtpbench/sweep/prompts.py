"""Prompt sets: JSONL files, one prompt per line, validated with the file and line named in every error.

A line is {"id", "category", "prompt" | "messages", optional "max_tokens", optional "completion"}. Chat messages
always go through the tokenizer's chat template; a plain prompt does too when the tokenizer has one, unless the
line says "completion": true (raw text to continue, like the demo's held-out code).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defaults import PROMPTS_DIR
from ..errors import UserError


@dataclass(frozen=True)
class Prompt:
    set_name: str
    id: str
    category: str
    text: str | None
    messages: tuple[tuple[str, str], ...] | None
    max_tokens: int | None
    completion: bool = False
    source: str = ""  # the file it came from

    @property
    def digest(self) -> str:
        """A hash of everything that decides what is generated from this prompt: part of every cell's identity, so
        editing a prompt's text is never mistaken for a finished cell."""
        key = [self.text, [list(m) for m in self.messages or ()], self.max_tokens, self.completion]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]

    def raw_text(self) -> str:
        return self.text if self.text is not None else "\n\n".join(c for _, c in self.messages or ())

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.text or ""}]


def available_sets() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl"))


def _set_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.suffix == ".jsonl" or p.exists():
        if not p.is_file():
            raise UserError(f"prompt file {p} not found")
        return p
    builtin = PROMPTS_DIR / f"{name}.jsonl"
    if not builtin.exists():
        raise UserError(f"unknown prompt set {name!r}; available: {', '.join(available_sets())} (or a path to a .jsonl)")
    return builtin


def _parse_line(path: Path, lineno: int, obj: Any, set_name: str) -> Prompt:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key in ("id", "category"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise UserError(f"{where}: missing or empty {key!r}")
    if ("prompt" in obj) == ("messages" in obj):
        raise UserError(f"{where}: needs exactly one of 'prompt' or 'messages'")
    messages = None
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        messages = tuple((m["role"], m["content"]) for m in msgs)
    elif not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise UserError(f"{where}: 'max_tokens' must be an integer >= 2")
    completion = obj.get("completion", False)
    if not isinstance(completion, bool):
        raise UserError(f"{where}: 'completion' must be true or false")
    return Prompt(set_name, obj["id"], obj["category"], obj.get("prompt"), messages, max_tokens, completion,
                  str(path.resolve()))


def jsonl_objects(path: Path, what: str = "prompt file", hint: str = "") -> list[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; every error one line naming the
    file and line (`hint` is added to an unreadable file's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}{hint}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return out


def load_set(name: str) -> list[Prompt]:
    path = _set_path(name)
    set_name = path.stem
    prompts = [_parse_line(path, lineno, obj, set_name) for lineno, obj in jsonl_objects(path)]
    if not prompts:
        raise UserError(f"{path}: empty prompt file")
    ids = [p.id for p in prompts]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise UserError(f"{path}: duplicate id {dup!r}")
    return prompts


def load_sets(names: list[str]) -> list[Prompt]:
    """Every prompt of the named sets; two sets may not share a name (the `prompt_set` column tells them apart)."""
    out: list[Prompt] = []
    seen: dict[str, str] = {}
    for n in names:
        prompts = load_set(n)
        name, source = prompts[0].set_name, prompts[0].source
        if name in seen and seen[name] != source:
            raise UserError(f"two prompt sets are both named {name!r} ({seen[name]} and {source}); rename one")
        if name in seen:
            continue  # the same file named twice
        seen[name] = source
        out.extend(prompts)
    return out


def supports_thinking(tokenizer: Any) -> bool:
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def encode(tokenizer: Any, prompt: Prompt, thinking: bool | None) -> list[int]:
    """Token ids of a prompt, through the chat template when there is one (and the line is not raw completion)."""
    template = getattr(tokenizer, "chat_template", None)
    if prompt.completion or not template:
        return list(tokenizer.encode(prompt.raw_text()))
    msgs = prompt.chat_messages()
    extra = {} if thinking is None else {"enable_thinking": thinking}
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, **extra))
