"""The backend interface: what a worker needs from whatever runs its layers.

Parts:
- `StageConfig`: which layers of which model, on which device, with how much KV memory.
- `SequenceChunk`: one request's slice of a batch (its new tokens and where they start).
- `StageBackend`: runs layers [start_layer, end_layer) for a batch of chunks, owns the KV cache;
  may prepare a step it is told to expect (`prepare`), so that running it later does less;
  may reuse the KV of cached prompt prefixes (`cache_prompt`, keyed by block hash chains).
- `KVCacheFull`: raised when a batch needs more KV blocks than are free (nothing is changed then).
- `load_backend(config, backend)`: builds the backend `backend` names for a config, through its
  plugin (workers/backend_plugins.py: entry-point group `potluck.backends`).

The boundary is framework-neutral: what a backend receives and returns is a numpy array (dtype +
shape over a raw buffer; `np.from_dlpack` takes any DLPack producer), so a backend needs no torch.
bfloat16, which numpy lacks, crosses as its raw bits in a uint16 array, named by `dtype`
(workers/host_arrays.py). A backend knows nothing of sockets, routes or sampling; the worker
(workers/worker.py) owns those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class KVCacheFull(RuntimeError):
    """The batch needs more KV blocks than are free. The cache is left unchanged."""


@dataclass(frozen=True)
class StageConfig:
    model_dir: str
    start_layer: int
    end_layer: int  # exclusive
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 ("auto": the checkpoint's dtype)
    device: str = "cpu"  # what the backend's plugin lists (torch: cpu | cuda | cuda:N | mps; mlx: cpu | gpu)
    kv_budget_bytes: int = 256 * 2**20
    kv_block_size_tokens: int = 16
    quantization: str | None = None  # None | int8 | int4: quantize linear weights (a backend may refuse)
    prefix_caching: bool = True  # keep full prompt blocks and reuse them (workers/kv_cache.py)


@dataclass(frozen=True)
class SequenceChunk:
    request_id: str
    start_position: int  # tokens of this request already in this stage's KV cache
    num_tokens: int  # new tokens in this chunk (1 for a decode step)
    all_logits: bool = False  # last stage: logits at every row of the chunk, not only its last (prompt logprobs)


class StageBackend(ABC):
    """Runs one contiguous layer range of a model; holds the KV cache of those layers."""

    config: StageConfig
    num_layers: int  # layers in the whole model
    hidden_size: int
    vocab_size: int
    dtype: str  # wire name of the hidden states' dtype: "float32" | "bfloat16" | "float16"

    @property
    def is_first(self) -> bool:
        return self.config.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.config.end_layer == self.num_layers

    @abstractmethod
    def forward(self, chunks: Sequence[SequenceChunk], inputs: np.ndarray, prepared: object | None = None) -> np.ndarray:
        """Run one batched step.

        inputs: first stage: token ids [sum(num_tokens)] int64; otherwise hidden states
        [sum(num_tokens), hidden_size] in `self.dtype` (bfloat16: uint16 bits), rows grouped by
        chunk in order (read-only: it may be a received frame).
        Returns hidden states [sum(num_tokens), hidden_size] in `self.dtype` (not last stage), or
        float32 logits [len(chunks), vocab_size] at each chunk's last token (last stage); a chunk
        with `all_logits` has a row of logits for each of its tokens instead.
        Raises ValueError for inputs of the wrong shape, dtype or token range (nothing changed).
        Allocates KV blocks for the new tokens; raises KVCacheFull (changing nothing) if short.
        prepared: what `prepare(chunks)` returned for these same chunks, if anything.
        """

    def cache_prompt(
        self, request_id: str, block_hashes: Sequence[int], num_prompt_tokens: int, want_tokens: int | None = None
    ) -> int:
        """Start a request's prompt: reuse the KV of its longest cached prefix (whole blocks, at most
        `want_tokens`, never the block of the last prompt token) and hold room for the rest, whose
        full blocks become reusable at once (a later chunk of the same batch may share them).
        Returns the tokens reused; the prompt's forward then starts there. Raises KVCacheFull
        (nothing changed) when the rest does not fit. Default: no prefix caching (0, nothing held)."""
        return 0

    def cached_prefix_tokens(self, block_hashes: Sequence[int], num_prompt_tokens: int) -> int:
        """Tokens `cache_prompt` would reuse now (0 without prefix caching)."""
        return 0

    def prefix_cache_counts(self) -> tuple[int, int]:
        """(prompt tokens looked up, tokens found) since the layers were loaded."""
        return 0, 0

    def prepare(self, chunks: Sequence[SequenceChunk]) -> object | None:
        """Do ahead of time what a later `forward(chunks, ..., prepared=result)` would do first
        (a worker calls it while it waits for a step it expects). None: nothing prepared (the
        default), or no KV blocks for it. A prepared step that a `free` made stale is redone
        by `forward`, never used."""
        return None

    @abstractmethod
    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        """Whether `forward(chunks, ...)` would find enough free KV blocks."""

    @abstractmethod
    def free(self, request_id: str) -> None:
        """Release the request's KV blocks (no-op for an unknown id)."""

    @abstractmethod
    def kv_free_tokens(self) -> int: ...

    @abstractmethod
    def kv_capacity_tokens(self) -> int: ...

    @property
    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of parameters this stage holds."""

    @property
    @abstractmethod
    def loaded_tensor_names(self) -> frozenset[str]:
        """Checkpoint tensor names this stage read (tests assert it stays in its range)."""


def load_backend(config: StageConfig, backend: str = "torch") -> StageBackend:
    """The stage `config` on the installed backend named `backend` (see workers/backend_plugins.py)."""
    from workers.backend_plugins import get_plugin

    return get_plugin(backend).load(config)
