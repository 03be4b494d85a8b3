"""The decode step a stage expects next, made ready while it waits: the fast path of a running ring.

Parts:
- `ExpectedStep`: the requests of the batch a stage just ran, each one position on: their chunks,
  what the backend prepared for them (KV blocks, the step's plan), the exact header of the
  message that will bring their inputs, and the header of the Activations this stage will send.
- `expect_next(...)`: builds one after a step, or None where the next step cannot be foreseen.
- `ExpectedStep.inputs(frames)`: the step's inputs when `frames` are the awaited message (else None,
  and the message takes the general path: decode, handle, take_batch).

Why: at low load a pipeline's stages wait most of the time, and each hop's Python runs on caches
that the stage before just flushed streaming its weights (on the 2-core development VM, 110M model,
3 co-located workers: ~550 us from a middle stage's poll returning to its layers starting, ~15x
the same code warm). Most of that work (decoding the header, building the batch, allocating KV,
the attention gathers and RoPE rows, encoding the next header) depends only on which requests run
at which positions, known as soon as a step ends; it is done then, after the outputs are sent,
while the next stage computes (~0.3 ms of CPU there). What is left when the message comes is one
bytes comparison and the layers: poll return -> layers 0.55 -> 0.23 ms, the three hops of a token
3.2 -> 2.0-2.2 ms (median, model end to the next stage's model start), one stream.

The message is recognised byte for byte (Activations: what the previous stage's codec will
produce for these entries, dtype and shape) or, for the first stage, by a check of the decoded
NextTokens against the expected requests and positions; anything else, or anything that changed
meanwhile (a release, a new request, a new assignment), leaves the fast path unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
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
            header = msgpack.unpackb(frames[0].buffer, raw=False)
        except Exception:  # msgpack raises several types; the general path reports it
            return None
        if not isinstance(header, list) or len(header) != 2 or header[0] != "NextTokens":
            return None
        fields = header[1]
        tokens = fields.get("tokens") if isinstance(fields, dict) and len(fields) == 1 else None
        if not isinstance(tokens, list) or len(tokens) != len(self.chunks):
            return None
        token_ids = []
        for token, chunk in zip(tokens, self.chunks):
            if (
                not isinstance(token, dict)
                or len(token) != 4
                or token.get("request_id") != chunk.request_id
                or token.get("position") != chunk.start_position
                or token.get("finished") is not False
            ):
                return None
            token_id = token.get("token_id")
            if type(token_id) is not int or not 0 <= token_id < self.vocab_size:
                return None
            token_ids.append(token_id)
        return token_ids


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
