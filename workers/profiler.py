"""Device profiling at join: what this machine can really do, measured on the spot.

Parts:
- What is measured, `LayerTimings` and `DeviceProfile`, and its one conversion to a placement
  `DeviceSpec`, live in workers/device_profile.py (no torch there: the scheduler reads them).
- `measure_device(device, *, model_dir, seconds_budget, slowdown, peers) -> DeviceProfile`: warm-up,
  then the median of several timed repeats of each figure; `seconds_budget` caps the repeats;
  `peers` (echo addresses) are probed with workers/peer_probe.py.
- `measure_layer_timings(model_dir, device, ...)`: times a real `TorchStageBackend` holding one
  middle layer (`[1, 2)` when the model has more than two layers) on synthetic chunks.
- `default_device()`, `main(args) -> int` (`potluck profile`: prints the profile as JSON).

Fault injection: `slowdown` > 1 (or env `POTLUCK_PROFILE_SLOWDOWN`, off by default) makes every
timed region really take `slowdown` x as long by stalling inside it, so the figures come out slower.
Peer probing itself lives in workers/peer_probe.py (`EchoResponder`, `probe_peer`, `measure_peers`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from workers.device_memory import chip_prior, device_name, usable_memory_bytes
from workers.device_profile import DeviceProfile, LayerTimings
from workers.peer_probe import measure_peers, stall_until

SLOWDOWN_ENV = "POTLUCK_PROFILE_SLOWDOWN"
DECODE_BATCH_SIZES = (1, 4, 16)
DECODE_CONTEXT_LENGTHS = (128, 1024)
PREFILL_LENGTHS = (128, 512)
MATMUL_SIZE = {"cpu": 512, "mps": 2048, "cuda": 4096}
COPY_BYTES = {"cpu": 64 * 2**20, "mps": 256 * 2**20, "cuda": 512 * 2**20}


# ----------------------------------------------------------------------------- timing
def env_slowdown() -> float:
    """The fault-injection factor from `POTLUCK_PROFILE_SLOWDOWN` (1.0 when unset)."""
    raw = os.environ.get(SLOWDOWN_ENV, "").strip()
    value = float(raw) if raw else 1.0
    if value < 1.0:
        raise ValueError(f"{SLOWDOWN_ENV} must be >= 1, got {raw!r}")
    return value


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def timed_median_s(fn: Callable[[], object], sync: Callable[[], None], *, slowdown: float = 1.0,
                   budget_s: float = 0.2, min_repeats: int = 3, max_repeats: int = 15,
                   warmup: int = 1) -> float:
    """Median wall seconds of `fn()` after `warmup` untimed calls. Repeats stop at `max_repeats`,
    or once `min_repeats` are done and `budget_s` is spent (or after one repeat past 4 x `budget_s`,
    so a badly contended machine still finishes). With `slowdown` > 1 each timed call stalls
    (inside the timed region) until it has taken `slowdown` x its own duration."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    begin = time.perf_counter()

    def more() -> bool:
        spent = time.perf_counter() - begin
        if len(times) >= max_repeats or (times and spent > 4 * budget_s):
            return False
        return len(times) < min_repeats or spent < budget_s

    while more():
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
        if slowdown > 1.0:
            stall_until(start + took * slowdown)
            took = time.perf_counter() - start
        times.append(took)
    return statistics.median(times)


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


def measure_matmul_flops_per_s(device: str, *, slowdown: float = 1.0, budget_s: float = 0.3) -> float:
    """Square matmul rate (2 n^3 FLOPs per product) in the device's serving dtype."""
    dev = torch.device(device)
    n = MATMUL_SIZE.get(dev.type, 512)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, _compute_dtype(dev))
    b = torch.randn(n, n, generator=gen).to(dev, _compute_dtype(dev))
    out = torch.empty(n, n, device=dev, dtype=a.dtype)
    seconds = timed_median_s(lambda: torch.mm(a, b, out=out), _synchronizer(dev), slowdown=slowdown,
                             budget_s=budget_s)
    return 2.0 * n**3 / seconds


