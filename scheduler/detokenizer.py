"""Incremental detokenisation: text deltas as tokens arrive, no broken UTF-8, stop strings.

Parts:
- `DetokenizedStep`: the text one token released, and whether a stop string ended generation.
- `IncrementalDetokenizer`: `add(token_id)` per generated token, `flush()` at the end.

Decoding uses a sliding window (vLLM's prefix / read offsets) seeded with the last few prompt
tokens, so a step costs O(window), not O(output). While the decoded tail ends in U+FFFD (a
character split across tokens) nothing is released. For context-free decoders (byte-level BPE)
the concatenated deltas equal `decode(generated ids)`; for SentencePiece-style decoders the
prompt context keeps the first token's leading space, as vLLM and the OpenAI API do.

Stop strings: the output ends right before the first occurrence of any stop string (the stop
string is not emitted). Text that could still be the start of a stop string is held back until
the next tokens show it is not; `flush()` releases what is held back when generation ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output (leading-space handling)
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizedStep:
    text: str  # newly released text (may be empty)
    stopped: bool  # a stop string was found: generation must end; `text` ends before it


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas for one request."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) - 1 for s in self._stop), default=0)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(_REPLACEMENT):
            context = []  # the prompt ends inside a character: decode the output on its own
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pending = ""  # decoded text not yet released (could start a stop string)
        self._output = ""  # everything released so far
        self._num_generated = 0
        self._stopped = False

    @property
    def output_text(self) -> str:
        """The text released so far."""
        return self._output

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def num_generated_tokens(self) -> int:
        return self._num_generated

    def add(self, token_id: int) -> DetokenizedStep:
        """Feed one generated token; returns the text it releases."""
        if self._stopped:
            return DetokenizedStep("", True)
        self._ids.append(token_id)
        self._num_generated += 1
        delta = self._decode_delta(final=False)
        if not delta and self._stop:
            # A partial character is held back; the complete ones before it cannot change, so a
            # stop string already among them ends generation now, not a token later.
            stopped = self._stop_at_first(self._pending + self._complete_tail())
            if stopped is not None:
                return stopped
        return self._release(delta, final=False)

    def _stop_at_first(self, text: str) -> DetokenizedStep | None:
        """End the output before the earliest full occurrence of any stop string in `text`."""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut < 0:
            return None
        self._stopped = True
        self._pending = ""
        self._output += text[:cut]
        return DetokenizedStep(text[:cut], True)

    def _complete_tail(self) -> str:
        """The characters decoded past the read offset, without the trailing partial one."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        return full_text[len(prefix_text):].rstrip(_REPLACEMENT)

    def flush(self) -> str:
        """End of generation: release the held-back text (and any incomplete character as U+FFFD)."""
        if self._stopped:
            return ""
        return self._release(self._decode_delta(final=True), final=True).text

    def _decode_delta(self, final: bool) -> str:
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(_REPLACEMENT)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def _release(self, delta: str, final: bool) -> DetokenizedStep:
        text = self._pending + delta
        if not self._stop:
            self._pending = ""
            self._output += text
            return DetokenizedStep(text, False)
        stopped = self._stop_at_first(text)
        if stopped is not None:
            return stopped
        hold = 0 if final else self._partial_stop_len(text)
        released, self._pending = text[: len(text) - hold], text[len(text) - hold:]
        self._output += released
        return DetokenizedStep(released, False)

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
