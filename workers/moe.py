"""Mixture-of-experts MLP blocks: a router picks k experts per token, experts run grouped.

Parts:
- `MOE_ROUTER_NAMES`: the checkpoint names (relative to a layer) of a router, by layout.
- `MoeBlock`: router (top-k, each family's normalisation) + routed SwiGLU experts (+ Qwen2-MoE's
  sigmoid-gated shared expert). `forward(x)` takes the post-attention-norm hidden [N, hidden].
- `moe_block_from_weights(config, weights)`: a layer's MoE block from its checkpoint-named
  tensors (names relative to the layer), or None where the layer is dense. Consumes the tensors
  it uses (popped from `weights`), so a layer's experts are never held twice.

Checkpoint layouts (names relative to `model.layers.N.`):
- Qwen3-MoE / Qwen2-MoE: `mlp.gate.weight` [E, H], `mlp.experts.{e}.{gate,up,down}_proj.weight`;
  Qwen2-MoE adds `mlp.shared_expert.{gate,up,down}_proj.weight`, `mlp.shared_expert_gate.weight`.
- Mixtral: `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.w1|w3|w2.weight`
  (gate | up | down).
- Fused (transformers 5 in memory, some exports): `mlp.experts.gate_up_proj` [E, 2I, H] and
  `mlp.experts.down_proj` [E, H, I].
- Stacked per projection (GGUF's `blk.N.ffn_{gate,up,down}_exps`, HF-named):
  `mlp.experts.{gate,up}_proj.weight` [E, I, H], `mlp.experts.down_proj.weight` [E, H, I].

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

MOE_ROUTER_NAMES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")
_MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}


class MoeBlock(nn.Module):
    """Routed experts stored transposed for `x @ w`: gate/up [E, H, 2I], down [E, I, H]."""

    def __init__(
        self,
        router: torch.Tensor,  # [E, H]
        gate_up: torch.Tensor,  # [E, H, 2I]
        down: torch.Tensor,  # [E, I, H]
        top_k: int,
        norm_topk_prob: bool,
        shared_gate_up: torch.Tensor | None = None,  # [H, 2S]
        shared_down: torch.Tensor | None = None,  # [S, H]
        shared_gate: torch.Tensor | None = None,  # [H, 1]
    ) -> None:
        super().__init__()
        self.num_experts = router.shape[0]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.w_router = _frozen(router.t())  # [H, E]
        self.w_gate_up = _frozen(gate_up)
        self.w_down = _frozen(down)
        self.w_shared_gate_up = _frozen(shared_gate_up) if shared_gate_up is not None else None
        self.w_shared_down = _frozen(shared_down) if shared_down is not None else None
        self.w_shared_gate = _frozen(shared_gate) if shared_gate is not None else None

    @property
    def expert_bytes(self) -> int:
        """Bytes of all routed experts' weights (what a token reads only k/E of)."""
        return sum(t.numel() * t.element_size() for t in (self.w_gate_up, self.w_down))

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
            gate, up = torch.mm(inputs[rows], self.w_gate_up[expert]).chunk(2, dim=-1)
            torch.mm(F.silu(gate) * up, self.w_down[expert], out=outputs[rows])
            start += count
        outputs.mul_(weights.flatten().index_select(0, order)[:, None])
        out = torch.zeros_like(x).index_add_(0, token_rows, outputs)
        if self.w_shared_gate_up is not None:
            gate, up = torch.mm(x, self.w_shared_gate_up).chunk(2, dim=-1)
            shared = torch.mm(F.silu(gate) * up, self.w_shared_down)
            out = out + torch.sigmoid(torch.mm(x, self.w_shared_gate)) * shared
        return out


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


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
    router = weights.pop(router_name)
    num_experts = router.shape[0]
    if num_experts != config.num_experts:
        raise ValueError(f"router {router_name} has {num_experts} experts, config says {config.num_experts}")
    if router_name.startswith("block_sparse_moe."):
        gate_up, down = _stack_experts(weights, "block_sparse_moe.experts.", _MIXTRAL_PROJ, num_experts)
    elif "mlp.experts.gate_up_proj" in weights:  # fused: [E, 2I, H] and [E, H, I]
        gate_up = weights.pop("mlp.experts.gate_up_proj").transpose(1, 2)
        down = weights.pop("mlp.experts.down_proj").transpose(1, 2)
    elif "mlp.experts.gate_proj.weight" in weights:  # stacked per projection: [E, I, H] x 2, [E, H, I]
        gate = weights.pop("mlp.experts.gate_proj.weight")
        up = weights.pop("mlp.experts.up_proj.weight")
        gate_up = torch.cat([gate, up], dim=1).transpose(1, 2)
        down = weights.pop("mlp.experts.down_proj.weight").transpose(1, 2)
    else:
        names = {p: f"{p}_proj" for p in ("gate", "up", "down")}
        gate_up, down = _stack_experts(weights, "mlp.experts.", names, num_experts)
    shared: dict[str, torch.Tensor | None] = {}
    if "mlp.shared_expert.gate_proj.weight" in weights:
        gate = weights.pop("mlp.shared_expert.gate_proj.weight")
        up = weights.pop("mlp.shared_expert.up_proj.weight")
        shared = {
            "shared_gate_up": torch.cat([gate, up]).t(),
            "shared_down": weights.pop("mlp.shared_expert.down_proj.weight").t(),
            "shared_gate": weights.pop("mlp.shared_expert_gate.weight").t(),
        }
    return MoeBlock(router, gate_up, down, config.num_experts_per_tok, config.norm_topk_prob, **shared)
