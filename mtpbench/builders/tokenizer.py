"""Build a small byte-level BPE tokenizer locally (no download) and write it in Hugging Face layout.

Used by tiny test checkpoints and by the embedded demo model, so both load through `mlx_lm.load` /
`transformers.AutoTokenizer` exactly like a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"

# A Qwen-style chat template that honours `enable_thinking`, like the Qwen3.5/3.6 templates do.
CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# Qwen3.5's pre-tokenizer split (transformers' Qwen3_5Tokenizer.PRETOKENIZE_REGEX, llama.cpp's `qwen35`): digits one
# by one, letters with their combining marks. transformers 5 rebuilds any `qwen3_5` tokenizer with this regex + NFC
# whatever tokenizer.json says, so tokenizer.json says exactly the same and every loader gives the same ids.
QWEN35_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
                r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen35_pipeline(tok: Tokenizer) -> Tokenizer:
    """Give `tok` Qwen3.5's normalizer, pre-tokenizer and decoder (NFC, the split regex, then bytes)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts` with Qwen3.5's pre-tokenizer; deterministic for the same texts and size."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB} for a byte-level tokenizer, got {vocab_size}")
    tok = qwen35_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pad_vocab(tok: Tokenizer, size: int) -> Tokenizer:
    """`tok` with ids up to `size` - 1, those past its own vocabulary decoding to the placeholder `<|pad_ID|>`.

    A model whose vocabulary is wider than its tokenizer (Qwen's 248,320 rows on a tiny tokenizer, to measure
    what a real vocabulary costs) can then emit any id and every loader, streaming detokenizers included,
    decodes it. No merge produces a placeholder, so encoding is unchanged.
    """
    have = tok.get_vocab_size(with_added_tokens=True)
    if size <= have:
        return tok
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|pad_{i}|>": i for i in range(have, size)})
    return Tokenizer.from_str(json.dumps(spec))


def write_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config's eos so every loader agrees."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = [tok.token_to_id(EOS_TOKEN), tok.token_to_id("<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
