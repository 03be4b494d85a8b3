"""Decode throughput of the spine beside transformers' `generate`, measured in one run.

    python -m benchmarks.spine_throughput [--new-tokens 64] [--prompt-tokens 32] [--trials 5]
    python -m benchmarks.spine_throughput --curve [--workers 3] [--trials 3]

`--curve`: what CurveZMQ costs instead: two clusters of `--workers` workers, CURVE on (the default
of every cluster) and off, measured in interleaved rounds at one stream and at `--streams` streams;
prints the on/off ratio of each round and its median (target >= 0.95).

Builds a ~100M-parameter float32 Llama checkpoint (random weights), starts three potluck
clusters at once (scheduler in this process, 1, 2 and 3 real worker processes over ZeroMQ) and
loads transformers beside them, then runs `--trials` rounds at one stream, then `--trials`
rounds at 16 streams. Each round measures, one after the other, transformers `generate`
(greedy; batch 1, or a static batch of 16) and potluck with 1, 2 and 3 workers (every other
round in the reverse order). Every configuration thus sees the same moments of a shared, noisy
machine; each ratio is computed within a round and the median over rounds is printed (with the
range), beside the median tokens/s. transformers runs each time at its best thread count (1 or
every core) in that round. (The phases are apart because on the development VM a one-stream
run right after 16-stream runs found every layer 25-30% slower, in 1 and 3 workers alike, which
moved the 3-worker/1-worker ratio by up to 0.1 depending on which ran first.)
Also printed: each worker's peak memory against its layers' bytes + KV budget + 400 MB.
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
from dataclasses import dataclass
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
WORKER_COUNTS = (1, 2, 3)


def prompts(count: int, length: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


class Transformers:
    """transformers' `generate` on the checkpoint, greedy, every token forced (no early eos)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.thread_counts = sorted({1, os.cpu_count() or 1})

    def _run(self, inputs: torch.Tensor, new_tokens: int) -> float:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            started = time.perf_counter()
            output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
            elapsed_s = time.perf_counter() - started
        return (output.shape[1] - inputs.shape[1]) * inputs.shape[0] / elapsed_s

    def tokens_per_s(self, batch: list[list[int]], new_tokens: int) -> float:
        """tokens/s of one `generate`, at the better of 1 thread and every core (both run)."""
        inputs = torch.tensor(batch)
        threads_before = torch.get_num_threads()
        try:
            rates = []
            for threads in self.thread_counts:
                torch.set_num_threads(threads)
                rates.append(self._run(inputs, new_tokens))
            return max(rates)
        finally:
            torch.set_num_threads(threads_before)

    def warm_up(self, batch: list[list[int]]) -> None:
        for threads in self.thread_counts:
            torch.set_num_threads(threads)
            self._run(torch.tensor(batch)[:, :8], 4)


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Cluster:
    """A scheduler (in this process) and its local worker processes."""

    num_workers: int
    engine: object
    workers: object
    model_dir: Path
    requests: int = 0

    @classmethod
    async def start(cls, model_dir: Path, num_workers: int, use_curve: bool = True, id_prefix: str = "") -> Cluster:
        from api.local_workers import LocalWorkers
        from scheduler.engine import Engine, EngineConfig
        from scheduler.tokenizer import Tokenizer
        from workers.model_facts import read_model_facts

        config = EngineConfig(
            str(model_dir), read_model_facts(model_dir), "bench", min_workers=num_workers, max_concurrent_sequences=16,
            curve=use_curve,
        )
        engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        await engine.start()
        workers = LocalWorkers(engine.control_address, num_workers, id_prefix=id_prefix or f"w{num_workers}",
                               token=engine.token, extra_args=[] if use_curve else ["--no-curve"])
        workers.start()
        return cls(num_workers, engine, workers, model_dir)

    async def tokens_per_s(self, streams: list[list[int]], new_tokens: int) -> float:
        """Decode tokens/s of `streams` run concurrently, each generating `new_tokens`."""
        from scheduler.request import GenerationRequest
        from workers.protocol import SamplingParams

        async def run(prompt: list[int]) -> int:
            self.requests += 1
            sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            request = GenerationRequest(f"r{self.requests}", tuple(prompt), sampling)
            return sum([len(output.token_ids) async for output in self.engine.generate(request)])

        started = time.perf_counter()
        generated = await asyncio.gather(*(run(prompt) for prompt in streams))
        return sum(generated) / (time.perf_counter() - started)

    def memory_lines(self) -> list[str]:
        from workers.model_facts import read_model_facts

        facts = read_model_facts(self.model_dir)
        lines = []
        states = sorted(self.engine.cluster.workers.values(), key=lambda w: w.worker_id)
        for process, worker in zip(self.workers.processes, states):
            start, end = worker.loaded or (0, 0)
            kv_bytes = worker.kv_capacity_tokens * facts.kv_bytes_per_token_per_layer * (end - start)
            peak = peak_rss_bytes(process.pid)
            bound = worker.weight_bytes + kv_bytes + 400 * 2**20
            lines.append(
                f"  {worker.worker_id} layers [{start},{end}): peak {peak / 2**20:.0f} MiB <= weights {worker.weight_bytes / 2**20:.0f}"
                f" + KV {kv_bytes / 2**20:.0f} + 400 MiB = {bound / 2**20:.0f} MiB: {'yes' if peak <= bound else 'NO'}"
            )
        return lines

    async def stop(self) -> None:
        self.workers.stop()
        await self.engine.stop(shutdown_workers=True)


def _median_and_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


