"""Soak: a cluster under steady varied traffic for a long time; does anything grow?

    python -m benchmarks.soak [--duration-s 1800] [--mark-s 300] [--workers 3] [--concurrency 4]
                              [--max-requests N] [--mark-requests N] [--worker-env KEY=VALUE ...]

Starts a scheduler (this process) and `--workers` real worker processes (CURVE on, as always) on
the demo checkpoint (api/demo_model.py, built once under --model-dir), then keeps `--concurrency`
requests in flight: prompt lengths, output lengths, temperatures and seeds vary from request to
request (a fixed random sequence, so two runs send the same traffic). At each mark (every
`--mark-s` seconds, and every `--mark-requests` requests if set) it prints one line: requests and
errors since the last mark, p50/p99 latency of those requests, and the RSS of every process (the
scheduler and each worker). At the end: each process's RSS growth over the run's last two thirds
(flat within 5% is the target) and its first and last RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from api.demo_model import DemoModelSpec, build_demo_model


def rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(7)
        self.latencies_s: list[float] = []
        self.errors = 0
        self.done = 0
        self.marks: list[dict[str, float]] = []  # pid label -> RSS MiB, per mark
        self.last_mark_s = time.monotonic()
        self.started_s = time.monotonic()

    async def run(self, model_dir: Path) -> None:
        from api.local_workers import LocalWorkers
        from scheduler.engine import Engine, EngineConfig
        from scheduler.tokenizer import Tokenizer
        from workers.model_facts import read_model_facts

        args = self.args
        config = EngineConfig(str(model_dir), read_model_facts(model_dir), "soak", min_workers=args.workers)
        self.engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        await self.engine.start()
        extra_env = dict(item.split("=", 1) for item in args.worker_env)
        os.environ.update(extra_env)  # the workers inherit it
        self.workers = LocalWorkers(self.engine.control_address, args.workers, token=self.engine.token,
                                    threads_per_worker=args.threads)
        self.workers.start()
        try:
            await self.engine.wait_ready(timeout_s=300)
            print(f"soak: {args.workers} workers, concurrency {args.concurrency}, worker env {extra_env or '-'}", flush=True)
            self.mark("start")
            await asyncio.gather(*(self.client() for _ in range(args.concurrency)))
            self.mark("end")
        finally:
            self.workers.stop()
            await self.engine.stop(shutdown_workers=True)
        self.summary()

    def finished(self) -> bool:
        args = self.args
        return time.monotonic() - self.started_s > args.duration_s or (args.max_requests and self.done >= args.max_requests)

    async def client(self) -> None:
        from scheduler.request import GenerationRequest
        from workers.protocol import SamplingParams

        while not self.finished():
            vocab = self.engine.config.model.vocab_size
            prompt = tuple(self.rng.randrange(3, vocab) for _ in range(self.rng.choice((4, 17, 60, 150, 400))))
            sampling = SamplingParams(max_new_tokens=self.rng.choice((1, 8, 32, 96)), temperature=self.rng.choice((0.0, 0.7, 1.2)),
                                      top_p=self.rng.choice((1.0, 0.9)), seed=self.rng.randrange(1 << 30), ignore_eos=True,
                                      num_top_logprobs=self.rng.choice((None, 0, 3)))
            started = time.perf_counter()
            try:
                async for _ in self.engine.generate(GenerationRequest(f"soak-{self.done}-{time.monotonic_ns()}", prompt, sampling)):
                    pass
                self.latencies_s.append(time.perf_counter() - started)
            except Exception as exc:  # counted and shown; the soak goes on
                self.errors += 1
                print(f"  error: {type(exc).__name__}: {exc}", flush=True)
            self.done += 1
            args = self.args
            if time.monotonic() - self.last_mark_s >= args.mark_s or (args.mark_requests and self.done % args.mark_requests == 0):
                self.mark(f"{self.done} requests")

    def mark(self, label: str) -> None:
        pids = {"scheduler": os.getpid(), **{f"w{i}": p.pid for i, p in enumerate(self.workers.processes)}}
        rss = {name: rss_mib(pid) for name, pid in pids.items()}
        self.marks.append(rss)
        lat = sorted(self.latencies_s)
        p50 = statistics.median(lat) if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
        minutes = (time.monotonic() - self.started_s) / 60
        print(f"[{minutes:6.1f} min] {label}: {len(lat)} requests, {self.errors} errors, p50 {p50:.2f} s, p99 {p99:.2f} s;"
              f" RSS MiB " + ", ".join(f"{name} {value:.0f}" for name, value in rss.items()), flush=True)
        self.latencies_s, self.errors = [], 0
        self.last_mark_s = time.monotonic()

    def summary(self) -> None:
        if len(self.marks) < 3:
            return
        tail = self.marks[len(self.marks) // 3 :]
        print("RSS over the last two thirds of the marks (growth = last / first - 1; target within 5%):")
        for name in self.marks[0]:
            values = [mark[name] for mark in tail]
            print(f"  {name}: start {self.marks[0][name]:.0f} MiB, {values[0]:.0f} -> {values[-1]:.0f} MiB,"
                  f" growth {100 * (values[-1] / values[0] - 1):+.1f}%, max {max(values):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1800)
    parser.add_argument("--mark-s", type=float, default=300)
    parser.add_argument("--mark-requests", type=int, default=0)
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--worker-env", action="append", default=[], help="KEY=VALUE for the worker processes")
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "potluck-soak-model")
    if not (model_dir / "config.json").exists():
        build_demo_model(model_dir, DemoModelSpec())
    asyncio.run(Soak(args).run(model_dir))


if __name__ == "__main__":
    main()
