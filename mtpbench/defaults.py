"""Where the embedded default checkpoint and the bundled prompt sets live."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = PACKAGE_DIR / "assets" / "demo"
PROMPTS_DIR = PACKAGE_DIR.parent / "prompts"
DEMO_PROMPT_SET = "stdlib"  # held-out stdlib code, the domain the demo model was trained on
LONGCTX_SET = "longctx"  # long documents cut per context bucket: read by sweep.longctx, written by builders.longctx
LONGCTX_FILE = PACKAGE_DIR / "prompts_data" / f"{LONGCTX_SET}.jsonl"


def default_model() -> str:
    if not (DEMO_MODEL / "config.json").exists():
        raise UserError(f"the embedded default checkpoint is missing at {DEMO_MODEL}; rebuild it with "
                        f"`mtpbench make-demo --out DIR` or pass --model")
    return str(DEMO_MODEL)


def is_default_model(model: str) -> bool:
    return Path(model).resolve() == DEMO_MODEL
