"""Recipe for the embedded default checkpoint: a small Qwen3.5-style model with an MTP head, trained here.

    mtpbench make-demo --out DIR        (51 minutes on a shared 2-core CPU)

Corpus: the Python standard library's own source (PSF licence, present on every machine with Python). About 5%
of the files (chosen by a hash of their path) are held out and become the default prompt set, so prompts are
from the same domain but never seen in training. Phase 1 trains trunk and MTP head together (next-token CE +
0.6 x the head's token-after-next CE). Phase 2 freezes the trunk and distils the head toward the trunk's own
next-token distributions at depths 1..3 (chained, as the decoder drafts), which is what acceptance rewards: a
head that agrees with the trunk, not one that knows the text better than the trunk does. Deterministic: fixed
seeds and step counts (no wall-clock stopping).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from ..errors import UserError
from .net import Net
from .tiny import checkpoint_config, hf_text_fields, to_hf_layout
from .tokenizer import train_bpe, write_tokenizer

HELD_OUT_EVERY = 20  # one file in 20 is held out


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vocab: int = 2048
    hidden: int = 128
    layers: int = 4
    seq: int = 256
    batch: int = 8
    phase1_steps: int = 250
    phase2_steps: int = 90
    lr: float = 3e-3
    mtp_weight: float = 0.6
    distill_depths: int = 3


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def is_held_out(path: Path) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = str(path.relative_to(root))
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def text_config(r: Recipe) -> dict:
    return {
        "model_type": "qwen3_5_text", "hidden_size": r.hidden, "intermediate_size": 3 * r.hidden,
        "num_hidden_layers": r.layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rms_norm_eps": 1e-6, "vocab_size": r.vocab, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "mtp_num_hidden_layers": 1,
        **hf_text_fields(r.layers, 2, 32, "float32", 10000.0),
    }


def encode_corpus(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """The training token stream: each file's ids (the tokenizer's own pipeline: NFC, Qwen3.5's split, byte-level
    BPE) followed by <|endoftext|>. tests/test_tokenizer.py checks that every loader of the written tokenizer gives
    these same ids."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.array(ids, dtype=np.uint16)


def joint_loss(net: Net, x: mx.array, mtp_weight: float) -> mx.array:
    h, logits = net.trunk(x[:, :-1])
    trunk_ce = nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")
    _, mtp_logits = net.head_logits(h[:, :-1], x[:, 1:-1])
    mtp_ce = nn.losses.cross_entropy(mtp_logits, x[:, 2:], reduction="mean")
    return trunk_ce + mtp_weight * mtp_ce


def distill_loss(net: Net, x: mx.array, depths: int) -> mx.array:
    """KL(trunk || head) at depths 1..D, the head chained on its own hidden like the drafter.

    Depth d > 1 is only reached at decode time when the drafts before it were accepted, i.e. equal to the trunk's
    greedy tokens; the text's own tokens are that input only where the trunk's greedy path agrees with the text.
    So depth d learns only at those positions: there its input token and its teacher (the trunk's distribution
    after that prefix) are exactly what the verifier will see.
    """
    h, logits = net.trunk(x)
    h, teacher = mx.stop_gradient(h), mx.stop_gradient(nn.log_softmax(logits.astype(mx.float32), axis=-1))
    greedy = mx.argmax(teacher, axis=-1)  # [:, t]: the trunk's greedy token for position t + 1
    total, z = 0.0, h
    T = x.shape[1]
    on_path = mx.ones((x.shape[0], T - 1))
    for d in range(1, depths + 1):
        n = T - d  # positions t with a token t+d
        z, student = net.head_logits(z[:, :n], x[:, d : d + n])
        target = teacher[:, d : d + n]  # trunk's distribution for token t+d+1
        on_path = on_path[:, :n]
        if d > 1:  # the drafted input x[t+d] must be the trunk's greedy choice after x[..t+d-1]
            on_path = on_path * (greedy[:, d - 1 : d - 1 + n] == x[:, d : d + n])
        kl = (mx.exp(target) * (target - nn.log_softmax(student.astype(mx.float32), axis=-1))).sum(-1)
        total = total + (kl * on_path).sum() / mx.maximum(on_path.sum(), 1.0) / d
    return total


def batches(data: np.ndarray, r: Recipe, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - r.seq - 2, size=r.batch)
        yield mx.array(np.stack([data[s : s + r.seq + 1] for s in starts]).astype(np.int32))


