"""The MLX implementation of `StageBackend`: Metal on Apple silicon, the CPU elsewhere (`mlx[cpu]`).

Parts:
- `MLXStageBackend`: reads only its stage's tensors from the safetensors files (`mx.load`, lazy)
  or a GGUF's byte ranges,
  builds an `MLXStage` (workers/mlx_layers.py) in the run dtype, quantizes its linear weights
  when `StageConfig.quantization` is int8 / int4 (`mx.quantize`), and accounts KV blocks with a
  `KVBlockLedger` sized from `kv_budget_bytes`. Takes and returns numpy arrays
  (bfloat16 as uint16 bits); every step is evaluated (`mx.eval`) before it returns.
- `mlx_devices()`: "gpu" where Metal is available, and "cpu".
- `mlx_profile(...)`: the worker's profile, measured with MLX: matmul FLOP/s, copy bandwidth, the
  device's memory (unified memory on a Mac), and one layer of the model timed through this backend
  (workers/profiler.py `measure_layer_timings`).
- `PLUGIN`: the entry point `potluck.backends: mlx`.

Weight formats: safetensors (float, or quantized at load with `quantization` int8 / int4) and
GGUF (workers/mlx_gguf.py: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K kept quantized as MLX affine
4/5/8-bit groups of 32, Q6_K dequantized at load, F32/F16/BF16 dense); a stage reads only its own
tensors' byte ranges (`gguf_bytes_read`). Dense families only: an MoE model is refused at load.
The last stage returns logits at every token of a chunk whose `all_logits` is set (prompt logprobs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from workers.backend import SequenceChunk, StageBackend, StageConfig
from workers.backend_plugins import BackendPlugin
from workers.device_profile import DeviceProfile
from workers.kv_ledger import KVBlockLedger

_WIRE_TO_MX = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _mx():
    import mlx.core as mx

    return mx


class MLXStageBackend(StageBackend):
    def __init__(self, config: StageConfig) -> None:
        mx = _mx()
        from workers.model_config import ModelConfig
        from workers.mlx_gguf import load_gguf_stage
        from workers.mlx_layers import MLXStage

        self.config = config
        gguf_file = str(config.model_dir).endswith(".gguf")
        quantization = getattr(config, "quantization", None) or None
        if quantization not in (None, "none", "int8", "int4"):
            raise ValueError(f"quantization {quantization!r} is not supported by mlx (int8, int4)")
        quantization = None if quantization == "none" else quantization
        if gguf_file and quantization:
            raise ValueError("--quantization applies to safetensors checkpoints; a GGUF is already quantized")
        mc = self.model_config = ModelConfig.from_path(config.model_dir)
        if mc.is_moe:
            raise ValueError(f"the mlx backend runs dense models; {mc.model_type} has MoE layers (use torch)")
        if not 0 <= config.start_layer < config.end_layer <= mc.num_hidden_layers:
            raise ValueError(
                f"layer range [{config.start_layer}, {config.end_layer}) outside the model's "
                f"{mc.num_hidden_layers} layers"
            )
        self.num_layers, self.hidden_size, self.vocab_size = mc.num_hidden_layers, mc.hidden_size, mc.vocab_size
        self.dtype = mc.torch_dtype if config.dtype == "auto" else str(config.dtype)
        if self.dtype not in _WIRE_TO_MX:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use float32, bfloat16 or float16")
        self._mx_dtype = getattr(mx, _WIRE_TO_MX[self.dtype])
        device = mx.gpu if config.device == "gpu" else mx.cpu
        if config.device not in mlx_devices():
            raise ValueError(f"mlx sees no device {config.device!r} here (devices: {', '.join(mlx_devices())})")
        mx.set_default_device(device)

        self.gguf_bytes_read: tuple[tuple[str, int, int], ...] = ()
        if gguf_file:
            tensors, self.gguf_bytes_read = load_gguf_stage(
                config.model_dir, config.start_layer, config.end_layer, mc.num_hidden_layers,
                mc.tie_word_embeddings, self._mx_dtype,
            )  # fmt: skip
        else:
            tensors = self._read_safetensors(config, mc)
        self._loaded_names = frozenset(tensors)
        inv_freq = mc.rope_inv_freq().numpy()
        self.stage = MLXStage(
            mc, config.start_layer, config.end_layer, tensors, self._mx_dtype, inv_freq, quantization
        )
        del tensors
        itemsize = 4 if self.dtype == "float32" else 2
        per_token = 2 * (config.end_layer - config.start_layer) * mc.num_key_value_heads * mc.head_dim * itemsize
        self.ledger = KVBlockLedger(config.kv_budget_bytes, per_token, config.kv_block_size_tokens)

    def _read_safetensors(self, config: StageConfig, mc) -> dict[str, object]:
        mx = _mx()
        from workers.checkpoint import checkpoint_files, stage_tensor_names

        files = checkpoint_files(config.model_dir)
        names = stage_tensor_names(
            set(files), config.start_layer, config.end_layer, mc.num_hidden_layers, mc.tie_word_embeddings
        )
        tensors: dict[str, object] = {}
        for path in sorted({files[n] for n in names}):
            # mx.load reads safetensors natively (bf16 too; safetensors' "mlx" path goes through
            # numpy, which has no bf16); arrays are lazy: the ones not kept are never read
            arrays = mx.load(str(path))
            for name in (n for n in names if files[n] == path):
                tensors[name] = arrays[name].astype(self._mx_dtype)
            mx.eval(list(tensors.values()))
            del arrays
        return tensors

    # ------------------------------------------------------------------ the step
    def prepare(self, chunks: Sequence[SequenceChunk]) -> object | None:
        """Allocates the chunks' KV blocks (a later forward finds them allocated)."""
        if not chunks or not self.ledger.can_allocate(chunks):
            return None
        self.ledger.allocate(chunks)
        return tuple(chunks)

    def forward(self, chunks: Sequence[SequenceChunk], inputs: np.ndarray, prepared: object | None = None) -> np.ndarray:
        mx = _mx()
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        total = sum(c.num_tokens for c in chunks)
        inputs = np.asarray(inputs)
        if inputs.shape[:1] != (total,):
            raise ValueError(f"inputs have {inputs.shape[:1]} rows, chunks have {total} tokens")
        if self.is_first:
            if inputs.ndim != 1 or inputs.dtype.kind not in "iu":
                raise ValueError(f"a first stage takes int token ids [n], got {inputs.dtype} {inputs.shape}")
            if not (0 <= int(inputs.min()) and int(inputs.max()) < self.vocab_size):
                raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size})")
            x = mx.array(inputs.astype(np.int32))
        else:
            wanted = np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
            if inputs.ndim != 2 or inputs.shape[1] != self.hidden_size or inputs.dtype != wanted:
                raise ValueError(
                    f"hidden states must be {self.dtype} [n, {self.hidden_size}], got {inputs.dtype} {inputs.shape}"
                )
            x = mx.array(inputs)
            if self.dtype == "bfloat16":
                x = x.view(mx.bfloat16)
        self.ledger.allocate(chunks)  # KVCacheFull / ValueError change nothing; idempotent after prepare
        spans = [(c.request_id, c.start_position, c.num_tokens) for c in chunks]
        out = self.stage.forward(spans, x, [c.all_logits for c in chunks] if self.is_last else ())
        if out.dtype == mx.bfloat16:
            out = out.view(mx.uint16)
        mx.eval(out)
        return np.array(out, copy=False)

    # ------------------------------------------------------------------ KV
    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.ledger.can_allocate(chunks)

    def free(self, request_id: str) -> None:
        self.ledger.free(request_id)
        self.stage.free(request_id)

    def kv_free_tokens(self) -> int:
        return self.ledger.free_tokens()

    def kv_capacity_tokens(self) -> int:
        return self.ledger.capacity_tokens()

    @property
    def weight_bytes(self) -> int:
        return self.stage.weight_bytes

    @property
    def loaded_tensor_names(self) -> frozenset[str]:
        return self._loaded_names


