"""The backend interface: what a worker needs from whatever runs its layers.

Parts:
- `StageConfig`: which layers of which model, on which device, with how much KV memory.
- `SequenceChunk`: one request's slice of a batch (its new tokens and where they start).
- `StageBackend`: runs layers [start_layer, end_layer) for a batch of chunks, owns the KV cache;
  may prepare a step it is told to expect (`prepare`), so that running it later does less.
- `KVCacheFull`: raised when a batch needs more KV blocks than are free (nothing is changed then).
- `load_backend`: builds the backend for a config (torch today; other runtimes implement the ABC).

A backend knows nothing of sockets, routes or sampling; the worker (workers/worker.py) owns those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class KVCacheFull(RuntimeError):
    """The batch needs more KV blocks than are free. The cache is left unchanged."""


@dataclass(frozen=True)
class StageConfig:
    model_dir: str
    start_layer: int
    end_layer: int  # exclusive
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 ("auto": the checkpoint's dtype)
    device: str = "cpu"  # cpu | cuda | cuda:N | mps
    kv_budget_bytes: int = 256 * 2**20
    kv_block_size_tokens: int = 16
    quantization: str = "none"  # none | int8 | int4: weight-only, for safetensors checkpoints


@dataclass(frozen=True)
class SequenceChunk:
    request_id: str
    start_position: int  # tokens of this request already in this stage's KV cache
    num_tokens: int  # new tokens in this chunk (1 for a decode step)


class StageBackend(ABC):
    """Runs one contiguous layer range of a model; holds the KV cache of those layers."""

    config: StageConfig
    num_layers: int  # layers in the whole model
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    @property
    def is_first(self) -> bool:
        return self.config.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.config.end_layer == self.num_layers

    @abstractmethod
    def forward(self, chunks: Sequence[SequenceChunk], inputs: torch.Tensor, prepared: object | None = None) -> torch.Tensor:
        """Run one batched step.

        inputs: first stage: token ids [sum(num_tokens)] int64; otherwise hidden states
        [sum(num_tokens), hidden_size] in `self.dtype`, rows grouped by chunk in order.
        Returns hidden states [sum(num_tokens), hidden_size] in `self.dtype` (not last stage), or
        float32 logits [len(chunks), vocab_size] at each chunk's last token (last stage).
        Allocates KV blocks for the new tokens; raises KVCacheFull (changing nothing) if short.
        prepared: what `prepare(chunks)` returned for these same chunks, if anything.
        """

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


def load_backend(config: StageConfig) -> StageBackend:
    """The backend for `config`. Torch serves cpu, cuda and mps."""
    from workers.torch_backend import TorchStageBackend

    return TorchStageBackend(config)
