"""A numpy reference backend for potluck: an example of a backend package (no torch).

Parts:
- `read_config(model_dir)`: the fields of a Llama / Mistral / Qwen2 / Qwen3 `config.json` it uses.
- `read_tensors(model_dir, names)`: tensors straight from safetensors bytes (F32, F16, BF16 via
  its bits), as float32 arrays.
- `NumpyStage`: a `StageBackend` (potluck's workers/backend.py): its layers in float32 numpy,
  per-request K/V arrays, KV blocks accounted by potluck's `KVBlockLedger`.
- `PLUGIN`: the `BackendPlugin` its entry point `potluck.backends: numpy` names; `profile` measures
  numpy's matmul rate, a copy's bandwidth and one layer's decode steps.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workers.backend import SequenceChunk, StageBackend, StageConfig
from workers.backend_plugins import BackendPlugin
from workers.host_arrays import bf16_bits_to_float32, float32_to_bf16_bits
from workers.kv_ledger import KVBlockLedger

FAMILIES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_config(model_dir: str | Path) -> dict:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"numpy backend: model_type {family!r} is not supported ({', '.join(FAMILIES)})")
    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear"):
        raise ValueError(f"numpy backend: rope scaling {kind!r} is not supported (default, linear)")
    heads = raw["num_attention_heads"]
    qkv_bias, qk_norm = FAMILIES[family]
    return {
        "layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "vocab": raw["vocab_size"],
        "heads": heads, "kv_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads, "eps": raw.get("rms_norm_eps", 1e-6),
        "theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        "rope_factor": float(rope.get("factor", 1.0)) if kind == "linear" else 1.0,
        "tied": bool(raw.get("tie_word_embeddings", False)), "qk_norm": qk_norm,
        "dtype": str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        "qkv_bias": qkv_bias or bool(raw.get("attention_bias")),
    }  # fmt: skip


def _files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return {n: model_dir / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"numpy backend reads safetensors; no model.safetensors in {model_dir}")
    return {n: single for n in _header(single) if n != "__metadata__"}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def read_tensors(model_dir: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    files, out = _files(model_dir), {}
    for path in sorted({files[n] for n in names}):
        header = _header(path)
        base = 8 + struct.unpack("<Q", path.open("rb").read(8))[0]
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name in (n for n in names if files[n] == path):
            meta = header[name]
            begin, end = meta["data_offsets"]
            raw = np.frombuffer(data[base + begin : base + end], dtype=_SAFETENSORS_DTYPES[meta["dtype"]])
            values = bf16_bits_to_float32(raw) if meta["dtype"] == "BF16" else raw.astype(np.float32)
            out[name] = values.reshape(meta["shape"]).copy()
    return out


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class NumpyStage(StageBackend):
    def __init__(self, config: StageConfig) -> None:
        if config.quantization:
            raise ValueError(f"numpy backend: quantization {config.quantization!r} is not supported")
        if Path(config.model_dir).suffix == ".gguf":
            raise ValueError("numpy backend reads safetensors checkpoints; GGUF is not supported")
        c = self.c = read_config(config.model_dir)
        if not 0 <= config.start_layer < config.end_layer <= c["layers"]:
            raise ValueError(f"layer range [{config.start_layer}, {config.end_layer}) outside {c['layers']} layers")
        self.config, self.num_layers, self.hidden_size, self.vocab_size = config, c["layers"], c["hidden"], c["vocab"]
        self.dtype = c["dtype"] if config.dtype == "auto" else config.dtype
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"numpy backend: unsupported dtype {self.dtype!r}")
        model_dir = Path(config.model_dir)
        all_names = set(_files(model_dir))
        layers = range(config.start_layer, config.end_layer)
        names = [n for n in all_names if n.startswith("model.layers.") and int(n.split(".")[2]) in layers]
        head_from_embed = self.is_last and (c["tied"] or "lm_head.weight" not in all_names)
        if self.is_first or head_from_embed:
            names.append("model.embed_tokens.weight")
        if self.is_last:
            names += ["model.norm.weight"] + ([] if head_from_embed else ["lm_head.weight"])
        self.w = read_tensors(model_dir, names)
        self._loaded = frozenset(self.w)
        self.head = self.w.get("lm_head.weight", self.w.get("model.embed_tokens.weight"))
        half = np.arange(0, c["head_dim"], 2, dtype=np.int64).astype(np.float32) / c["head_dim"]
        self.inv_freq = (1.0 / (c["theta"] ** half) / c["rope_factor"]).astype(np.float32)
        itemsize = 4 if self.dtype == "float32" else 2
        per_token = 2 * len(layers) * c["kv_heads"] * c["head_dim"] * itemsize
        self.ledger = KVBlockLedger(config.kv_budget_bytes, per_token, config.kv_block_size_tokens)
        self.kv: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def forward(self, chunks: Sequence[SequenceChunk], inputs: np.ndarray, prepared: object | None = None) -> np.ndarray:
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        total = sum(c.num_tokens for c in chunks)
        if inputs.shape[:1] != (total,):
            raise ValueError(f"inputs have {inputs.shape[:1]} rows, chunks have {total} tokens")
        if self.is_first:
            if inputs.ndim != 1 or inputs.dtype.kind not in "iu" or inputs.min() < 0 or inputs.max() >= self.vocab_size:
                raise ValueError(f"a first stage takes token ids in [0, {self.vocab_size}), got {inputs.dtype} {inputs.shape}")
            x = self.w["model.embed_tokens.weight"][inputs]
        else:
            wanted = np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
            if inputs.ndim != 2 or inputs.shape[1] != self.hidden_size or inputs.dtype != wanted:
                raise ValueError(f"hidden states must be {self.dtype} [n, {self.hidden_size}], got {inputs.dtype} {inputs.shape}")
            x = bf16_bits_to_float32(inputs) if self.dtype == "bfloat16" else inputs.astype(np.float32)
        self.ledger.allocate(chunks)
        positions = np.concatenate([np.arange(c.start_position, c.start_position + c.num_tokens) for c in chunks])
        angles = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        for layer in range(self.config.start_layer, self.config.end_layer):
            x = self._layer(layer, x, chunks, cos, sin)
        if self.is_last:
            rows = np.cumsum([c.num_tokens for c in chunks]) - 1
            last = _rms(x[rows], self.w["model.norm.weight"], self.c["eps"])
            return (last @ self.head.T).astype(np.float32)
        if self.dtype == "bfloat16":
            return float32_to_bf16_bits(x)
        return x.astype(self.dtype)

    def _layer(self, index: int, x: np.ndarray, chunks: Sequence[SequenceChunk], cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c, w, p = self.c, self.w, f"model.layers.{index}."
        nq, nkv, hd, n = c["heads"], c["kv_heads"], c["head_dim"], x.shape[0]
        h = _rms(x, w[p + "input_layernorm.weight"], c["eps"])
        q, k, v = (h @ w[f"{p}self_attn.{name}_proj.weight"].T + w.get(f"{p}self_attn.{name}_proj.bias", 0) for name in "qkv")
        q, k, v = q.reshape(n, nq, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)
        if c["qk_norm"]:
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], c["eps"]), _rms(k, w[p + "self_attn.k_norm.weight"], c["eps"])
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out, row = np.empty((n, nq * hd), np.float32), 0
        for chunk in chunks:
            rows = slice(row, row + chunk.num_tokens)
            row += chunk.num_tokens
            cached = self.kv.setdefault(chunk.request_id, {}).get(index)
            start = chunk.start_position
            old_k = np.zeros((nkv, 0, hd), np.float32) if cached is None else cached[0][:, :start]
            old_v = np.zeros((nkv, 0, hd), np.float32) if cached is None else cached[1][:, :start]
            if old_k.shape[1] < start:  # allocated, never written: zeros
                pad = np.zeros((nkv, start - old_k.shape[1], hd), np.float32)
                old_k, old_v = np.concatenate([old_k, pad], 1), np.concatenate([old_v, pad], 1)
            keys = np.concatenate([old_k, k[rows].transpose(1, 0, 2)], 1)  # [nkv, L, hd]
            values = np.concatenate([old_v, v[rows].transpose(1, 0, 2)], 1)
            self.kv[chunk.request_id][index] = (keys, values)
            length, count = keys.shape[1], chunk.num_tokens
            qg = q[rows].transpose(1, 0, 2).reshape(nkv, nq // nkv, count, hd)
            scores = qg @ keys[:, None].transpose(0, 1, 3, 2) / np.sqrt(hd)  # [nkv, g, count, L]
            visible = np.arange(length)[None, :] <= (np.arange(count) + length - count)[:, None]
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[rows] = (probs @ values[:, None]).reshape(nq, count, hd).transpose(1, 0, 2).reshape(count, nq * hd)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], c["eps"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        return x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T

    def prepare(self, chunks: Sequence[SequenceChunk]) -> object | None:
        if not chunks or not self.ledger.can_allocate(chunks):
            return None
        self.ledger.allocate(chunks)
        return tuple(chunks)

    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.ledger.can_allocate(chunks)

    def free(self, request_id: str) -> None:
        self.ledger.free(request_id)
        self.kv.pop(request_id, None)

    def kv_free_tokens(self) -> int:
        return self.ledger.free_tokens()

    def kv_capacity_tokens(self) -> int:
        return self.ledger.capacity_tokens()

    @property
    def weight_bytes(self) -> int:
        return sum(a.nbytes for a in self.w.values())

    @property
    def loaded_tensor_names(self) -> frozenset[str]:
        return self._loaded


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _median_s(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return sorted(times)[repeats // 2]


def profile(device: str, model_dir: str | None, seconds: float, slowdown: float) -> dict:
    """A potluck worker profile (the fields placement reads), measured with numpy."""
    begin = time.perf_counter()
    a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
    flops = 2 * 256**3 / (_median_s(lambda: a @ a) * slowdown)
    src = np.ones(4 * 2**20, np.float32)
    bandwidth = 2 * src.nbytes / (_median_s(lambda: src.copy()) * slowdown)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 2**30
    timings = None
    if model_dir is not None:
        layer = 1 if read_config(model_dir)["layers"] > 2 else 0
        stage = NumpyStage(StageConfig(str(model_dir), layer, layer + 1, "auto", device, kv_budget_bytes=2**26))
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((4, stage.hidden_size), dtype=np.float32)
        if stage.dtype == "bfloat16":
            hidden = float32_to_bf16_bits(hidden)
        inputs = (lambda n: np.arange(n, dtype=np.int64) % stage.vocab_size) if stage.is_first else (lambda n: hidden[:n].astype(hidden.dtype))
        decode = []
        for context in (64,):
            ids = [f"d{i}" for i in range(4)]
            stage.prepare([SequenceChunk(r, 0, context) for r in ids])
            for batch in (1, 4):
                chunks = [SequenceChunk(r, context, 1) for r in ids[:batch]]
                decode.append((batch, context, _median_s(lambda: stage.forward(chunks, inputs(batch))) * slowdown))
        timings = {"model": Path(model_dir).name, "layer_index": layer, "layer_weight_bytes": stage.weight_bytes,
                   "dtype": stage.dtype, "decode_step_s": decode, "prefill_s_per_token": []}
    return {"device": device, "kind": "cpu", "name": "numpy: cpu", "memory_bytes": int(memory),
            "matmul_flops_per_s": flops, "matmul_dtype": "float32", "memory_bandwidth_bytes_per_s": bandwidth,
            "measured_at_unix_s": time.time(), "profile_time_s": time.perf_counter() - begin, "slowdown": slowdown,
            "layer_timings": timings, "peer_rtt_s": {}, "peer_bandwidth_bytes_per_s": {}, "prior": None, "backend": "numpy"}


PLUGIN = BackendPlugin(
    name="numpy",
    load=NumpyStage,
    devices=lambda: ["cpu"],
    weight_formats=frozenset({"safetensors"}),
    profile=profile,
    priority=-10,  # never the automatic choice: a reference, not fast
    description="numpy reference backend (example plugin)",
)