def mlx_devices() -> list[str]:
    try:
        mx = _mx()
    except ImportError:
        return []
    gpu = False
    try:
        gpu = mx.metal.is_available()
    except Exception:
        gpu = False
    return ["gpu", "cpu"] if gpu else ["cpu"]


def _timed_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def mlx_profile(device: str, model_dir: str | None, seconds: float, slowdown: float) -> DeviceProfile:
    """The profile of an MLX worker (see workers/profiler.py `DeviceProfile`)."""
    mx = _mx()
    from workers.device_memory import chip_prior, device_name, usable_memory_bytes
    from workers.profiler import measure_layer_timings

    begin = time.perf_counter()
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    n = 512 if device == "cpu" else 2048
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    matmul_s = _timed_s(lambda: mx.eval(a @ b), 5) * slowdown
    src = mx.random.normal((8 * 2**20,))  # 32 MiB
    copy_s = _timed_s(lambda: mx.eval(src + 0), 5) * slowdown
    timings = None
    if model_dir is not None:
        timings = measure_layer_timings(model_dir, device, slowdown=slowdown, budget_s=seconds * 0.6, backend_name="mlx")
    memory = usable_memory_bytes("mps" if device == "gpu" else "cpu")
    name = device_name("mps" if device == "gpu" else "cpu")
    return DeviceProfile(
        device=device, kind="mps" if device == "gpu" else "cpu", name=f"mlx {name}", memory_bytes=int(memory),
        matmul_flops_per_s=2 * n**3 / matmul_s, matmul_dtype="float32",
        memory_bandwidth_bytes_per_s=2 * src.nbytes / copy_s, measured_at_unix_s=time.time(),
        profile_time_s=time.perf_counter() - begin, slowdown=slowdown, layer_timings=timings,
        peer_rtt_s={}, peer_bandwidth_bytes_per_s={}, prior=chip_prior(name), backend="mlx",
    )  # fmt: skip


PLUGIN = BackendPlugin(
    name="mlx",
    load=MLXStageBackend,
    devices=mlx_devices,
    weight_formats=frozenset({"safetensors", "gguf"}),
    quantizations=frozenset({"int8", "int4"}),
    profile=mlx_profile,
    priority=20 if "gpu" in mlx_devices() else 0,  # auto: MLX on a Mac's Metal, else torch
    description="Apple MLX: Metal on Apple silicon, CPU elsewhere (mlx[cpu])",
)