def train_steps(net: Net, loss_fn, steps: int, lr: float, stream, name: str, verbose: bool = True) -> float:
    """AdamW with warm-up and cosine decay over the trainable parameters of `net`; returns the final smoothed loss."""
    warm = min(50, steps // 5)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, lr, warm), optim.cosine_decay(lr, steps - warm, lr / 20)], [warm])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(net, loss_fn)
    state = [net.state, opt.state, mx.random.state]

    def one_step(x):
        loss, grads = loss_and_grad(net, x)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(net, grads)
        return loss

    step = mx.compile(one_step, inputs=state, outputs=state)
    t0, ema = time.time(), float("nan")
    for i in range(1, steps + 1):
        x = next(stream)
        loss = step(x)
        mx.eval(state, loss)
        ema = float(loss) if i == 1 else 0.95 * ema + 0.05 * float(loss)
        if verbose and (i % 5 == 0 or i == steps):
            el = time.time() - t0
            print(f"\r{name} step {i}/{steps} loss {ema:.3f} {i * x.size / el:,.0f} tok/s "
                  f"eta {el / i * (steps - i) / 60:.1f} min   ", end="", flush=True)
    if verbose:
        print(flush=True)
    return ema


def check_out(out: Path) -> None:
    """Refuse, before any training, a non-empty `out` that is not an earlier demo build (one with a recipe.json):
    make-demo overwrites its own files there and never removes a directory."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "recipe.json").is_file())):
        raise UserError(f"{out} exists and is not an earlier make-demo output (no recipe.json); choose another "
                         f"directory")


def train(out: Path, r: Recipe, prompts_out: Path | None) -> None:
    check_out(out)
    t_start = time.time()
    files = stdlib_files()
    train_files = [f for f in files if not is_held_out(f)]
    held = [f for f in files if is_held_out(f)]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in train_files]
    print(f"corpus: {len(train_files)} training files, {len(held)} held out; training tokenizer ...", flush=True)
    tok = train_bpe(texts, r.vocab)
    data = encode_corpus(tok, texts)
    print(f"corpus: {len(data):,} tokens ({time.time() - t_start:.0f}s)", flush=True)

    mx.random.seed(r.seed)
    config = checkpoint_config(text_config(r))
    net = Net(config)
    net.train()
    n_params = sum(v.size for _, v in tree_flatten(net.parameters()))
    print(f"model: {n_params:,} parameters", flush=True)
    rng = np.random.default_rng(r.seed)
    stream = batches(data, r, rng)

    train_steps(net, lambda m, x: joint_loss(m, x, r.mtp_weight), r.phase1_steps, r.lr, stream, "joint")
    net.model.freeze()  # phase 2 trains the head only (no weight decay on the frozen trunk either)
    train_steps(net, lambda m, x: distill_loss(m, x, r.distill_depths), r.phase2_steps, r.lr, stream, "distill")
    save(out, net, config, tok, r, time.time() - t_start)
    if prompts_out is not None:
        write_heldout_prompts(held, prompts_out)


def round_to_bf16(w: mx.array) -> mx.array:
    """Weights keep bf16 precision, as real releases do, but are stored as float32: on mlx's CPU backend a bf16
    matmul runs a generic kernel (a 128x384 matvec took 105 us against 11 us in float32 through BLAS), which made
    the demo's AR step 1.2x slower and its (K+1)-token verify 1.3-1.7 AR steps instead of 1.1-1.3."""
    return w.astype(mx.bfloat16).astype(mx.float32)


def hf_tensors(net: Net) -> dict[str, mx.array]:
    """The trained weights as Qwen publishes Qwen3.5 on Hugging Face (key names, conv1d as (C, 1, K), norms as
    offsets), rounded to bf16 precision. Rounding comes first: w - 1 of a bf16-exact w is exact in float32, so a
    loader's 1 + w gives back the very weights that were trained."""
    trunk = {k: v if k.endswith("A_log") else round_to_bf16(v) for k, v in tree_flatten(net.model.parameters())}
    mtp = {k: round_to_bf16(v) for k, v in tree_flatten(net.mtp.parameters())}
    hf, mtp_hf = to_hf_layout(trunk, mtp)
    return {**hf, **{f"mtp.{k}": v for k, v in mtp_hf.items()}}


def save(out: Path, net: Net, config: dict, tok, r: Recipe, seconds: float) -> None:
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), hf_tensors(net), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tok, out)
    from ..model.blas import active_blas

    env = {"blas": active_blas(), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
           "mlx": mx.__version__, "python": sys.version.split()[0]}
    (out / "recipe.json").write_text(json.dumps({**r.__dict__, "train_seconds": round(seconds), **env}, indent=2))


def write_heldout_prompts(held: list[Path], out: Path, n: int = 24, chars: int = 600) -> None:
    """Code prefixes from held-out stdlib files: the model continues them (plain text, no chat template)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for f in held:
        text = f.read_text(encoding="utf-8", errors="replace")
        cut = text.find("\ndef ", len(text) // 3)
        if cut < 0 or len(text) < 2 * chars:
            continue
        prefix = text[max(0, cut - chars) : cut + 1] + "def"
        rows.append({"id": f"stdlib-{len(rows) + 1:02d}", "category": "code_completion",
                     "prompt": prefix, "completion": True, "source": str(f.relative_to(root)), "max_tokens": 128})
        if len(rows) == n:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} held-out prompts to {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "demo")
    ap.add_argument("--prompts-out", type=Path, default=Path(__file__).parent.parent / "prompts" / "stdlib.jsonl")
    ap.add_argument("--phase1-steps", type=int, default=Recipe.phase1_steps)
    ap.add_argument("--phase2-steps", type=int, default=Recipe.phase2_steps)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    train(a.out, Recipe(seed=a.seed, phase1_steps=a.phase1_steps, phase2_steps=a.phase2_steps), a.prompts_out)


if __name__ == "__main__":
    main()
