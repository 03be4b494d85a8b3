"""The torch implementation of `StageBackend` (cpu, cuda, mps).

Parts:
- `resolve_dtype(name, config)`: "auto" -> the checkpoint's dtype, else float32/bfloat16/float16.
- `TorchStageBackend`: loads only its stage's tensors (workers/checkpoint.py; a GGUF through
  workers/gguf_file.py, kept quantized; `quantization` int8/int4 quantizes while reading), builds a
  `StageModel` (workers/stage_model.py) and a `BlockKVCache` (workers/kv_cache.py) sized from
  `kv_budget_bytes`, and runs batched steps under `torch.inference_mode()` (on CPU, small steps
  on the thread count a `ThreadTuner`, workers/thread_tuner.py, measures faster); prompts reuse the
  cache's prefix blocks (`cache_prompt`) unless `StageConfig.prefix_caching` is off.
- `to_torch(array, dtype)` / `to_numpy(tensor)`: the boundary's numpy arrays (bf16 as uint16 bits)
  and torch tensors, both ways without copies on CPU.
- `PLUGIN`: how the entry point `potluck.backends: torch` registers it (devices: cuda:N, mps, cpu).

`forward` takes and returns numpy arrays (the backend interface, workers/backend.py); given a torch
tensor it returns one on the backend's device (in-process callers: the profiler, the tests).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
import warnings
from pathlib import Path

import numpy as np
import torch

from workers.backend import KVCacheFull, SequenceChunk, StageBackend, StageConfig
from workers.backend_plugins import BackendPlugin
from workers.checkpoint import load_stage_tensors
from workers.gguf_file import is_gguf, load_gguf_stage_tensors, open_gguf
from workers.device_profile import DeviceProfile
from workers.kv_cache import BlockKVCache
from workers.model_config import ModelConfig, parse_dtype
from workers.quantization import quantizer
from workers.stage_model import BatchPlan, RopeTable, StageModel, build_batch_plan
from workers.thread_tuner import ThreadTuner


@dataclass(frozen=True)
class PreparedStep:
    """A step's KV blocks (allocated) and plan, built by `prepare` before its inputs arrived."""

    chunks: tuple[SequenceChunk, ...]
    plan: BatchPlan
    frees_seen: int  # the cache's count of `free` calls then: any free since makes it stale


