"""Multi-turn chat on real workers: time to first token with the prefix cache vs without.

    python -m benchmarks.prefix_chat [--workers 1 3] [--turns 8] [--history-tokens 1600]

Each turn sends the whole history (a long first prompt, then every answer and user message so
far) plus a new user message of `--message-tokens`, and generates `--answer-tokens`. For each
worker count, two clusters of local workers run the random-weight demo model (context 4096): one
with prefix caching, one without (`EngineConfig.prefix_caching=False`); each turn runs on one,
then on the other, so both see the same minute of a shared machine. Prints TTFT per turn and
the ratio without / with, and the mean ratio over turns 5 and later.

Parts: `Chat` (one cluster and its engine), `measure(num_workers, ...)`, `main`.
"""
from __future__ import annotations

import os

from api.local_workers import worker_environment  # imports no torch

os.environ.update(worker_environment(os.environ))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from api.demo_model import DemoModelSpec, build_demo_model  # noqa: E402


@dataclass
class Chat:
    engine: object
    workers: object
    requests: int = 0

    @classmethod
    async def start(cls, model_dir: Path, num_workers: int, prefix_caching: bool) -> Chat:
        from api.local_workers import LocalWorkers
        from scheduler.engine import Engine, EngineConfig
        from scheduler.tokenizer import Tokenizer
        from workers.model_facts import read_model_facts

        config = EngineConfig(str(model_dir), read_model_facts(model_dir), "bench", min_workers=num_workers,
                              max_concurrent_sequences=4, prefix_caching=prefix_caching)
        engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        await engine.start()
        prefix = f"{'c' if prefix_caching else 'p'}{num_workers}"
        workers = LocalWorkers(engine.control_address, num_workers, threads_per_worker=1, id_prefix=prefix, token=engine.token)
        workers.start()
        return cls(engine, workers)

    async def wait_ready(self, num_workers: int) -> None:
        deadline = time.monotonic() + 120
        while not (len(self.engine.cluster.workers) == num_workers and self.engine.cluster.usable_routes()):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not load their layers")
            await asyncio.sleep(0.05)

    async def turn(self, prompt: list[int], answer_tokens: int) -> tuple[float, list[int], int]:
        """(TTFT s, answer token ids, cached prompt tokens)."""
        from scheduler.request import GenerationRequest
        from workers.protocol import SamplingParams

        self.requests += 1
        sampling = SamplingParams(max_new_tokens=answer_tokens, ignore_eos=True)
        request = GenerationRequest(f"t{self.requests}", tuple(prompt), sampling)
        started = time.perf_counter()
        ttft_s, tokens, cached = 0.0, [], 0
        async for output in self.engine.generate(request):
            if not tokens:
                ttft_s = time.perf_counter() - started
                cached = output.num_cached_tokens
            tokens.extend(output.token_ids)
        return ttft_s, tokens, cached

    async def stop(self) -> None:
        self.workers.stop()
        await self.engine.stop(shutdown_workers=True)


async def measure(model_dir: Path, num_workers: int, turns: int, history_tokens: int, message_tokens: int,
                  answer_tokens: int, vocab_size: int, seed: int = 0) -> list[tuple[int, int, float, float, int]]:
    """Per turn: (turn, prompt tokens, TTFT without cache s, TTFT with cache s, cached tokens)."""
    rng = random.Random(seed)
    cached_chat = await Chat.start(model_dir, num_workers, True)
    plain_chat = await Chat.start(model_dir, num_workers, False)
    try:
        await cached_chat.wait_ready(num_workers)
        await plain_chat.wait_ready(num_workers)
        warm = [rng.randrange(10, vocab_size) for _ in range(64)]
        for chat in (cached_chat, plain_chat):  # first steps of a fresh worker are slow
            await chat.turn(warm, 2)
        history = [rng.randrange(10, vocab_size) for _ in range(history_tokens)]
        rows = []
        for k in range(1, turns + 1):
            prompt = history + [rng.randrange(10, vocab_size) for _ in range(message_tokens)]
            with_s, answer, cached = await cached_chat.turn(prompt, answer_tokens)
            without_s, plain_answer, _ = await plain_chat.turn(prompt, answer_tokens)
            assert answer == plain_answer, "the cache changed the greedy answer"
            rows.append((k, len(prompt), without_s, with_s, cached))
            history = prompt + answer
        return rows
    finally:
        await cached_chat.stop()
        await plain_chat.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--history-tokens", type=int, default=1600, help="the first turn's history")
    ap.add_argument("--message-tokens", type=int, default=48)
    ap.add_argument("--answer-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    spec = DemoModelSpec(max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_model(Path(tmp) / "model", spec)
        for n in args.workers:
            rows = asyncio.run(measure(model_dir, n, args.turns, args.history_tokens, args.message_tokens,
                                       args.answer_tokens, spec.vocab_size))
            print(f"\n{n} worker(s): demo model ({spec.num_hidden_layers} layers, hidden {spec.hidden_size}), "
                  f"{args.message_tokens}-token messages, {args.answer_tokens}-token answers")
            print("| turn | prompt tokens | cached | TTFT no cache ms | TTFT cache ms | ratio |")
            print("|---|---|---|---|---|---|")
            for k, tokens, without_s, with_s, cached in rows:
                print(f"| {k} | {tokens} | {cached} | {1000 * without_s:.1f} | {1000 * with_s:.1f} | {without_s / with_s:.2f}x |")
            late = [without_s / with_s for k, _, without_s, with_s, _ in rows if k >= 5]
            if late:
                print(f"TTFT without / with the cache, turns 5+: mean {statistics.mean(late):.2f}x, "
                      f"min {min(late):.2f}x")


if __name__ == "__main__":
    main()
