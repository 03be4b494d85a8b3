"""Constrained decoding on the last stage, with xgrammar: a grammar spec -> a token mask per step.

Parts:
- `GRAMMAR_KINDS`: what `SamplingParams.grammar_kind` may be: json_schema, json_object, regex,
  choice (a JSON list of strings, one of them exactly), ebnf.
- `build_grammar(kind, text)`: the spec as an `xgrammar.Grammar` (raises `GrammarError` with a
  one-line reason); the API calls it to reject a bad spec with a 400 before anything runs.
- `tokenizer_info(model_dir, vocab_size, stop_token_ids)`: the vocabulary of the model
  directory's tokenizer.json as xgrammar needs it (no transformers at run time).
- `GrammarCompiler`: one per worker stage and stop-token set: that vocabulary read once,
  compiled grammars cached by spec.
- `RequestGrammar`: one request's matcher: `mask(row)` sets the logits of tokens the grammar
  forbids to -inf, `accept(token)` advances it; built with the tokens already generated (a request
  resumed after a worker loss replays them).

JSON is compact (no free whitespace), so a random-weight model cannot wander in blanks forever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pathlib import Path

import torch
import xgrammar as xgr
from tokenizers import Tokenizer

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf")


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled."""


def _choices(text: str) -> list[str]:
    choices = json.loads(text)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choice needs a non-empty list of non-empty strings")
    return choices


# a JSON string character that needs no escape, printable ASCII: a negated class let byte-level
# tokens end a string inside a multi-byte UTF-8 character (invalid text, too long once decoded)
_PLAIN_CHAR = '[ !#-\\[\\]-~]'


def _bounded_strings(schema: Any) -> Any:
    """xgrammar 0.2.9 lets control characters into strings with minLength / maxLength (invalid
    JSON); such strings become a pattern of plain characters with the same bounds."""
    if isinstance(schema, list):
        return [_bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & set(out):
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHAR}{{{low},{'' if high is None else int(high)}}}$"
    return out


def build_grammar(kind: str, text: str) -> xgr.Grammar:
    """`kind` + `text` (see GRAMMAR_KINDS) -> xgrammar Grammar; GrammarError when it does not compile."""
    try:
        if kind == "json_schema":
            schema = json.dumps(_bounded_strings(json.loads(text)))
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in _choices(text)))
        if kind == "ebnf":
            return xgr.Grammar.from_ebnf(text)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first)  # xgrammar's "[time] file.cc:line: "
        raise GrammarError(f"invalid {kind} grammar: {first}") from None
    raise GrammarError(f"unknown grammar kind {kind!r} (one of {', '.join(GRAMMAR_KINDS)})")


def tokenizer_info(model_dir: str, vocab_size: int, stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of `model_dir`/tokenizer.json: each id's token string (special tokens as
    "", which no grammar matches; they end generation only as stop tokens) and how strings
    encode bytes (byte-level BPE, SentencePiece byte fallback, or raw)."""
    backend = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    vocab = [""] * vocab_size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= token_id < vocab_size and token_id not in special:
            vocab[token_id] = token
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = [decoder, *(decoder.get("decoders") or [])]
    kinds = {part.get("type") for part in parts if isinstance(part, dict)}
    if "ByteLevel" in kinds:
        vocab_type = xgr.VocabType.BYTE_LEVEL
    elif "ByteFallback" in kinds:
        vocab_type = xgr.VocabType.BYTE_FALLBACK
    else:
        vocab_type = xgr.VocabType.RAW
    prefix_space = vocab_type == xgr.VocabType.BYTE_FALLBACK and backend.encode("a", add_special_tokens=False).tokens[:1] == ["▁a"]
    return xgr.TokenizerInfo(vocab, vocab_type, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None,
                             add_prefix_space=prefix_space)


class GrammarCompiler:
    """The tokenizer of `model_dir` as xgrammar sees it, and compiled grammars by spec."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.info = tokenizer_info(model_dir, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._compiled: dict[tuple[str, str], xgr.CompiledGrammar] = {}

    def compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        key = (kind, text)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.compiler.compile_grammar(build_grammar(kind, text))
            if len(self._compiled) >= 256:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = compiled
        return compiled


class RequestGrammar:
    """One request's grammar state on the last stage."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, stop_token_ids: Sequence[int],
                 replay: Sequence[int] = ()) -> None:
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        for token_id in replay:
            self.accept(token_id)

    def mask(self, row: torch.Tensor) -> None:
        """Forbidden tokens of the next step -> -inf in `row` ([vocab], float32, in place)."""
        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(row.view(1, -1), self.bitmask, vocab_size=self.vocab_size)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False when the grammar did not allow it (or has ended)."""
        if self.matcher.is_terminated():
            return False
        return bool(self.matcher.accept_token(token_id))

