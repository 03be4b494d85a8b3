"""The decode step a stage expects next, made ready while it waits: the fast path of a running ring.

Parts:
- `ExpectedStep`: the requests of the batch a stage just ran, each one position on: their chunks,
  what the backend prepared for them (KV blocks, the step's plan), the exact header of the
  message that will bring their inputs, and the header of the Activations this stage will send.
- `expect_next(...)`: builds one after a step, or None where the next step cannot be foreseen.
- `ExpectedStep.inputs(frames)`: the step's inputs when `frames` are the awaited message (else None,
  and the message takes the general path: decode, handle, take_batch).

Why: at low load a pipeline's stages wait most of the time, and each hop's Python runs on caches
that the stage before just flushed streaming its weights. Most of that work (decoding the header,
building the batch, allocating KV, the attention gathers and RoPE rows, encoding the next header)
depends only on which requests run at which positions, known as soon as a step ends; it is done
then, after the outputs are sent, while the next stage computes. What is left when the message
comes is one bytes comparison (or, at the first stage, one decode of NextTokens) and the layers.
Measurements: docs/performance-notes.md.

The message is recognised byte for byte (Activations: what the previous stage's codec will
produce for these entries, dtype and shape) or, for the first stage, by a check of the decoded
NextTokens against the expected requests and positions; anything else, or anything that changed
meanwhile (a release, a new request, a new assignment), leaves the fast path unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers import codec
from workers import protocol as p
from workers.backend import SequenceChunk, StageBackend
from workers.host_arrays import numpy_dtype


@dataclass(frozen=True)
class ExpectedStep:
    chunks: tuple[SequenceChunk, ...]  # one token per request, at the position it reached
    prepared: object  # what the backend's `prepare(chunks)` returned
    inputs_header: bytes | None  # Activations header that brings the hidden states (None: first stage)
    hidden_shape: tuple[int, int]  # [num_requests, hidden_size]
    dtype: str  # wire dtype of the hidden states (the backend's)
    vocab_size: int
    send_address: str | None  # where every request goes next (None: last stage, or several places)
    send_header: bytes | None  # header of the Activations sent there

    def inputs(self, frames: Sequence[Any]) -> np.ndarray | None:
        """Token ids [B] (first stage) or hidden states [B, hidden] of this step, from `frames`
        if they are the message it waits for; None otherwise (nothing is consumed)."""
        if self.inputs_header is None:
            token_ids = self._next_token_ids(frames)
            return None if token_ids is None else np.array(token_ids, dtype=np.int64)
        if len(frames) != 2 or frames[0].bytes != self.inputs_header:
            return None
        data = frames[1].buffer
        rows, width = self.hidden_shape
        dtype = numpy_dtype(self.dtype)
        if memoryview(data).nbytes != rows * width * dtype.itemsize:
            return None
        return np.frombuffer(data, dtype=dtype).reshape(rows, width)

    def _next_token_ids(self, frames: Sequence[Any]) -> list[int] | None:
        """The sampled tokens, if `frames` are one NextTokens for exactly these requests at these
        positions, none finished, every id within the vocabulary."""
        if len(frames) != 1:
            return None
        try:
            message = codec.decode(list(frames))
        except p.ProtocolError:  # the general path reports it
            return None
        if not isinstance(message, p.NextTokens) or len(message.tokens) != len(self.chunks):
            return None
        for token, chunk in zip(message.tokens, self.chunks):
            if (token.request_id != chunk.request_id or token.position != chunk.start_position or token.finished
                    or not 0 <= token.token_id < self.vocab_size):
                return None
        return [token.token_id for token in message.tokens]


def activations_header(entries: Sequence[p.ActivationEntry], dtype: str, shape: tuple[int, int]) -> bytes:
    """The header `codec.encode` gives an Activations with these entries and a [shape] `dtype` tensor."""
    payload = p.TensorPayload(dtype, shape, b"")
    return codec.encode(p.Activations(tuple(entries), payload))[0]


def expect_next(
    backend: StageBackend, positions: dict[str, int], next_addresses: Sequence[str | None]
) -> ExpectedStep | None:
    """The next decode step of the requests at `positions` (id -> tokens in this stage's cache, in
    batch order), each going on to its `next_addresses` entry; None when the backend prepared
    nothing (no KV blocks, or a backend without `prepare`)."""
    chunks = tuple(SequenceChunk(request_id, position, 1) for request_id, position in positions.items())
    if not chunks:
        return None
    prepared = backend.prepare(chunks)
    if prepared is None:
        return None
    # the Activations that bring this step and the ones it sends have the same entries and shape
    entries = [p.ActivationEntry(chunk.request_id, chunk.start_position, 1) for chunk in chunks]
    shape = (len(chunks), backend.hidden_size)
    header = None if backend.is_first and backend.is_last else activations_header(entries, backend.dtype, shape)
    inputs_header = None if backend.is_first else header
    send_address = send_header = None
    if not backend.is_last and len(set(next_addresses)) == 1 and next_addresses[0] is not None:
        send_address, send_header = next_addresses[0], header
    return ExpectedStep(
        chunks, prepared, inputs_header, shape, backend.dtype, backend.vocab_size, send_address, send_header
    )