async def measure(model_dir: Path, streams: list[list[int]], new_tokens: int, trials: int) -> None:
    n = len(streams)
    reference = Transformers(model_dir)
    clusters: dict[int, Cluster] = {}
    try:
        for count in WORKER_COUNTS:
            clusters[count] = await Cluster.start(model_dir, count)
        for cluster in clusters.values():
            await cluster.engine.wait_ready(timeout_s=300)
            await cluster.tokens_per_s([streams[0][:8]], 4)  # warm-up
        reference.warm_up(streams)
        rates: dict[str, list[float]] = {}
        for batch in (streams[:1], streams):  # all one-stream rounds, then all 16-stream rounds
            for trial in range(trials):
                # every other round in reverse order (3, 2, 1 workers, transformers), so that
                # whatever a run leaves behind for the next one weighs on every configuration
                order: list[int | None] = [None, *clusters]
                measured: dict[int | None, float] = {}
                for count in order[::-1] if trial % 2 else order:
                    measured[count] = (reference.tokens_per_s(batch, new_tokens) if count is None
                                       else await clusters[count].tokens_per_s(batch, new_tokens))
                row = {f"{'hf' if count is None else count} {len(batch)}": measured[count] for count in order}
                for key, value in row.items():
                    rates.setdefault(key, []).append(value)
                print(f"round {trial + 1}: " + ", ".join(f"{key}: {value:.1f}" for key, value in row.items()), flush=True)
        for count, cluster in clusters.items():
            print(f"potluck {count} worker(s), peak memory per worker:")
            print("\n".join(cluster.memory_lines()))
    finally:
        for cluster in clusters.values():
            await cluster.stop()

    def ratios(key: str, base: str) -> list[float]:
        return [a / b for a, b in zip(rates[key], rates[base])]

    med = {key: statistics.median(values) for key, values in rates.items()}
    print()
    print(f"| workers | 1 stream tok/s | vs transformers b=1 | vs 1 worker | {n} streams tok/s | vs transformers b={n} |")
    print("|---|---|---|---|---|---|")
    for count in WORKER_COUNTS:
        print(
            f"| {count} | {med[f'{count} 1']:.1f} | {_median_and_range(ratios(f'{count} 1', 'hf 1'))}"
            f" | {_median_and_range(ratios(f'{count} 1', '1 1'))} | {med[f'{count} {n}']:.1f}"
            f" | {_median_and_range(ratios(f'{count} {n}', f'hf {n}'))} |"
        )
    print(f"| transformers | {med['hf 1']:.1f} | 1.00x | | {med[f'hf {n}']:.1f} | 1.00x |")
    print()
    print("ratios: median over rounds of the ratio within each round (range in brackets)")
    print(f"target 1 worker >= transformers at 1 stream: {_median_and_range(ratios('1 1', 'hf 1'))}")
    print(f"target 3 workers >= 0.85x of 1 worker at 1 stream: {_median_and_range(ratios('3 1', '1 1'))}")
    print(f"target {n} streams through 3 workers >= transformers static batch {n}: {_median_and_range(ratios(f'3 {n}', f'hf {n}'))}")


async def measure_curve(model_dir: Path, streams: list[list[int]], new_tokens: int, trials: int, num_workers: int) -> None:
    """CURVE on vs off, same worker count, interleaved rounds; the ratio on/off within each round."""
    clusters: dict[str, Cluster] = {}
    try:
        for name, use_curve in (("on", True), ("off", False)):
            clusters[name] = await Cluster.start(model_dir, num_workers, use_curve, id_prefix=f"curve-{name}")
        for cluster in clusters.values():
            await cluster.engine.wait_ready(timeout_s=300)
            await cluster.tokens_per_s([streams[0][:8]], 4)  # warm-up
        for batch in (streams[:1], streams):
            ratios = []
            for trial in range(trials):
                order = ["on", "off"] if trial % 2 == 0 else ["off", "on"]
                rate = {name: await clusters[name].tokens_per_s(batch, new_tokens) for name in order}
                ratios.append(rate["on"] / rate["off"])
                print(f"{len(batch)} stream(s) round {trial + 1}: CURVE on {rate['on']:.1f} tok/s, off {rate['off']:.1f} tok/s,"
                      f" on/off {ratios[-1]:.3f}", flush=True)
            print(f"{num_workers} workers, {len(batch)} stream(s): CURVE on/off {_median_and_range(ratios)} (target >= 0.95)")
    finally:
        for cluster in clusters.values():
            await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--model-dir", default=None, help="reuse or create the checkpoint here")
    parser.add_argument("--trials", type=int, default=5, help="rounds; each ratio is the median over rounds")
    parser.add_argument("--curve", action="store_true", help="measure CURVE on against off instead")
    parser.add_argument("--workers", type=int, default=3, help="workers per cluster with --curve")
    args = parser.parse_args()
    for name in ("new_tokens", "prompt_tokens", "streams", "trials"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="potluck-bench-"))
    if not (model_dir / "config.json").exists():
        build_demo_model(model_dir, MODEL_SPEC)
    params = (model_dir / "model.safetensors").stat().st_size / 4 / 1e6  # float32
    streams = prompts(args.streams, args.prompt_tokens, MODEL_SPEC.vocab_size)
    print(
        f"checkpoint: ~{params:.0f}M parameters, float32; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens;"
        f" {os.cpu_count()} cores; {args.trials} rounds"
    )
    if args.curve:
        asyncio.run(measure_curve(model_dir, streams, args.new_tokens, args.trials, args.workers))
    else:
        asyncio.run(measure(model_dir, streams, args.new_tokens, args.trials))


if __name__ == "__main__":
    main()
