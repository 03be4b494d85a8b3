"""Mixture-of-experts MLP blocks: a router picks k experts per token, experts run grouped.

Parts:
- `MOE_ROUTER_NAMES`: the checkpoint names (relative to a layer) of a router, by layout.
- `MoeBlock`: router (top-k, each family's normalisation) + routed SwiGLU experts (+ Qwen2-MoE's
  sigmoid-gated shared expert). `forward(x)` takes the post-attention-norm hidden [N, hidden].
- `moe_block_from_weights(config, weights)`: a layer's MoE block from its checkpoint-named
  tensors (names relative to the layer), or None where the layer is dense. Consumes the tensors
  it uses (popped from `weights`), so a layer's experts are never held twice.
- Quantized experts (a GGUF's quantized `ffn_*_exps`, or `--quantization int8|int4`): each
  expert's gate/up (one fused weight) and down are `QuantizedLinear`s
  (workers/quantized_linear.py), packed one expert at a time from its file bytes or codes and
  run the same grouped way; a GGUF's quantized shared expert likewise; a quantized router
  (tiny, [E, H]) runs dequantized.

Checkpoint layouts (names relative to `model.layers.N.`):
- Qwen3-MoE / Qwen2-MoE: `mlp.gate.weight` [E, H], `mlp.experts.{e}.{gate,up,down}_proj.weight`;
  Qwen2-MoE adds `mlp.shared_expert.{gate,up,down}_proj.weight`, `mlp.shared_expert_gate.weight`.
- Mixtral: `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.w1|w3|w2.weight`
  (gate | up | down).
- Fused (transformers 5 in memory, some exports): `mlp.experts.gate_up_proj` [E, 2I, H] and
  `mlp.experts.down_proj` [E, H, I].
- Stacked per projection (GGUF's `blk.N.ffn_{gate,up,down}_exps`, HF-named):
  `mlp.experts.{gate,up}_proj.weight` [E, I, H], `mlp.experts.down_proj.weight` [E, H, I]
  (quantized: a list of one `QuantizedRows` per expert, workers/gguf_file.py).

Routing (as transformers does): float32 softmax over all E router logits, top-k, and with
`norm_topk_prob` the k weights divided by their sum (Mixtral always: the same as a softmax over
the k largest logits), then cast to the hidden dtype.

Grouped experts: the N*k (token, expert) pairs are sorted by expert, so each active expert's
tokens are one contiguous slice: one gate/up GEMM and one down GEMM per active expert (a Python
loop over active experts, at most E, never over tokens); the weighted outputs are summed back
into their tokens with one `index_add_`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model_config import ModelConfig
from workers.quantized_linear import GroupCodes, QuantizedLinear, QuantizedRows

MOE_ROUTER_NAMES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")
_MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
ExpertLinears = list[tuple[QuantizedLinear, QuantizedLinear]]  # per expert: (gate/up fused, down)
Weight = torch.Tensor | QuantizedLinear  # dense [in, out] for `x @ w`, or quantized


class MoeBlock(nn.Module):
    """Routed experts stored transposed for `x @ w`: gate/up [E, H, 2I], down [E, I, H]; or,
    quantized, one (gate/up, down) pair of `QuantizedLinear`s per expert in `linears`."""

    def __init__(
        self,
        router: torch.Tensor,  # [E, H]
        gate_up: torch.Tensor | None,  # [E, H, 2I] (None: quantized experts in `linears`)
        down: torch.Tensor | None,  # [E, I, H]
        top_k: int,
        norm_topk_prob: bool,
        shared_gate_up: Weight | None = None,  # [H, 2S]
        shared_down: Weight | None = None,  # [S, H]
        shared_gate: torch.Tensor | None = None,  # [H, 1]
        linears: ExpertLinears | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = router.shape[0]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.w_router = _frozen(router.t())  # [H, E]
        self.w_gate_up = _frozen(gate_up) if gate_up is not None else None
        self.w_down = _frozen(down) if down is not None else None
        self.linears = linears
        self.w_shared_gate_up = _held(shared_gate_up)
        self.w_shared_down = _held(shared_down)
        self.w_shared_gate = _frozen(shared_gate) if shared_gate is not None else None

    @property
    def expert_bytes(self) -> int:
        """Bytes of all routed experts' weights (what a token reads only k/E of)."""
        if self.linears is not None:
            return sum(a.weight_bytes + b.weight_bytes for a, b in self.linears)
        return sum(t.numel() * t.element_size() for t in (self.w_gate_up, self.w_down))

    @property
    def quantized_linears(self) -> list[QuantizedLinear]:
        """The block's `QuantizedLinear`s (held outside its parameters, for byte counts)."""
        pairs = [w for pair in self.linears or () for w in pair]
        shared = [w for w in (self.w_shared_gate_up, self.w_shared_down) if isinstance(w, QuantizedLinear)]
        return pairs + shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] in x's dtype, expert ids [N, k])."""
        logits = torch.mm(x, self.w_router)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, H]
        weights, experts = self.route(x)
        flat_experts = experts.flatten()  # [N * k], pair p belongs to token p // k
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_rows = order // self.top_k  # token of each pair, in expert order
        inputs = x.index_select(0, token_rows)  # [N * k, H]
        outputs = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            if self.linears is not None:
                gate_up, down = self.linears[expert]
                gate, up = gate_up(inputs[rows]).chunk(2, dim=-1)
                outputs[rows] = down(F.silu(gate) * up)
            else:
                gate, up = torch.mm(inputs[rows], self.w_gate_up[expert]).chunk(2, dim=-1)
                torch.mm(F.silu(gate) * up, self.w_down[expert], out=outputs[rows])
            start += count
        outputs.mul_(weights.flatten().index_select(0, order)[:, None])
        out = torch.zeros_like(x).index_add_(0, token_rows, outputs)
        if self.w_shared_gate_up is not None:
            gate, up = _apply(x, self.w_shared_gate_up).chunk(2, dim=-1)
            shared = _apply(F.silu(gate) * up, self.w_shared_down)
            out = out + torch.sigmoid(torch.mm(x, self.w_shared_gate)) * shared
        return out


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


