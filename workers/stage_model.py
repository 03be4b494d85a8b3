"""The layers of one pipeline stage as a plain torch module (it knows nothing of distribution).

Parts:
- `RopeTable`: RoPE cos/sin of every position up to the longest seen so far, on the device
  (a step looks its positions up instead of computing them: 5 small ops fewer per step), laid
  out so that a layer rotates q and k in four kernels instead of seven.
- `BatchPlan` / `build_batch_plan(...)`: everything that is the same for all layers of one step,
  computed once per forward: positions, RoPE cos/sin, KV write slots, the decode group's
  padded block gather + mask, each prefill chunk's rows (+ prefix mask), the last-token rows.
- `DecoderLayer`: RMSNorm -> fused QKV (+ Qwen2 bias, + Qwen3 q/k norm) -> RoPE -> GQA attention
  over the block KV cache -> o_proj -> residual; RMSNorm -> fused gate/up SwiGLU -> down -> residual
  (MoE layers: the MoE block of workers/moe.py in place of the SwiGLU).
  Linear weights are packed for oneDNN where it measures faster on the device when the stage is
  built, else stored transposed, [in, out]; a `GemmChooser` (workers/gemm.py) shared by the
  stage's layers runs either (see `_linear_weight`). Quantized weights (GGUF, `--quantization`)
  are `QuantizedLinear`s (workers/quantized_linear.py), run by the same chooser.
- `StageModel`: `layers[start:end]` (+ `embed_tokens` on the first stage; final norm + LM head
  on the last), built from checkpoint tensors (`StageModel.from_tensors`).

Batched varlen step: the new tokens of all chunks are one `[N, hidden]` matrix, so every linear
layer runs once for the batch. Attention is per group: all 1-token chunks (decode) together against
a padded gather of their cached K/V; each multi-token chunk (prefill) with causal attention over its
cached prefix + new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.gemm import GemmChooser, onednn_is_faster, pack_weight
from workers.model_config import ModelConfig
from workers.moe import moe_block_from_weights
from workers.quantized_linear import GroupCodes, QuantizedLinear, QuantizedRows

KVLayer = tuple[torch.Tensor, torch.Tensor]  # (K pool, V pool) [num_blocks, block, kv_heads, hd]


@dataclass
class PrefillGroup:
    row_start: int  # rows [row_start, row_end) of the flat batch
    row_end: int
    blocks: torch.Tensor | None  # [num_blocks] block ids to gather prefix + new K/V (None: no prefix)
    mask: torch.Tensor | None  # [n, prefix + n] additive mask (None: plain causal)


class RopeTable:
    """Per position, cos = [cos, cos] and sin = [-sin, sin] [positions, 1, head_dim] in the compute
    dtype, grown (doubling) on demand, so that a layer rotates q and k in four kernels:
    `q * cos + roll(q, head_dim / 2) * sin` (= [x1 cos - x2 sin, x2 cos + x1 sin], the rotate-half
    form transformers computes in seven).

    Each entry is computed exactly as a step would compute it (float32 position x inv_freq, then
    cos/sin, then the dtype), so looking up changes no value.
    """

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> None:
        self.inv_freq = inv_freq.detach().to("cpu", torch.float32)
        self.dtype = dtype
        self.device = torch.device(device)
        self.cos = self.sin = torch.empty((0, 1, 2 * self.inv_freq.numel()), dtype=dtype, device=self.device)

    def _grow(self, num_positions: int) -> None:
        size = max(256, self.cos.shape[0])
        while size < num_positions:
            size *= 2
        freqs = torch.arange(size, dtype=torch.int64).to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        self.cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(self.device)
        self.sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(self.device)

    def lookup(self, starts: Sequence[int], lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [sum(lengths), 1, head_dim] for positions start..start+length of each chunk."""
        end = max(s + n for s, n in zip(starts, lengths))
        if end > self.cos.shape[0]:
            self._grow(end)
        if len(starts) == 1:  # one chunk: its positions are one slice of the table
            return self.cos[starts[0] : end], self.sin[starts[0] : end]
        if all(n == 1 for n in lengths):
            positions = torch.tensor(starts, dtype=torch.int64)
        else:
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
        positions = positions.to(self.device)
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