# received frames are read-only; tensors made from them are only read
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
_WIRE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def to_torch(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A boundary array as a tensor sharing its memory; `dtype` bfloat16 reads uint16 bits."""
    if dtype == torch.bfloat16 and array.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a boundary array on the CPU (bfloat16: its uint16 bits)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


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
        quantization = config.quantization or "none"
        quantized = is_gguf(config.model_dir) or quantization != "none"
        if quantized:
            _large_allocations_mapped()
        if quantized and self.device.type != "cpu":
            raise ValueError(f"quantized weights (GGUF, --quantization) run on cpu only, not {self.device}")
        if is_gguf(config.model_dir):
            if quantization != "none":
                raise ValueError("--quantization applies to safetensors checkpoints; a GGUF is already quantized")
            model = open_gguf(str(Path(config.model_dir).resolve()))
            first_read = len(model.bytes_read)
            tensors = load_gguf_stage_tensors(
                model, config.start_layer, config.end_layer, mc.num_hidden_layers,
                mc.tie_word_embeddings, self.torch_dtype,
            )
            self.gguf_bytes_read = tuple(model.bytes_read[first_read:])  # (file, start, end) ranges
            return tensors
        return load_stage_tensors(
            config.model_dir,
            config.start_layer,
            config.end_layer,
            mc.num_hidden_layers,
            mc.tie_word_embeddings,
            dtype=self.torch_dtype,
            device=str(self.device),
            convert=quantizer(quantization),
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
        self.torch_dtype = resolve_dtype(config.dtype, mc)
        self.dtype = _WIRE_NAMES[self.torch_dtype]
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
            dtype=self.torch_dtype,
            device=self.device,
        )
        self._kv_layers = self.kv_cache.layers
        self._rope = RopeTable(mc.rope_inv_freq(), self.torch_dtype, self.device)
        self._frees = 0  # `free` calls so far (a prepared step made before the last one is stale)
        # CPU: decode steps' thread count, timed online (workers/thread_tuner.py); None: fixed
        self._threads = ThreadTuner(torch.get_num_threads()) if self.device.type == "cpu" and torch.get_num_threads() > 1 else None

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
        self, chunks: Sequence[SequenceChunk], inputs: np.ndarray | torch.Tensor, prepared: object | None = None
    ) -> np.ndarray | torch.Tensor:
        """See StageBackend.forward. Raises KVCacheFull (nothing changed) when short of blocks."""
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        total = sum(c.num_tokens for c in chunks)
        if inputs.shape[0] != total:
            raise ValueError(f"inputs have {inputs.shape[0]} rows, chunks have {total} tokens")
        if isinstance(inputs, np.ndarray):
            self._check_array(inputs)
            return to_numpy(self.forward(chunks, to_torch(inputs, self.torch_dtype), prepared))
        if (
            isinstance(prepared, PreparedStep)
            and prepared.frees_seen == self._frees
            and (prepared.chunks is chunks or prepared.chunks == tuple(chunks))
        ):
            plan = prepared.plan  # blocks allocated when it was prepared
        else:
            self.kv_cache.allocate(chunks)
            plan = self._plan(chunks)
        if self.is_last and any(c.all_logits for c in chunks):
            plan = dataclasses.replace(plan, last_rows=_logit_rows(chunks, self.device))
        if self.is_first:
            inputs = inputs.to(self.device, torch.int64)
        else:
            inputs = inputs.to(self.device, self.torch_dtype)
        if self._threads is None:
            with torch.inference_mode():
                return self.model(inputs, plan, self._kv_layers)
        rows = inputs.shape[0]  # small steps run on the thread count measured faster here
        threads = self._threads.threads_for(rows)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model(inputs, plan, self._kv_layers)
        self._threads.record(rows, threads, time.perf_counter() - started)
        return out

    def _check_array(self, inputs: np.ndarray) -> None:
        """ValueError for boundary inputs of the wrong kind (before anything is allocated)."""
        if self.is_first:
            if inputs.ndim != 1 or inputs.dtype.kind not in "iu":
                raise ValueError(f"a first stage takes int token ids [n], got {inputs.dtype} {inputs.shape}")
            if inputs.size and not (0 <= int(inputs.min()) and int(inputs.max()) < self.vocab_size):
                raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size})")
            return
        wanted = np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
        if inputs.ndim != 2 or inputs.shape[1] != self.hidden_size or inputs.dtype != wanted:
            raise ValueError(
                f"hidden states must be {self.dtype} [n, {self.hidden_size}], got {inputs.dtype} {inputs.shape}"
            )

    def _plan(self, chunks: Sequence[SequenceChunk]) -> BatchPlan:
        tables = self.kv_cache.block_tables
        return build_batch_plan(
            [c.start_position for c in chunks],
            [c.num_tokens for c in chunks],
            [tables[c.request_id] for c in chunks],
            self.kv_cache.block_size,
            self._rope,
        )

    def cache_prompt(
        self, request_id: str, block_hashes: Sequence[int], num_prompt_tokens: int, want_tokens: int | None = None
    ) -> int:
        """See StageBackend.cache_prompt (off: allocates the prompt, reuses nothing)."""
        if not self.config.prefix_caching:
            block_hashes, want_tokens = (), 0
        return self.kv_cache.cache_prompt(request_id, block_hashes, num_prompt_tokens, want_tokens)

    def cached_prefix_tokens(self, block_hashes: Sequence[int], num_prompt_tokens: int) -> int:
        if not self.config.prefix_caching:
            return 0
        return self.kv_cache.cached_prefix_tokens(block_hashes, num_prompt_tokens)

    def prefix_cache_counts(self) -> tuple[int, int]:
        return self.kv_cache.prefix_queries_tokens, self.kv_cache.prefix_hits_tokens

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


def _torch_devices() -> list[str]:
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def _profile(device: str, model_dir: str | None, seconds: float, slowdown: float) -> DeviceProfile:
    from workers.profiler import measure_device

    return measure_device(device, model_dir=model_dir, seconds_budget=seconds, slowdown=slowdown)


PLUGIN = BackendPlugin(
    name="torch",
    load=TorchStageBackend,
    devices=_torch_devices,
    weight_formats=frozenset({"safetensors", "gguf"}),
    quantizations=frozenset({"int8", "int4"}),  # weight-only, on CPU (workers/quantized_linear.py)
    profile=_profile,
    priority=10,
    description="PyTorch: CPU (oneDNN/MKL), CUDA, MPS",
)


def _logit_rows(chunks: Sequence[SequenceChunk], device: torch.device) -> torch.Tensor:
    """Rows whose logits the last stage returns: every row of an `all_logits` chunk, else its last."""
    rows: list[int] = []
    start = 0
    for chunk in chunks:
        end = start + chunk.num_tokens
        rows.extend(range(start, end) if chunk.all_logits else (end - 1,))
        start = end
    return torch.tensor(rows, dtype=torch.int64, device=device)
