"""The torch implementation of `StageBackend` (cpu, cuda, mps).

Parts:
- `resolve_dtype(name, config)`: "auto" -> the checkpoint's dtype, else float32/bfloat16/float16.
- `TorchStageBackend`: loads only its stage's tensors (workers/checkpoint.py; a GGUF through
  workers/gguf_file.py, kept quantized; `quantization` int8/int4 quantizes while reading), builds a
  `StageModel` (workers/stage_model.py) and a `BlockKVCache` (workers/kv_cache.py) sized from
  `kv_budget_bytes`, and runs batched steps under `torch.inference_mode()`.

Outputs of `forward` live on the backend's device (call `.cpu()` before sending them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.backend import KVCacheFull, SequenceChunk, StageBackend, StageConfig
from workers.checkpoint import load_stage_tensors
from workers.gguf_file import is_gguf, load_gguf_stage_tensors, open_gguf
from workers.kv_cache import BlockKVCache
from workers.model_config import ModelConfig, parse_dtype
from workers.quantization import quantizer
from workers.stage_model import BatchPlan, RopeTable, StageModel, build_batch_plan


@dataclass(frozen=True)
class PreparedStep:
    """A step's KV blocks (allocated) and plan, built by `prepare` before its inputs arrived."""

    chunks: tuple[SequenceChunk, ...]
    plan: BatchPlan
    frees_seen: int  # the cache's count of `free` calls then: any free since makes it stale


def resolve_dtype(name: str, config: ModelConfig) -> torch.dtype:
    """The compute dtype: "auto" is the checkpoint's dtype."""
    return config.dtype if name == "auto" else parse_dtype(name)


def _large_allocations_mapped() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping (glibc's M_MMAP_THRESHOLD),
    freed to the OS at once. glibc otherwise raises the threshold after the first large frees and
    packing a tied LM head's planes (many ~10 MB temporaries) grew the heap by ~270 MB."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _return_freed_memory() -> None:
    """Hand the loading temporaries' freed heap back to the OS (glibc keeps it otherwise, and a
    stage's resident memory would stay at its loading peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TorchStageBackend(StageBackend):
    def _read_tensors(self, config: StageConfig, mc: ModelConfig) -> dict:
        """This stage's tensors: from a GGUF (kept quantized) or safetensors (quantized while
        read when `config.quantization` says so). Quantized weights run on CPU only."""
        quantized = is_gguf(config.model_dir) or config.quantization != "none"
        if quantized:
            _large_allocations_mapped()
        if quantized and self.device.type != "cpu":
            raise ValueError(f"quantized weights (GGUF, --quantization) run on cpu only, not {self.device}")
        if is_gguf(config.model_dir):
            if config.quantization != "none":
                raise ValueError("--quantization applies to safetensors checkpoints; a GGUF is already quantized")
            model = open_gguf(str(Path(config.model_dir).resolve()))
            first_read = len(model.bytes_read)
            tensors = load_gguf_stage_tensors(
                model, config.start_layer, config.end_layer, mc.num_hidden_layers,
                mc.tie_word_embeddings, self.dtype,
            )
            self.gguf_bytes_read = tuple(model.bytes_read[first_read:])  # (file, start, end) ranges
            return tensors
        return load_stage_tensors(
            config.model_dir,
            config.start_layer,
            config.end_layer,
            mc.num_hidden_layers,
            mc.tie_word_embeddings,
            dtype=self.dtype,
            device=str(self.device),
            convert=quantizer(config.quantization),
        )

    def __init__(self, config: StageConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.model_config = model_config or ModelConfig.from_path(config.model_dir)
        mc = self.model_config
        if not 0 <= config.start_layer < config.end_layer <= mc.num_hidden_layers:
            raise ValueError(
                f"layer range [{config.start_layer}, {config.end_layer}) outside the model's "
                f"{mc.num_hidden_layers} layers"
            )
        self.num_layers = mc.num_hidden_layers
        self.hidden_size = mc.hidden_size
        self.vocab_size = mc.vocab_size
        self.dtype = resolve_dtype(config.dtype, mc)
        self.device = torch.device(config.device)
        tensors = self._read_tensors(config, mc)
        self._loaded_names = frozenset(tensors)
        self.model = StageModel.from_tensors(mc, config.start_layer, config.end_layer, tensors)
        del tensors
        _return_freed_memory()
        self.model.eval()
        self.kv_cache = BlockKVCache(
            num_layers=config.end_layer - config.start_layer,
            num_kv_heads=mc.num_key_value_heads,
            head_dim=mc.head_dim,
            kv_budget_bytes=config.kv_budget_bytes,
            block_size_tokens=config.kv_block_size_tokens,
            dtype=self.dtype,
            device=self.device,
        )
        self._kv_layers = self.kv_cache.layers
        self._rope = RopeTable(mc.rope_inv_freq(), self.dtype, self.device)
        self._frees = 0  # `free` calls so far (a prepared step made before the last one is stale)

    def prepare(self, chunks: Sequence[SequenceChunk]) -> PreparedStep | None:
        """See StageBackend.prepare: allocates the chunks' KV blocks and builds their plan."""
        if not chunks:
            return None
        try:
            self.kv_cache.allocate(chunks)
        except (KVCacheFull, ValueError):
            return None
        return PreparedStep(tuple(chunks), self._plan(chunks), self._frees)

    def forward(
        self, chunks: Sequence[SequenceChunk], inputs: torch.Tensor, prepared: object | None = None
    ) -> torch.Tensor:
        """See StageBackend.forward. Raises KVCacheFull (nothing changed) when short of blocks."""
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        total = sum(c.num_tokens for c in chunks)
        if inputs.shape[0] != total:
            raise ValueError(f"inputs have {inputs.shape[0]} rows, chunks have {total} tokens")
        if (
            isinstance(prepared, PreparedStep)
            and prepared.frees_seen == self._frees
            and (prepared.chunks is chunks or prepared.chunks == tuple(chunks))
        ):
            plan = prepared.plan  # blocks allocated when it was prepared
        else:
            self.kv_cache.allocate(chunks)
            plan = self._plan(chunks)
        if self.is_first:
            inputs = inputs.to(self.device, torch.int64)
        else:
            inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            return self.model(inputs, plan, self._kv_layers)

    def _plan(self, chunks: Sequence[SequenceChunk]) -> BatchPlan:
        tables = self.kv_cache.block_tables
        return build_batch_plan(
            [c.start_position for c in chunks],
            [c.num_tokens for c in chunks],
            [tables[c.request_id] for c in chunks],
            self.kv_cache.block_size,
            self._rope,
        )

    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.kv_cache.can_allocate(chunks)

    def free(self, request_id: str) -> None:
        self._frees += 1
        self.kv_cache.free(request_id)

    def kv_free_tokens(self) -> int:
        return self.kv_cache.free_tokens()

    def kv_capacity_tokens(self) -> int:
        return self.kv_cache.capacity_tokens()

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    @property
    def loaded_tensor_names(self) -> frozenset[str]:
        return self._loaded_names