@dataclass
class BatchPlan:
    num_tokens: int
    cos: torch.Tensor  # [N, 1, head_dim]: [cos, cos] (RopeTable)
    sin: torch.Tensor  # [N, 1, head_dim]: [-sin, sin]
    slots: torch.Tensor  # [N] flat cache row (block * block_size + offset) of each new token
    decode_rows: torch.Tensor | None  # [B_dec] rows of 1-token chunks (None: no decode group)
    decode_all: bool  # every chunk is a 1-token chunk (rows == arange(N))
    decode_blocks: torch.Tensor | None  # [B_dec * max_blocks] padded block tables, flattened
    decode_kv_len: int  # longest decode context (keys beyond it are padding, sliced off)
    decode_mask: torch.Tensor | None  # [B_dec, 1, 1, decode_kv_len] additive (None: equal lengths)
    prefills: list[PrefillGroup]
    last_rows: torch.Tensor | None  # [num_chunks] row of each chunk's last token (None: every row)


def build_batch_plan(
    starts: Sequence[int],
    lengths: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    rope: RopeTable,
) -> BatchPlan:
    """Per-step metadata for chunks (start position, new tokens, block table), in batch order."""
    if all(n == 1 for n in lengths):
        return _decode_plan(starts, block_tables, block_size, rope)
    dtype, device = rope.dtype, rope.device
    decode_idx = [i for i, n in enumerate(lengths) if n == 1]
    slot_parts = []
    for s, n, table in zip(starts, lengths, block_tables):
        pos = torch.arange(s, s + n)
        slot_parts.append(torch.tensor(table, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
    slots = torch.cat(slot_parts)
    cos, sin = rope.lookup(starts, lengths)  # [N, 1, hd]

    row_starts = [0]
    for n in lengths:
        row_starts.append(row_starts[-1] + n)
    neg_inf = torch.finfo(dtype).min

    decode_rows = decode_blocks = decode_mask = None
    decode_kv_len = 0
    if decode_idx:
        decode_blocks, decode_kv_len, decode_mask = _decode_gather(
            [starts[i] for i in decode_idx], [block_tables[i] for i in decode_idx], block_size, dtype, device
        )
        decode_rows = torch.tensor([row_starts[i] for i in decode_idx], dtype=torch.int64, device=device)

    prefills = []
    for i, (s, n) in enumerate(zip(starts, lengths)):
        if n == 1:
            continue
        blocks = mask = None
        if s > 0:
            num_blocks = -(-(s + n) // block_size)
            blocks = torch.tensor(block_tables[i][:num_blocks], dtype=torch.int64, device=device)
            key_pos = torch.arange(num_blocks * block_size)[None, :]
            query_pos = torch.arange(s, s + n)[:, None]
            mask = torch.zeros((n, num_blocks * block_size), dtype=dtype)
            mask = mask.masked_fill_(key_pos > query_pos, neg_inf).to(device)
        prefills.append(PrefillGroup(row_starts[i], row_starts[i + 1], blocks, mask))

    return BatchPlan(
        num_tokens=row_starts[-1],
        cos=cos,
        sin=sin,
        slots=slots.to(device),
        decode_rows=decode_rows,
        decode_all=False,
        decode_blocks=decode_blocks,
        decode_kv_len=decode_kv_len,
        decode_mask=decode_mask,
        prefills=prefills,
        last_rows=torch.tensor([r - 1 for r in row_starts[1:]], dtype=torch.int64, device=device),
    )


def _decode_plan(
    starts: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int, rope: RopeTable
) -> BatchPlan:
    """The plan of a step in which every chunk is one token (decode): the path of every step of a
    running request, kept to a few tensor constructions (it is on the critical path of each hop)."""
    device = rope.device
    slots = [table[s // block_size] * block_size + s % block_size for s, table in zip(starts, block_tables)]
    cos, sin = rope.lookup(starts, [1] * len(starts))  # [N, 1, hd]
    blocks, kv_len, mask = _decode_gather(starts, block_tables, block_size, rope.dtype, device)
    return BatchPlan(
        num_tokens=len(starts),
        cos=cos,
        sin=sin,
        slots=torch.tensor(slots, dtype=torch.int64, device=device),
        decode_rows=None,  # every row is a decode row: layers take the batch as it is
        decode_all=True,
        decode_blocks=blocks,
        decode_kv_len=kv_len,
        decode_mask=mask,
        prefills=[],
        last_rows=None,  # every row is its chunk's last token
    )


def _decode_gather(
    starts: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """For decode rows at `starts`: their block tables padded to one length and flattened
    [B * max_blocks], the longest context (new token included), and the additive mask of each
    row's padding [B, 1, 1, kv_len] (None where every context has that length)."""
    lens = [s + 1 for s in starts]
    kv_len = max(lens)
    max_blocks = -(-kv_len // block_size)
    flat: list[int] = []
    for table in block_tables:
        row = table[:max_blocks]
        flat.extend(row)
        if len(row) < max_blocks:
            flat.extend([0] * (max_blocks - len(row)))
    blocks = torch.tensor(flat, dtype=torch.int64, device=device)
    mask = None
    if min(lens) != kv_len:  # unequal contexts: mask each row's padding
        visible = torch.arange(kv_len)[None, :] < torch.tensor(lens)[:, None]
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
        mask = mask[:, None, None, :].to(device)
    return blocks, kv_len, mask


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, scaled in x's dtype.

    weight: [d], or [..., d] broadcast against x (Qwen3's per-head q/k norm weights).
    """
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype) * weight


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


def _param_t(weight: torch.Tensor) -> nn.Parameter:
    """A [out, in] linear weight stored transposed, [in, out], for `x @ w_t`.

    On CPU, MKL's x @ W (row-major [in, out]) streams the weight ~25% faster than F.linear's
    x @ W^T at one token per step (memory-bound GEMV); for batches, the same memory read as
    (W^T @ x^T)^T is often faster on several threads (GemmChooser measures which).
    """
    return nn.Parameter(weight.t().contiguous(), requires_grad=False)


def _linear_weight(weight: torch.Tensor, packed: bool) -> torch.Tensor:
    """A [out, in] weight packed for oneDNN (a plain attribute: mkldnn tensors are opaque), or
    stored transposed as a parameter; GemmChooser runs either."""
    return pack_weight(weight) if packed else _param_t(weight)


def _fused_linear(parts: list[torch.Tensor | GroupCodes | QuantizedRows], packed: bool) -> torch.Tensor | QuantizedLinear:
    """Weights stacked along the output dimension as one linear weight: a `QuantizedLinear` when
    any part is quantized (GGUF, `--quantization`), else as `_linear_weight`."""
    if any(isinstance(p, (GroupCodes, QuantizedRows)) for p in parts):
        return QuantizedLinear(parts)
    return _linear_weight(parts[0] if len(parts) == 1 else torch.cat(parts), packed)


def _weight_bytes(weight: object) -> int:
    if isinstance(weight, (QuantizedLinear, QuantizedRows)):
        return weight.weight_bytes
    if isinstance(weight, torch.Tensor) and weight.is_mkldnn:
        return weight.numel() * weight.element_size()
    return 0  # parameters are counted by StageModel.parameters()


LINEAR_WEIGHTS = ("w_qkv", "w_o", "w_gate_up", "w_down")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], packed: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        w = weights
        self.input_norm = _param(w["input_layernorm.weight"])
        self.post_attention_norm = _param(w["post_attention_layernorm.weight"])
        proj = ("q_proj", "k_proj", "v_proj")
        self.w_qkv = _fused_linear([w[f"self_attn.{p}.weight"] for p in proj], packed)
        has_bias = "self_attn.q_proj.bias" in w
        self.b_qkv = _param(torch.cat([w[f"self_attn.{p}.bias"] for p in proj])) if has_bias else None
        self.w_o = _fused_linear([w["self_attn.o_proj.weight"]], packed)
        self.qk_norm = None
        if config.qk_norm:  # one [q_heads + kv_heads, head_dim] weight: q_norm rows, then k_norm rows
            q_norm = w["self_attn.q_norm.weight"].expand(self.num_heads, -1)
            k_norm = w["self_attn.k_norm.weight"].expand(self.num_kv_heads, -1)
            self.qk_norm = _param(torch.cat([q_norm, k_norm]))
        self.moe = moe_block_from_weights(config, w)  # None: a dense layer (workers/moe.py)
        self.w_gate_up = self.w_down = None
        if self.moe is None:
            self.w_gate_up = _fused_linear([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]], packed)
            self.w_down = _fused_linear([w["mlp.down_proj.weight"]], packed)
        self.gemm = GemmChooser()  # StageModel gives all its layers one chooser

    def forward(self, hidden: torch.Tensor, plan: BatchPlan, kv: KVLayer) -> torch.Tensor:
        # hidden: [N, hidden_size]
        nq, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, self.input_norm, self.eps)
        qkv = self.gemm(x, self.w_qkv, self.b_qkv).view(num_tokens, nq + 2 * nkv, hd)
        qk = qkv[:, : nq + nkv]  # [N, nq + nkv, hd]
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        # RoPE: roll by half = [x2, x1]; with sin = [-sin, sin] (RopeTable) this is rotate-half.
        # Two rounded products and an add, as transformers rounds them (a fused addcmul rounds
        # once less, which moves bf16 logits past the conformance suite's tolerance)
        qk = qk * plan.cos + qk.roll(hd // 2, dims=-1) * plan.sin
        q = qk[:, :nq]  # [N, nq, hd]
        k = qk[:, nq:]  # [N, nkv, hd]
        v = qkv[:, nq + nkv :]  # [N, nkv, hd]

        k_pool, v_pool = kv  # [num_blocks, block, nkv, hd]
        block = k_pool.shape[1]
        k_pool.view(-1, nkv, hd).index_copy_(0, plan.slots, k)
        v_pool.view(-1, nkv, hd).index_copy_(0, plan.slots, v)

        if plan.decode_all:
            attn = self._decode_attention(q, plan, k_pool, v_pool, block)  # [N, nq * hd]
        else:
            attn = hidden.new_empty((num_tokens, nq * hd))
            if plan.decode_rows is not None:
                q_dec = q.index_select(0, plan.decode_rows)
                attn[plan.decode_rows] = self._decode_attention(q_dec, plan, k_pool, v_pool, block)
            for group in plan.prefills:
                rows = slice(group.row_start, group.row_end)
                n = group.row_end - group.row_start
                q_p = q[rows].transpose(0, 1).unsqueeze(0)  # [1, nq, n, hd]
                if group.blocks is None:  # no cached prefix: the new tokens are all the keys
                    k_p = k[rows].transpose(0, 1).unsqueeze(0)  # [1, nkv, n, hd]
                    v_p = v[rows].transpose(0, 1).unsqueeze(0)
                    out = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True, enable_gqa=True)
                else:
                    k_p = k_pool.index_select(0, group.blocks).view(1, -1, nkv, hd).transpose(1, 2)
                    v_p = v_pool.index_select(0, group.blocks).view(1, -1, nkv, hd).transpose(1, 2)
                    # k_p, v_p: [1, nkv, L, hd]
                    out = F.scaled_dot_product_attention(
                        q_p, k_p, v_p, attn_mask=group.mask, enable_gqa=True
                    )
                attn[rows] = out[0].transpose(0, 1).reshape(n, nq * hd)  # [n, nq * hd]

        hidden = hidden + self.gemm(attn, self.w_o)
        x = rms_norm(hidden, self.post_attention_norm, self.eps)
        if self.moe is not None:
            return hidden + self.moe(x)
        gate_up = self.gemm(x, self.w_gate_up)  # [N, 2 * intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        return hidden + self.gemm(F.silu(gate) * up, self.w_down)

    def _decode_attention(
        self, q: torch.Tensor, plan: BatchPlan, k_pool: torch.Tensor, v_pool: torch.Tensor, block: int
    ) -> torch.Tensor:
        # q: [B, nq, hd] -> [B, nkv, group, hd]: the query heads sharing a KV head act as its queries
        nq, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        batch = q.shape[0]
        q = q.reshape(batch, nkv, nq // nkv, hd)
        # index_select on flat block ids: one memcpy per block (3x faster than advanced indexing)
        length = plan.decode_kv_len
        keys = k_pool.index_select(0, plan.decode_blocks).view(batch, -1, nkv, hd)[:, :length]
        values = v_pool.index_select(0, plan.decode_blocks).view(batch, -1, nkv, hd)[:, :length]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, nkv, L, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.decode_mask)
        return out.reshape(batch, nq * hd)  # [B, nq * hd]


class StageModel(nn.Module):
    """Layers [start_layer, end_layer) (+ embeddings first, + final norm / LM head last)."""

    def __init__(
        self,
        config: ModelConfig,
        start_layer: int,
        end_layer: int,
        layers: list[DecoderLayer],
        embed: torch.Tensor | None,
        final_norm: torch.Tensor | None,
        lm_head: torch.Tensor | None,
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.start_layer, self.end_layer = start_layer, end_layer
        self.layers = nn.ModuleList(layers)
        self.gemm = GemmChooser()  # layers of one shape share one measured choice of GEMM form
        for layer in layers:
            layer.gemm = self.gemm
        # a quantized GGUF embedding table stays as its file bytes (QuantizedRows)
        self.embed_tokens = _param(embed) if isinstance(embed, torch.Tensor) else embed
        self.norm = _param(final_norm) if final_norm is not None else None
        # LM head: [hidden, vocab] (transposed, or packed for oneDNN) unless tied with the
        # embeddings held here too, where one [vocab, hidden] tensor serves both; quantized
        # (a QuantizedLinear) when the file's table is.
        self.lm_head_t = self.lm_head = None
        if isinstance(lm_head, (QuantizedRows, GroupCodes)):  # a tied GGUF table shares its bytes
            self.lm_head_t = QuantizedLinear(lm_head)
        elif lm_head is not None and embed is not None and lm_head.data_ptr() == embed.data_ptr():
            self.lm_head = self.embed_tokens
        elif lm_head is not None:
            self.lm_head_t = _linear_weight(lm_head, packed)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights held (a tied LM head counted once; packed ones at their size)."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())  # shared ones once
        held = [getattr(layer, name) for layer in self.layers for name in LINEAR_WEIGHTS]
        held += [self.lm_head_t]
        if not (isinstance(self.lm_head_t, QuantizedLinear) and self.lm_head_t.holds(self.embed_tokens)):
            held.append(self.embed_tokens)
        held += [w for layer in self.layers if layer.moe is not None for w in layer.moe.quantized_linears]
        return total + sum(_weight_bytes(t) for t in held)

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None or self.lm_head_t is not None

    @classmethod
    def from_tensors(
        cls, config: ModelConfig, start_layer: int, end_layer: int, tensors: dict[str, torch.Tensor]
    ) -> StageModel:
        """Build from checkpoint-named tensors (as returned by checkpoint.load_stage_tensors).

        Consumes `tensors`: each layer's entries are removed as the layer is built, so the
        original tensors are freed while the layer's own (fused, packed or transposed) copies are made and
        peak memory stays near one stage plus one layer."""
        # one layout for all linear weights: oneDNN-packed where it measures faster here
        sample = tensors.get(f"model.layers.{start_layer}.mlp.gate_proj.weight")
        if sample is None:  # an MoE layer (experts are stored for plain GEMMs): time attention's
            sample = tensors.get(f"model.layers.{start_layer}.self_attn.o_proj.weight")
        packed = isinstance(sample, torch.Tensor) and onednn_is_faster(sample)
        layers = []
        for index in range(start_layer, end_layer):
            prefix = f"model.layers.{index}."
            names = [n for n in tensors if n.startswith(prefix)]
            weights = {n[len(prefix) :]: tensors.pop(n) for n in names}
            layers.append(DecoderLayer(config, weights, packed))
            del weights
        last = end_layer == config.num_hidden_layers
        embed = tensors.get("model.embed_tokens.weight")
        lm_head = tensors.get("lm_head.weight", embed) if last else None
        return cls(
            config,
            start_layer,
            end_layer,
            layers,
            embed if start_layer == 0 else None,
            tensors.get("model.norm.weight") if last else None,
            lm_head,
            packed,
        )

    def forward(self, inputs: torch.Tensor, plan: BatchPlan, kv_layers: Sequence[KVLayer]) -> torch.Tensor:
        """inputs: token ids [N] (first stage) or hidden [N, hidden_size].

        Returns hidden [N, hidden_size], or on the last stage float32 logits [num_chunks, vocab]
        at each chunk's last token.
        """
        if isinstance(self.embed_tokens, QuantizedRows):
            hidden = self.embed_tokens.lookup(inputs, self.layers[0].input_norm.dtype)  # [N, hidden]
        elif self.embed_tokens is not None:
            hidden = F.embedding(inputs, self.embed_tokens)  # [N, hidden_size]
        else:
            hidden = inputs
        for layer, kv in zip(self.layers, kv_layers):
            hidden = layer(hidden, plan, kv)
        if not self.is_last:
            return hidden
        last = hidden if plan.last_rows is None else hidden.index_select(0, plan.last_rows)  # [num_chunks, hidden_size]
        last = rms_norm(last, self.norm, self.config.rms_norm_eps)
        if self.lm_head_t is not None:
            return self.gemm(last, self.lm_head_t).float()  # [num_chunks, vocab]
        return F.linear(last, self.lm_head).float()
