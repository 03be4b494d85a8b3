"""Decode speed of one stage on each backend, side by side (the MLX stage beside the torch stage).

    python -m benchmarks.backend_decode [--backends torch,mlx] [--rounds 5] [--steps 32] [--batch 1,8]
        [--model DIR_OR_GGUF]

Builds a random-weight Llama checkpoint (hidden 512, 8 layers, float32; --hidden / --layers), or
takes --model (a GGUF too: e.g. SmolLM2-135M Q4_1, each backend keeping it quantized), loads the whole model as one stage on every backend named, fills a context of --context tokens
per request, then times decode steps (one token per request) in interleaved rounds: each round
runs every backend once, in alternating order, so that a slow minute of a shared machine weighs
on all. Prints per backend and batch size the median step time and tokens/s over the rounds, and
each backend's rate relative to the first one, taken within each round (median and range).
On Linux MLX runs on the CPU (mlx[cpu]); Metal on a Mac is where it is meant to be fast.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from workers.backend import SequenceChunk, StageConfig, load_backend


def build_checkpoint(path: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=8192,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def decode_step_s(backend, batch: int, context: int, steps: int, round_index: int) -> float:
    """Median seconds of a decode step of `batch` requests at `context` tokens (fresh requests)."""
    ids = [f"r{round_index}-{i}" for i in range(batch)]
    prompt = np.arange(context, dtype=np.int64) % backend.vocab_size
    for rid in ids:
        backend.forward([SequenceChunk(rid, 0, context)], prompt)
    times = []
    tokens = np.full(batch, 7, dtype=np.int64)
    for step in range(steps):
        chunks = [SequenceChunk(rid, context + step, 1) for rid in ids]
        begin = time.perf_counter()
        backend.forward(chunks, tokens)
        times.append(time.perf_counter() - begin)
    for rid in ids:
        backend.free(rid)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", default=None, help="a model directory or GGUF file instead of a random checkpoint")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    names = args.backends.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from workers.model_config import ModelConfig

            model, args.layers = Path(args.model), ModelConfig.from_path(args.model).num_hidden_layers
        else:
            model = build_checkpoint(Path(tmp) / "llama", args.hidden, args.layers)
        stages = {}
        for name in names:
            config = StageConfig(str(model), 0, args.layers, "float32", "cpu", kv_budget_bytes=2**30)
            begin = time.perf_counter()
            stages[name] = load_backend(config, name)
            print(f"{name}: loaded in {time.perf_counter() - begin:.1f} s, {stages[name].weight_bytes / 1e6:.1f} MB of weights")
        print(f"{model.name}, {args.layers} layers, float32 activations, one stage, "
              f"context {args.context}, {args.steps} decode steps x {args.rounds} rounds")  # fmt: skip
        results: dict[tuple[str, int], list[float]] = {(n, b): [] for n in names for b in batches}
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for batch in batches:
                for name in order:
                    results[name, batch].append(decode_step_s(stages[name], batch, args.context, args.steps, round_index))
        for batch in batches:
            base = results[names[0], batch]
            for name in names:
                times = results[name, batch]
                ratios = [b / t for b, t in zip(base, times)]
                rate = batch / statistics.median(times)
                print(f"batch {batch:>2}  {name:<6} step {statistics.median(times) * 1e3:7.2f} ms  {rate:8.1f} tok/s  "
                      f"x{statistics.median(ratios):.2f} of {names[0]} (rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
