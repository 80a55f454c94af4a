"""Long-context prompts: real documents cut, per checkpoint's tokenizer, to a context bucket's length.

The documents live in the package (`prompts_data/longctx.jsonl`, built from Python standard library modules by
`python -m mtpbench.builders.longctx`; PSF licence). A line is {"id", "category", "document", "task",
"completion", "sources", ...}. For a bucket of N tokens a prompt is the document's first lines, as many as fit,
then the task: the longest line-boundary prefix whose whole prompt (chat template included, for every thinking
value swept) has at most N tokens. The cut prompt is an ordinary `Prompt`, so its digest (part of each cell's
identity) covers the exact text measured; every bucket of one document shares its id, so cells pair across
buckets on the same document.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defaults import LONGCTX_FILE as DATA_FILE, LONGCTX_SET
from ..errors import UserError
from .axes import context_label
from .prompts import Prompt, encode, jsonl_objects


@dataclass(frozen=True)
class Document:
    """One long document and the task that follows it."""

    id: str
    category: str
    text: str
    task: str
    completion: bool
    sources: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        key = [self.text, self.task, self.completion]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]

    def prompt(self, lines: int) -> Prompt:
        """The document's first `lines` lines followed by the task."""
        body = "".join(self.text.splitlines(keepends=True)[:lines])
        return Prompt(LONGCTX_SET, self.id, self.category, body + self.task, None, None, self.completion,
                      ", ".join(self.sources))


def load_documents(path: Path = DATA_FILE) -> list[Document]:
    """The long-context set, validated with the file and line named in every error."""
    docs = []
    for lineno, obj in jsonl_objects(path, "long-context prompt file",
                                     "; rebuild it with `python -m mtpbench.builders.longctx`"):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k]
                                                for k in ("id", "category", "document", "task")):
            raise UserError(f"{path}:{lineno}: needs non-empty 'id', 'category', 'document' and 'task' strings")
        docs.append(Document(obj["id"], obj["category"], obj["document"], obj["task"],
                             bool(obj.get("completion", False)), tuple(obj.get("sources") or ())))
    if not docs:
        raise UserError(f"{path}: empty long-context prompt file")
    return docs


def cut(doc: Document, bucket: int, count: Callable[[Prompt], int], where: str = "") -> Prompt:
    """The longest line-boundary prefix of `doc` whose prompt has at most `bucket` tokens by `count` (the
    largest count over the thinking values swept). Refuses, in one line, a document too short to fill the bucket
    or a task alone longer than it."""
    lines = doc.text.splitlines(keepends=True)
    n_lines = len(lines)

    def fits(n: int) -> bool:
        return count(doc.prompt(n)) <= bucket

    if not fits(0):
        raise UserError(f"--context {context_label(bucket)}: the task of {LONGCTX_SET}/{doc.id} alone is longer "
                        f"than the bucket{where}")
    # no tokenizer averages 12 characters a token: start the search below that many characters
    guess = next((i for i, c in enumerate(itertools.accumulate(map(len, lines))) if c >= 12 * bucket), n_lines)
    lo, hi = 0, n_lines  # prompt(lo) fits, prompt(hi) does not (unless the whole document fits)
    if guess < n_lines and not fits(guess):
        hi = guess
    elif fits(n_lines):
        lo = hi = n_lines
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == n_lines:
        raise UserError(f"--context {context_label(bucket)}: {LONGCTX_SET}/{doc.id} has only "
                        f"{count(doc.prompt(n_lines))} tokens{where}, too short for the bucket")
    return doc.prompt(lo)


def bucket_prompts(tokenizer: Any, docs: Sequence[Document], bucket: int, thinking: Sequence[bool | None],
                   where: str = "") -> list[Prompt]:
    """Every document cut to `bucket` tokens with this tokenizer (chat template included when there is one)."""
    def count(p: Prompt) -> int:
        return max(len(encode(tokenizer, p, th)) for th in thinking)

    return [cut(d, bucket, count, where) for d in docs]


def edge_lines(prompt: Prompt, task: str) -> tuple[str, str]:
    """The first and the last non-empty line of a cut prompt's document part (where the bucket begins and where
    it was cut): what the manifest shows of each bucket's text."""
    text = prompt.raw_text()
    body = text[: len(text) - len(task)] if task and text.endswith(task) else text
    lines = [line.strip() for line in body.splitlines() if line.strip()] or [""]
    return lines[0][:120], lines[-1][:120]
