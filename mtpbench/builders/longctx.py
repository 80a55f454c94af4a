"""Build the long-context prompt set (mtpbench/prompts_data/longctx.jsonl) from the Python standard library.

The documents are real text: concatenations of related stdlib modules (sources and docstrings, Python Software
Foundation License), each followed by a task (continue, summarise, answer a question, edit a function). Each
document opens with files the embedded demo never saw in training (`builders.demo.is_held_out`), so the buckets the
demo can hold (its position limit is 8k) are held-out text; related modules pad each document to at least
`TARGET_CHARS`, enough for a 32k-token bucket with any tokenizer we know (about 3 to 4 characters per token).

Different Python versions ship different stdlib text, so the built file is part of the package and the sweep
reads only it; rerun `python -m mtpbench.builders.longctx` to regenerate it (it records the Python version).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

from ..defaults import LONGCTX_FILE as DATA_FILE, LONGCTX_SET

TARGET_CHARS = 140_000  # ~32k tokens at 4.3 characters per token; each document is cut at a line boundary

# (category, files in order: held-out ones first, related padding after, task, completion)
DOCUMENTS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("long_continue", ("difflib.py", "textwrap.py", "string.py", "fnmatch.py", "filecmp.py", "shlex.py"),
     "\n\n# --- The module continues with one more helper function in the same style: ---\n", True),
    ("long_summarize", ("enum.py", "copy.py", "types.py", "functools.py", "operator.py"),
     "\n\nTask: summarise the code above. Name the main classes and functions, say what each is for, and how "
     "they fit together, in at most ten sentences.", False),
    ("long_question", ("imaplib.py", "base64.py", "email/_encoded_words.py", "poplib.py", "smtplib.py",
                       "nntplib.py"),
     "\n\nQuestion: which exceptions does the code above define or raise, and in which functions or methods? "
     "Answer with a short list.", False),
    ("long_edit", ("locale.py", "gzip.py", "uu.py", "xdrlib.py", "calendar.py", "tarfile.py"),
     "\n\nTask: rewrite the first function defined above with type hints and a docstring that lists its "
     "cases; keep its behaviour. Reply with the new function only.", False),
)


def document(files: tuple[str, ...], root: Path, target: int = TARGET_CHARS) -> tuple[str, list[str]]:
    """The files' text, each under a '# file: <path>' line, stopped at the first line boundary past `target`."""
    parts: list[str] = []
    used: list[str] = []
    size = 0
    for name in files:
        f = root / name
        if not f.is_file():
            continue
        text = f"# file: Lib/{name}\n" + f.read_text(encoding="utf-8", errors="replace").rstrip("\n") + "\n\n"
        parts.append(text)
        used.append(f"Lib/{name}")
        size += len(text)
        if size >= target:
            break
    joined = "".join(parts)
    if len(joined) < target:
        raise SystemExit(f"only {len(joined)} characters from {', '.join(files)} (need {target})")
    end = joined.find("\n", target)
    return joined[: end + 1 if end >= 0 else len(joined)], used


def build(out: Path = DATA_FILE, target: int = TARGET_CHARS) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for i, (category, files, task, completion) in enumerate(DOCUMENTS, 1):
        text, used = document(files, root, target)
        rows.append({"id": f"{LONGCTX_SET}-{i:02d}", "category": category, "document": text, "task": task,
                     "completion": completion, "sources": used, "python": sys.version.split()[0],
                     "license": "PSF-2.0 (Python standard library)"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_FILE)
    ap.add_argument("--chars", type=int, default=TARGET_CHARS, help="characters per document (at least)")
    args = ap.parse_args(argv)
    path = build(args.out, args.chars)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
