"""Time potluck's grouped MoE block against transformers' Qwen3-MoE block on the same weights.

    python -m benchmarks.moe_block [--hidden 1024 --experts 64 --inter 384 --top-k 8 --repeats 20 --threads 1]

Both run the same router and experts (float32, this machine's threads); the rows alternate the
two blocks per repeat so that load on a shared machine hits both alike, and the median of each is
printed with their ratio, for 1 token (a decode step), 16 (a batched decode) and 256 (a prefill).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from workers.model_config import ModelConfig
from workers.moe import moe_block_from_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--inter", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = {"model_type": "qwen3_moe", "hidden_size": args.hidden, "intermediate_size": 4 * args.inter,
           "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
           "num_experts": args.experts, "num_experts_per_tok": args.top_k, "moe_intermediate_size": args.inter,
           "norm_topk_prob": True}
    torch.manual_seed(0)
    reference = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(
        transformers.Qwen3MoeConfig(**{k: v for k, v in raw.items() if k != "model_type"})).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.02)
        gate_up, down = reference.experts.gate_up_proj, reference.experts.down_proj
        weights = {"mlp.gate.weight": reference.gate.weight.clone(),
                   "mlp.experts.gate_up_proj": gate_up.clone(), "mlp.experts.down_proj": down.clone()}
    ours = moe_block_from_weights(ModelConfig.from_dict(raw), weights)
    print(f"experts {args.experts} x ({args.hidden} -> {args.inter}), top-{args.top_k}, "
          f"{ours.expert_bytes / 2**20:.0f} MiB of experts, {torch.get_num_threads()} threads")
    print("tokens  potluck ms  transformers ms  ratio")
    for tokens in (1, 16, 256):
        x = torch.randn(tokens, args.hidden)
        with torch.inference_mode():
            torch.testing.assert_close(ours(x), reference(x[None])[0], atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {"ours": [], "ref": []}
            for _ in range(args.repeats):
                for name, run in (("ours", lambda: ours(x)), ("ref", lambda: reference(x[None]))):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["ours"]), statistics.median(times["ref"])
        print(f"{tokens:6d}  {a * 1e3:10.2f}  {b * 1e3:15.2f}  {b / a:5.2f}x")


if __name__ == "__main__":
    main()