def measure_memory_bandwidth_bytes_per_s(device: str, *, slowdown: float = 1.0, budget_s: float = 0.3) -> float:
    """Device-memory copy rate: bytes read + bytes written per second."""
    dev = torch.device(device)
    nbytes = COPY_BYTES.get(dev.type, 64 * 2**20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    seconds = timed_median_s(lambda: dst.copy_(src), _synchronizer(dev), slowdown=slowdown, budget_s=budget_s)
    return 2.0 * nbytes / seconds


def measure_layer_timings(model_dir: str, device: str, *, dtype: str = "auto", slowdown: float = 1.0,
                          budget_s: float = 1.0, batch_sizes: tuple[int, ...] = DECODE_BATCH_SIZES,
                          context_lengths: tuple[int, ...] = DECODE_CONTEXT_LENGTHS,
                          prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS, backend_name: str = "torch") -> LayerTimings:
    """Time one layer of the model at `model_dir` on `device` with a real stage of backend
    `backend_name` (torch: a `TorchStageBackend` fed tensors on the device; any other: numpy
    inputs through the backend interface). Decode contexts are filled by allocating KV blocks
    (`prepare`; their content does not change the work)."""
    from workers.backend import SequenceChunk, StageConfig, load_backend
    from workers.model_config import ModelConfig
    from workers.torch_backend import TorchStageBackend, resolve_dtype
    import numpy as np

    mc = ModelConfig.from_path(model_dir)
    layer = 1 if mc.num_layers > 2 else 0
    limit = max(1, mc.max_position_embeddings - 1)
    contexts = tuple(sorted({min(c, limit) for c in context_lengths}))
    prefills = tuple(sorted({min(n, limit) for n in prefill_lengths}))
    block = 16
    per_token = mc.kv_bytes_per_token_per_layer(resolve_dtype(dtype, mc))
    decode_tokens = max(batch_sizes) * (-(-(max(contexts) + 1) // block) * block)
    kv_tokens = max(decode_tokens, max(prefills) + block) + 4 * block
    stage = StageConfig(str(model_dir), layer, layer + 1, dtype, device,
                        kv_budget_bytes=per_token * kv_tokens, kv_block_size_tokens=block)
    torch_backend = backend_name == "torch"
    backend = TorchStageBackend(stage, model_config=mc) if torch_backend else load_backend(stage, backend_name)
    dev = torch.device(device if torch_backend else "cpu")
    sync = _synchronizer(dev)  # another backend's forward returns numpy: it has finished
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(rows: int) -> torch.Tensor | np.ndarray:
        if backend.is_first:
            ids = torch.randint(0, mc.vocab_size, (rows,), generator=gen)
            return ids.to(dev) if torch_backend else ids.numpy()
        hidden = torch.randn(rows, mc.hidden_size, generator=gen)
        if torch_backend:
            return hidden.to(dev, backend.torch_dtype)
        from workers.torch_backend import to_numpy

        return to_numpy(hidden.to(getattr(torch, backend.dtype)))

    share_s = budget_s / max(1, len(batch_sizes) * len(contexts) + len(prefills))
    try:
        prefill = []
        for n in prefills:
            x, chunk = inputs(n), [SequenceChunk("prefill", 0, n)]
            seconds = timed_median_s(lambda: backend.forward(chunk, x), sync, slowdown=slowdown,
                                     budget_s=share_s, max_repeats=7)
            prefill.append((n, seconds / n))
            backend.free("prefill")
        decode = []
        ids = [f"decode-{i}" for i in range(max(batch_sizes))]
        for context in contexts:
            backend.prepare([SequenceChunk(rid, 0, context) for rid in ids])
            for batch in sorted(batch_sizes):
                x, chunks = inputs(batch), [SequenceChunk(rid, context, 1) for rid in ids[:batch]]
                seconds = timed_median_s(lambda: backend.forward(chunks, x), sync, slowdown=slowdown,
                                         budget_s=share_s)
                decode.append((batch, context, seconds))
            for rid in ids:
                backend.free(rid)
        return LayerTimings(model=Path(model_dir).name, layer_index=layer,
                            layer_weight_bytes=int(backend.weight_bytes), dtype=str(backend.dtype).removeprefix("torch."),
                            decode_step_s=tuple(decode), prefill_s_per_token=tuple(prefill))
    finally:
        del backend
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the profile
def measure_device(device: str, *, model_dir: str | None = None, seconds_budget: float = 2.0,
                   slowdown: float | None = None, peers: Sequence[str] = ()) -> DeviceProfile:
    """Measure `device` now. `slowdown` None reads `POTLUCK_PROFILE_SLOWDOWN` (default 1.0).
    `peers`: `EchoResponder` addresses to probe (unreachable ones are left out)."""
    factor = env_slowdown() if slowdown is None else float(slowdown)
    if factor < 1.0:
        raise ValueError(f"slowdown must be >= 1, got {factor}")
    begin = time.perf_counter()
    dev = torch.device(device)
    name = device_name(device)
    memory = usable_memory_bytes(device)
    share = seconds_budget * (0.2 if model_dir else 0.5)
    flops = measure_matmul_flops_per_s(device, slowdown=factor, budget_s=share)
    bandwidth = measure_memory_bandwidth_bytes_per_s(device, slowdown=factor, budget_s=share)
    timings = None
    if model_dir is not None:
        timings = measure_layer_timings(model_dir, device, slowdown=factor, budget_s=seconds_budget * 0.6)
    rtt_s, bandwidth_bytes_per_s = measure_peers(peers, slowdown=factor) if peers else ({}, {})
    return DeviceProfile(
        device=device, kind=dev.type, name=name, memory_bytes=int(memory),
        matmul_flops_per_s=flops, matmul_dtype=str(_compute_dtype(dev)).removeprefix("torch."),
        memory_bandwidth_bytes_per_s=bandwidth, measured_at_unix_s=time.time(),
        profile_time_s=time.perf_counter() - begin, slowdown=factor, layer_timings=timings,
        peer_rtt_s=rtt_s, peer_bandwidth_bytes_per_s=bandwidth_bytes_per_s, prior=chip_prior(name),
    )


# ----------------------------------------------------------------------------- CLI
def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(args: argparse.Namespace) -> int:
    """`potluck profile [--device D] [--model DIR]`: print this machine's profile as JSON."""
    device = getattr(args, "device", None) or default_device()
    model = getattr(args, "model", None)
    if model is not None and not (Path(model) / "config.json").is_file():
        print(f"potluck: {model} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    profile = measure_device(device, model_dir=model)
    print(json.dumps(profile.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="measure this machine and print its profile as JSON")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default=None)
    sys.exit(main(parser.parse_args()))
