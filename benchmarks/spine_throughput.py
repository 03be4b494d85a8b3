"""Decode throughput of the spine beside transformers' `generate`, measured in one run.

    python -m benchmarks.spine_throughput [--new-tokens 64] [--prompt-tokens 32]

Builds a ~100M-parameter float32 Llama checkpoint (random weights), then measures:
- transformers `generate` (greedy) at batch 1 and with a static batch of 16, each at its best
  thread count (1 or every core);
- potluck (scheduler in this process, real worker processes, ZeroMQ) with 1, 2 and 3 local
  workers, for 1 stream and for 16 concurrent streams;
and prints decode tokens/s and the ratios the spine issue sets as targets, plus each worker's
peak memory against its layers' bytes + KV budget + 400 MB. Every figure is the median of
`--trials` runs (default 3) of the same work, so that one noisy run on a shared machine does
not decide a ratio.
"""

from __future__ import annotations

import os

from api.local_workers import worker_environment  # imports no torch

# Both sides get the environment potluck's local workers run with (set before torch loads
# OpenMP): a short OpenMP spin, so idle threads soon sleep, which on a shared 2-core machine
# decides more than anything else whether a 2-thread run collapses.
os.environ.update(worker_environment(os.environ))

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from api.demo_model import DemoModelSpec, build_demo_model

MODEL_SPEC = DemoModelSpec(
    vocab_size=16000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=1024,
)


def prompts(count: int, length: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def transformers_tokens_per_s(model_dir: Path, batch: list[list[int]], new_tokens: int, trials: int) -> float:
    """Greedy `generate` tokens/s at its best thread count (1 or every core): median of `trials` runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = torch.tensor(batch)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best = 0.0
    threads_before = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model.generate(inputs[:, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            rates = []
            for _ in range(trials):
                started = time.perf_counter()
                output = model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
                elapsed_s = time.perf_counter() - started
                rates.append((output.shape[1] - inputs.shape[1]) * inputs.shape[0] / elapsed_s)
        best = max(best, statistics.median(rates))
    torch.set_num_threads(threads_before)
    return best


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def potluck_tokens_per_s(
    model_dir: Path, num_workers: int, streams: list[list[int]], new_tokens: int, trials: int
) -> tuple[dict[int, float], list[str]]:
    from api.local_workers import LocalWorkers
    from scheduler.engine import Engine, EngineConfig
    from scheduler.request import GenerationRequest
    from scheduler.tokenizer import Tokenizer
    from workers.model_facts import read_model_facts
    from workers.protocol import SamplingParams

    facts = read_model_facts(model_dir)
    engine = Engine(
        EngineConfig(str(model_dir), facts, "bench", min_workers=num_workers, max_concurrent_sequences=16),
        Tokenizer.from_model_dir(model_dir),
    )
    await engine.start()
    workers = LocalWorkers(engine.control_address, num_workers)
    workers.start()
    results: dict[int, float] = {}
    memory_lines: list[str] = []
    try:
        await engine.wait_ready(timeout_s=120)
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

        async def run(prompt: list[int], index: int, count: int) -> int:
            request = GenerationRequest(f"r{index}", tuple(prompt), replace(sampling, max_new_tokens=count))
            generated = 0
            async for output in engine.generate(request):
                generated += len(output.token_ids)
            return generated

        await run(streams[0][:8], -1, 4)  # warm-up
        for count in (1, len(streams)):
            rates = []
            for trial in range(trials):
                started = time.perf_counter()
                runs = (run(prompt, trial * len(streams) + i, new_tokens) for i, prompt in enumerate(streams[:count]))
                done = await asyncio.gather(*runs)
                rates.append(sum(done) / (time.perf_counter() - started))
            results[count] = statistics.median(rates)
        for process, worker in zip(workers.processes, sorted(engine.cluster.workers.values(), key=lambda w: w.worker_id)):
            start, end = worker.loaded or (0, 0)
            kv_bytes = worker.kv_capacity_tokens * facts.kv_bytes_per_token_per_layer * (end - start)
            peak = peak_rss_bytes(process.pid)
            bound = worker.weight_bytes + kv_bytes + 400 * 2**20
            memory_lines.append(
                f"  {worker.worker_id} layers [{start},{end}): peak {peak / 2**20:.0f} MiB <= weights {worker.weight_bytes / 2**20:.0f}"
                f" + KV {kv_bytes / 2**20:.0f} + 400 MiB = {bound / 2**20:.0f} MiB: {'yes' if peak <= bound else 'NO'}"
            )
    finally:
        workers.stop()
        await engine.stop(shutdown_workers=True)
    return results, memory_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--model-dir", default=None, help="reuse or create the checkpoint here")
    parser.add_argument("--trials", type=int, default=3, help="runs per figure; the median is reported")
    args = parser.parse_args()
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="potluck-bench-"))
    if not (model_dir / "config.json").exists():
        build_demo_model(model_dir, MODEL_SPEC)
    params = (model_dir / "model.safetensors").stat().st_size / 4 / 1e6  # float32
    streams = prompts(args.streams, args.prompt_tokens, MODEL_SPEC.vocab_size)
    print(
        f"checkpoint: ~{params:.0f}M parameters, float32; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens;"
        f" {os.cpu_count()} cores; median of {args.trials} runs per figure"
    )
    hf_1 = transformers_tokens_per_s(model_dir, streams[:1], args.new_tokens, args.trials)
    hf_16 = transformers_tokens_per_s(model_dir, streams, args.new_tokens, args.trials)
    print(f"transformers generate: batch 1 {hf_1:.1f} tok/s, static batch {args.streams} {hf_16:.1f} tok/s")
    ours: dict[int, dict[int, float]] = {}
    for num_workers in (1, 2, 3):
        ours[num_workers], memory = asyncio.run(potluck_tokens_per_s(model_dir, num_workers, streams, args.new_tokens, args.trials))
        print(f"potluck {num_workers} worker(s): 1 stream {ours[num_workers][1]:.1f} tok/s, {args.streams} streams {ours[num_workers][args.streams]:.1f} tok/s")
        print("\n".join(memory))
    n = args.streams
    print()
    print("| workers | 1 stream tok/s | vs transformers b=1 | vs 1 worker | %d streams tok/s | vs transformers b=%d |" % (n, n))
    print("|---|---|---|---|---|---|")
    for num_workers, row in ours.items():
        print(f"| {num_workers} | {row[1]:.1f} | {row[1] / hf_1:.2f}x | {row[1] / ours[1][1]:.2f}x | {row[n]:.1f} | {row[n] / hf_16:.2f}x |")
    print(f"| transformers | {hf_1:.1f} | 1.00x | | {hf_16:.1f} | 1.00x |")
    print()
    print(f"target 1 worker >= transformers at 1 stream: {ours[1][1] / hf_1:.2f}x")
    print(f"target 3 workers >= 0.85x of 1 worker at 1 stream: {ours[3][1] / ours[1][1]:.2f}x")
    print(f"target {n} streams through 3 workers >= transformers static batch {n}: {ours[3][n] / hf_16:.2f}x")


if __name__ == "__main__":
    main()
