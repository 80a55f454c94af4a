"""Every loader of the demo's tokenizer gives the ids the demo was trained on.

transformers 5 maps `model_type: qwen3_5` to `Qwen3_5Tokenizer`, which ignores `tokenizer_class` and rebuilds the
pipeline with Qwen3.5's split regex and NFC whatever tokenizer.json says; mlx_lm (and so mtpbench) loads through
it. The demo's tokenizer.json therefore carries that very pipeline, and the corpus was encoded with it
(`build.demo.encode_corpus`). Three encoders are compared on every shipped prompt set and on edge cases:
AutoTokenizer as mlx_lm loads it, the `tokenizers` library on tokenizer.json, and the training encoding.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

from mtpbench.builders.demo import encode_corpus
from mtpbench.builders.tokenizer import QWEN35_SPLIT, train_bpe, write_tokenizer
from mtpbench.defaults import DEMO_MODEL, PROMPTS_DIR
from mtpbench.sweep.prompts import encode, load_set

# llama.cpp's `qwen35` pre-tokenizer (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN35): Qwen3.5's tokenizer.json
# regex with the case-insensitive group spelled out, as its regex engine needs.
LLAMA_CPP_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

EDGE_CASES = [
    "",
    "x = 1234567890 + 3.14159e-10 - 0x1F; y=42;z = 007",
    " 5", "  55", "v2.0.11", "1,000,000", "2024-01-31T23:59:59Z",
    "a  b\t\t c\n\n\n   \r\n d      ", "   leading", "trailing   ", "\n", "\t", "  \n  \n",
    "naïve café — «ünïcödé» 日本語のテキスト 🙂🚀 Ελληνικά привет मराठी",
    "e\u0301 vs \u00e9, A\u030a vs \u00c5",  # decomposed vs composed: NFC makes them one
    "I've 'RE he'll THEY'D we'Ve",
    "def f(x: int) -> dict[str, list[int]]:\n\tif x >= 10 and x != 3:\n\t\treturn {'a': [x ** 2]}  # ok\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>",
    "<|endoftext|>text after",
]


def shipped_prompt_texts() -> list[str]:
    """Every text a shipped prompt set feeds a tokenizer: prompts, chat message contents, long-context documents
    and tasks."""
    texts = []
    for path in sorted(PROMPTS_DIR.glob("*.jsonl")):
        for p in load_set(path.stem):
            texts.append(p.raw_text())
            texts.extend(c for _, c in p.messages or ())
    data = Path(__file__).parents[1] / "mtpbench" / "prompts_data"
    for path in sorted(data.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.extend(v for v in row.values() if isinstance(v, str) and len(v) > 20)
    return texts


@pytest.fixture(scope="module")
def demo_tokenizers():
    return load_tokenizer(DEMO_MODEL), Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))


def _agree(wrapper, fast: Tokenizer, texts: list[str]) -> None:
    training = encode_corpus(fast, texts)
    at = 0
    for text in texts:
        ids = fast.encode(text).ids
        assert list(wrapper.encode(text)) == ids, text[:80]
        assert training[at : at + len(ids)].tolist() == ids, text[:80]
        at += len(ids) + 1  # <|endoftext|> after each text


def test_demo_loads_as_qwen3_5_tokenizer_with_the_pipeline_it_ships(demo_tokenizers):
    wrapper, fast = demo_tokenizers
    assert type(wrapper._tokenizer).__name__ == "Qwen3_5Tokenizer"  # so tokenizer.json's pipeline alone is not enough
    spec = json.loads((DEMO_MODEL / "tokenizer.json").read_text())
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == PRETOKENIZE_REGEX == QWEN35_SPLIT
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert byte_level["type"] == "ByteLevel" and not byte_level["use_regex"] and not byte_level["add_prefix_space"]


def test_every_shipped_prompt_set_encodes_alike(demo_tokenizers):
    wrapper, fast = demo_tokenizers
    texts = shipped_prompt_texts()
    assert len(texts) > 50
    _agree(wrapper, fast, texts)


def test_edge_cases_encode_alike(demo_tokenizers):
    wrapper, fast = demo_tokenizers
    _agree(wrapper, fast, EDGE_CASES)
    assert len(fast.encode("1234567890").ids) == 10  # Qwen3.5 splits digits one by one
    assert fast.encode("e\u0301").ids == fast.encode("\u00e9").ids  # NFC


def test_mtpbench_prompt_encoding_matches_the_tokenizers_library(demo_tokenizers):
    """What the sweep feeds the model (sweep.prompts.encode, chat template included) is what tokenizer.json gives
    for the same rendered text: special tokens of the template included."""
    wrapper, fast = demo_tokenizers
    for path in sorted(PROMPTS_DIR.glob("*.jsonl")):
        for p in load_set(path.stem):
            ids = encode(wrapper, p, None)
            text = p.raw_text() if p.completion else wrapper.apply_chat_template(
                p.chat_messages(), add_generation_prompt=True, tokenize=False)
            assert ids == fast.encode(text).ids, p.id


def test_llama_cpp_qwen35_split_gives_the_same_pieces():
    """llama.cpp's qwen35 regex splits every shipped text as ours does. llama.cpp may skip NFC: the shipped prompts
    are NFC already, so that step changes none of them."""
    ours = pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated")
    theirs = pre_tokenizers.Split(Regex(LLAMA_CPP_QWEN35), behavior="isolated")
    for text in shipped_prompt_texts() + EDGE_CASES:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text[:80]
    assert all(unicodedata.is_normalized("NFC", t) for t in shipped_prompt_texts())


def test_a_trained_tokenizer_round_trips_through_every_loader(tmp_path):
    """train_bpe's tokenizer in memory (what encodes a training corpus), saved and loaded back by `tokenizers` and by
    mlx_lm, gives the same ids."""
    corpus = ["def add(a, b):\n    return a + b  # 12345\n", "café 3.14 naïve\t\tx", "for i in range(100): pass\n"] * 5
    tok = train_bpe(corpus, 300)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    write_tokenizer(tok, tmp_path)
    wrapper, fast = load_tokenizer(tmp_path), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = corpus + EDGE_CASES
    assert [e.ids for e in tok.encode_batch(texts)] == [fast.encode(t).ids for t in texts]
    _agree(wrapper, fast, texts)
