"""A GGUF file's tokenizer (`tokenizer.ggml.*` metadata) as a `tokenizers` tokenizer.

Parts:
- `read_gguf_tokenizer_fields(path)`: the `tokenizer.*` metadata of a GGUF (the `gguf` package).
- `build_backend(fields)`: a `tokenizers.Tokenizer` for `tokenizer.ggml.model` "gpt2" (byte-level
  BPE: vocabulary + merges, split by the regex llama.cpp uses for `tokenizer.ggml.pre`) or
  "llama" (SentencePiece BPE with byte fallback, "▁" for spaces); tokens of type 3 (control) are
  special, type 4 (user-defined) added; bos added when `tokenizer.ggml.add_bos_token` says so.
- `gguf_special_tokens(fields)`: bos / eos / unk / pad token strings from their ids.
Tests compare encode / decode with transformers' own GGUF tokenizer conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

CONTROL, USER_DEFINED = 3, 4
# llama.cpp's split regexes by `tokenizer.ggml.pre` (None: GPT-2's own, inside ByteLevel)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3, "llama-bpe": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "qwen2": _QWEN2}


def read_gguf_tokenizer_fields(path: str | Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    return {token: index for index, token in enumerate(tokens)}


def build_backend(fields: dict[str, Any]) -> BackendTokenizer:
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        backend = BackendTokenizer(models.BPE(vocab=_byte_level_vocab(tokens), merges=merges, fuse_unk=False))
        split = _SPLITS.get(fields.get("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        backend.decoder = decoders.ByteLevel()
    elif kind == "llama":
        unk = fields.get("tokenizer.ggml.unknown_token_id")
        backend = BackendTokenizer(
            models.BPE(
                vocab=_byte_level_vocab(tokens), merges=merges or None, unk_token=None if unk is None else tokens[unk],
                fuse_unk=True, byte_fallback=True,
            )
        )
        if fields.get("tokenizer.ggml.add_space_prefix", True):
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if fields.get("tokenizer.ggml.add_space_prefix", True) else [])
        )
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)]
        )
    return backend


def gguf_special_tokens(fields: dict[str, Any]) -> dict[str, str]:
    tokens = fields["tokenizer.ggml.tokens"]
    special = {}
    for key, field in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        index = fields.get(f"tokenizer.ggml.{field}_token_id")
        if index is not None and 0 <= int(index) < len(tokens):
            special[key] = tokens[int(index)]
    return special
