"""The layers of one pipeline stage in MLX (Llama, Mistral, Qwen2, Qwen3), with their own KV cache.

Parts:
- `Linear`: a [out, in] weight, dense (`x @ w.T`) or quantized with `mx.quantize` (int8 / int4,
  affine, groups of 64 or 32 input columns), or a GGUF weight already quantized
  (workers/mlx_gguf.py `MLXQuantized`), and run by `mx.quantized_matmul`.
- `MLXLayer`: RMSNorm -> q/k/v (+ Qwen2 bias, + Qwen3 per-head q/k norm) -> RoPE -> attention over
  each request's cached K/V (`mx.fast.scaled_dot_product_attention`, GQA without tiling) ->
  o_proj -> residual; RMSNorm -> SwiGLU -> residual.
- `MLXStage`: `layers[start:end]` (+ embeddings first, + final norm / LM head last) and the K/V
  arrays of each request, per layer, `[kv_heads, tokens, head_dim]`; `forward(chunks, x)`.
- `rope_tables(inv_freq, positions)`: RoPE cos/sin of positions, computed as the torch backend
  computes them (float32 position x inverse frequency), so the two agree bit for bit in float32.

A batch is continuous: every linear layer runs once over all new tokens of all requests (prompt
chunks and decode tokens alike); attention runs per request, over its cached keys plus its new
ones (the "causal" mask of MLX aligns the last query with the last key).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from workers.mlx_gguf import MLXQuantized

QUANT_BITS = {"int8": 8, "int4": 4}


class Linear:
    def __init__(self, weight, bias: mx.array | None = None, quantization: str | None = None) -> None:
        self.bias = bias
        if isinstance(weight, MLXQuantized):  # a GGUF weight, kept as the file quantized it
            self.bits, self.group_size = weight.bits, weight.group_size
            self.q, self.scales, self.biases = weight.q, weight.scales, weight.biases
            self.nbytes = weight.nbytes
            return
        self.bits = QUANT_BITS[quantization] if quantization else None
        if self.bits is None:
            self.weight_t = weight.T  # [in, out]
            self.weight_t = mx.array(self.weight_t)  # own, contiguous
            self.nbytes = self.weight_t.nbytes
            return
        in_features = weight.shape[1]
        self.group_size = next((g for g in (64, 32) if in_features % g == 0), None)
        if self.group_size is None:
            raise ValueError(f"{quantization} needs input widths divisible by 32; this layer has {in_features}")
        self.q, self.scales, self.biases = mx.quantize(weight, group_size=self.group_size, bits=self.bits)
        self.nbytes = self.q.nbytes + self.scales.nbytes + self.biases.nbytes

    def __call__(self, x: mx.array) -> mx.array:
        if self.bits is None:
            y = x @ self.weight_t
        else:
            y = mx.quantized_matmul(
                x, self.q, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits
            )
        return y if self.bias is None else y + self.bias


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """cos, sin [N, 1, head_dim // 2] of `positions` in `dtype`."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return mx.array(np.cos(freqs))[:, None, :].astype(dtype), mx.array(np.sin(freqs))[:, None, :].astype(dtype)


def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


class MLXLayer:
    def __init__(self, config, weights: dict[str, mx.array], quantization: str | None) -> None:
        self.nq, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.eps = config.rms_norm_eps
        w = weights
        self.input_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        self.q = Linear(w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"), quantization)
        self.k = Linear(w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"), quantization)
        self.v = Linear(w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"), quantization)
        self.o = Linear(w["self_attn.o_proj.weight"], None, quantization)
        self.q_norm = w.get("self_attn.q_norm.weight")  # Qwen3
        self.k_norm = w.get("self_attn.k_norm.weight")
        self.gate = Linear(w["mlp.gate_proj.weight"], None, quantization)
        self.up = Linear(w["mlp.up_proj.weight"], None, quantization)
        self.down = Linear(w["mlp.down_proj.weight"], None, quantization)
        small = (self.input_norm, self.post_norm, self.q_norm, self.k_norm)
        biases = (self.q.bias, self.k.bias, self.v.bias)
        linears = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        self.nbytes = sum(a.nbytes for a in (*small, *biases) if a is not None) + sum(l.nbytes for l in linears)

    def __call__(
        self,
        hidden: mx.array,
        cos: mx.array,
        sin: mx.array,
        spans: Sequence[tuple[int, int, int]],
        caches: list[list[mx.array]],
    ) -> mx.array:
        """hidden [N, d]; spans: (row_start, num_tokens, start_position) per request; caches: the
        requests' [K, V] of this layer, each [nkv, tokens, hd], replaced by the grown ones."""
        nq, nkv, hd = self.nq, self.nkv, self.hd
        n = hidden.shape[0]
        x = _rms_norm(hidden, self.input_norm, self.eps)
        q = self.q(x).reshape(n, nq, hd)
        k = self.k(x).reshape(n, nkv, hd)
        v = self.v(x).reshape(n, nkv, hd)
        if self.q_norm is not None:
            q = _rms_norm(q, self.q_norm, self.eps)
            k = _rms_norm(k, self.k_norm, self.eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        outputs = []
        for (row, count, start), cache in zip(spans, caches):
            k_new = k[row : row + count].transpose(1, 0, 2)  # [nkv, count, hd]
            v_new = v[row : row + count].transpose(1, 0, 2)
            if start:
                old_k, old_v = cache
                have = 0 if old_k is None else old_k.shape[1]
                if have < start:  # allocated, never written (the profiler's contexts): zeros
                    pad = mx.zeros((nkv, start - have, hd), dtype=k_new.dtype)
                    old_k = pad if old_k is None else mx.concatenate([old_k, pad], axis=1)
                    old_v = pad if old_v is None else mx.concatenate([old_v, pad], axis=1)
                k_new = mx.concatenate([old_k[:, :start], k_new], axis=1)
                v_new = mx.concatenate([old_v[:, :start], v_new], axis=1)
            cache[0], cache[1] = k_new, v_new
            q_r = q[row : row + count].transpose(1, 0, 2)[None]  # [1, nq, count, hd]
            out = mx.fast.scaled_dot_product_attention(
                q_r, k_new[None], v_new[None], scale=hd**-0.5, mask="causal" if count > 1 else None
            )
            outputs.append(out[0].transpose(1, 0, 2).reshape(count, nq * hd))
        attn = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        hidden = hidden + self.o(attn)
        x = _rms_norm(hidden, self.post_norm, self.eps)
        return hidden + self.down(nn_silu(self.gate(x)) * self.up(x))


def nn_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE (the Hugging Face layout) on [N, heads, hd] with cos/sin [N, 1, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class MLXStage:
    def __init__(
        self,
        config,
        start_layer: int,
        end_layer: int,
        tensors: dict[str, mx.array],
        dtype: mx.Dtype,
        inv_freq: np.ndarray,
        quantization: str | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.inv_freq = inv_freq
        self.is_first = start_layer == 0
        self.is_last = end_layer == config.num_hidden_layers
        self.layers = []
        for index in range(start_layer, end_layer):
            prefix = f"model.layers.{index}."
            weights = {n[len(prefix) :]: tensors.pop(n) for n in [n for n in tensors if n.startswith(prefix)]}
            self.layers.append(MLXLayer(config, weights, quantization))
        embed = tensors.get("model.embed_tokens.weight")
        self.embed = embed if self.is_first else None
        self.norm = tensors.get("model.norm.weight") if self.is_last else None
        self.lm_head = None
        shared_head = False
        if self.is_last:  # dense weights: the LM head stays dense (logits compared and sampled in
            # float32); a GGUF's quantized head (or tied quantized embeddings) stays quantized
            head = tensors.get("lm_head.weight", embed)
            shared_head = head is embed and self.is_first
            self.lm_head = None if shared_head and not isinstance(embed, MLXQuantized) else Linear(head)
        held = [a for a in (self.embed, self.norm) if a is not None]
        self.weight_bytes = sum(a.nbytes for a in held) + sum(l.nbytes for l in self.layers)
        if self.lm_head is not None and not shared_head:
            self.weight_bytes += self.lm_head.nbytes
        self.kv: dict[str, list[list[mx.array]]] = {}  # request -> per layer [K, V]

    def forward(
        self, spans: Sequence[tuple[str, int, int]], inputs: mx.array, all_logits: Sequence[bool] = ()
    ) -> mx.array:
        """spans: (request_id, start_position, num_tokens) in batch order; inputs: token ids [N]
        (first stage) or hidden [N, d]. Returns hidden [N, d] or float32 logits, one row per span
        at its last token, or at every token of the spans whose `all_logits` is true."""
        positions = np.concatenate([np.arange(s, s + n) for _, s, n in spans])
        cos, sin = rope_tables(self.inv_freq, positions, self.dtype)
        if not self.is_first:
            hidden = inputs
        elif isinstance(self.embed, MLXQuantized):
            hidden = self.embed.dequantize_rows(inputs, self.dtype)
        else:
            hidden = self.embed[inputs]
        rows, row = [], 0
        for request_id, start, count in spans:
            rows.append((row, count, start))
            row += count
        caches_by_request = []
        for request_id, start, _ in spans:
            caches = self.kv.get(request_id)
            if caches is None or start == 0:
                caches = self.kv[request_id] = [[None, None] for _ in self.layers]
            caches_by_request.append(caches)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, rows, [caches[index] for caches in caches_by_request])
        if not self.is_last:
            return hidden
        every = list(all_logits) or [False] * len(rows)
        last = mx.array([i for (r, c, _), e in zip(rows, every) for i in (range(r, r + c) if e else (r + c - 1,))])
        x = _rms_norm(hidden[last], self.norm, self.config.rms_norm_eps)
        logits = x @ self.embed.T if self.lm_head is None else self.lm_head(x)
        return logits.astype(mx.float32)

    def free(self, request_id: str) -> None:
        self.kv.pop(request_id, None)