def _held(weight: Weight | None) -> Weight | None:
    return _frozen(weight) if isinstance(weight, torch.Tensor) else weight


def _apply(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    return weight(x) if isinstance(weight, QuantizedLinear) else torch.mm(x, weight)


def _is_quantized(weight: object) -> bool:
    return isinstance(weight, (GroupCodes, QuantizedRows, list))


def _dense(weight: torch.Tensor | GroupCodes | QuantizedRows, dtype: torch.dtype) -> torch.Tensor:
    """A small weight (router, shared-expert gate) as a dense `dtype` tensor."""
    if isinstance(weight, torch.Tensor):
        return weight
    codes = weight.codes() if isinstance(weight, QuantizedRows) else weight
    return codes.dequantize().to(dtype)


def _quantized_experts(gates: list, ups: list, downs: list) -> ExpertLinears:
    """Per-expert (gate/up, down) `QuantizedLinear`s, packed one expert at a time; each expert's
    file bytes or codes are dropped from the lists once packed."""
    linears = []
    for e in range(len(gates)):
        gate, up, down = gates[e], ups[e], downs[e]  # GGUF blocks stay blocks (the C block kernel)
        gates[e] = ups[e] = downs[e] = None
        linears.append((QuantizedLinear([gate, up]), QuantizedLinear(down)))
    return linears


def _pop_expert_lists(weights: dict, prefix: str, names: dict[str, str], num_experts: int) -> tuple[list, list, list]:
    """Per-expert tensors (`{prefix}{e}.{name}.weight`) popped into gate, up and down lists."""
    lists: tuple[list, list, list] = ([], [], [])
    for e in range(num_experts):
        for out, proj in zip(lists, ("gate", "up", "down")):
            try:
                out.append(weights.pop(f"{prefix}{e}.{names[proj]}.weight"))
            except KeyError as exc:
                raise ValueError(f"checkpoint lacks expert tensor {exc.args[0]!r}") from None
    return lists


def _stack_experts(weights: dict[str, torch.Tensor], prefix: str, names: dict[str, str], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert [I, H] gate/up and [H, I] down tensors -> gate_up [E, H, 2I], down [E, I, H],
    filled one expert at a time (each source tensor is popped once copied)."""
    first = weights[f"{prefix}0.{names['gate']}.weight"]
    inter, hidden = first.shape
    gate_up = first.new_empty((num_experts, hidden, 2 * inter))
    down = first.new_empty((num_experts, inter, hidden))
    for e in range(num_experts):
        try:
            gate = weights.pop(f"{prefix}{e}.{names['gate']}.weight")
            up = weights.pop(f"{prefix}{e}.{names['up']}.weight")
            down_e = weights.pop(f"{prefix}{e}.{names['down']}.weight")
        except KeyError as exc:
            raise ValueError(f"checkpoint lacks expert tensor {exc.args[0]!r}") from None
        gate_up[e, :, :inter] = gate.t()
        gate_up[e, :, inter:] = up.t()
        down[e] = down_e.t()
    return gate_up, down


def moe_block_from_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> MoeBlock | None:
    """The MoE block of one layer from its tensors (names relative to the layer), or None for a
    dense layer. The tensors used are removed from `weights`."""
    router_name = next((n for n in MOE_ROUTER_NAMES if n in weights), None)
    if router_name is None:
        return None
    norm = weights.get("post_attention_layernorm.weight")
    dtype = norm.dtype if isinstance(norm, torch.Tensor) else torch.float32
    router = _dense(weights.pop(router_name), dtype)
    num_experts = router.shape[0]
    if num_experts != config.num_experts:
        raise ValueError(f"router {router_name} has {num_experts} experts, config says {config.num_experts}")
    gate_up = down = linears = None
    if router_name.startswith("block_sparse_moe."):
        per_expert = ("block_sparse_moe.experts.", _MIXTRAL_PROJ)
    elif "mlp.experts.gate_up_proj" in weights:  # fused: [E, 2I, H] and [E, H, I]
        per_expert = None
        gate_up = weights.pop("mlp.experts.gate_up_proj").transpose(1, 2)
        down = weights.pop("mlp.experts.down_proj").transpose(1, 2)
    elif "mlp.experts.gate_proj.weight" in weights:  # stacked per projection: [E, I, H] x 2, [E, H, I]
        per_expert = None
        gate = weights.pop("mlp.experts.gate_proj.weight")
        up = weights.pop("mlp.experts.up_proj.weight")
        down = weights.pop("mlp.experts.down_proj.weight")
        if _is_quantized(gate):  # a quantized GGUF stack: one QuantizedRows per expert
            linears, down = _quantized_experts(gate, up, down), None
        else:
            gate_up, down = torch.cat([gate, up], dim=1).transpose(1, 2), down.transpose(1, 2)
    else:
        per_expert = ("mlp.experts.", {p: f"{p}_proj" for p in ("gate", "up", "down")})
    if per_expert is not None:
        prefix, names = per_expert
        if _is_quantized(weights.get(f"{prefix}0.{names['gate']}.weight")):  # --quantization
            linears = _quantized_experts(*_pop_expert_lists(weights, prefix, names, num_experts))
        else:
            gate_up, down = _stack_experts(weights, prefix, names, num_experts)
    shared: dict[str, Weight | None] = {}
    if "mlp.shared_expert.gate_proj.weight" in weights:
        parts = [weights.pop(f"mlp.shared_expert.{p}_proj.weight") for p in ("gate", "up", "down")]
        if any(_is_quantized(p) for p in parts):
            gate_up_w, down_w = QuantizedLinear(parts[:2]), QuantizedLinear(parts[2])
        else:
            gate_up_w, down_w = torch.cat(parts[:2]).t(), parts[2].t()
        shared = {
            "shared_gate_up": gate_up_w,
            "shared_down": down_w,
            # [1, H] (a GGUF may store it as [H]) -> [H, 1]
            "shared_gate": _dense(weights.pop("mlp.shared_expert_gate.weight"), dtype).reshape(1, -1).t(),
        }
    return MoeBlock(
        router, gate_up, down, config.num_experts_per_tok, config.norm_topk_prob, **shared, linears=linears
    )
