"""Candidate CPU kernels for a quantized linear layer, timed side by side on SmolLM2-135M's shapes.

    python -m benchmarks.gguf_kernels [--threads 2] [--calls 40] [--types Q8_0 Q5_0 Q4_K Q6_K]

Per weight shape [out x in] and activation rows M (1: one decode stream, 16: sixteen), the lower
quartile of `--calls` timed calls (ms) of: the C block kernel on the type's GGUF blocks
(workers/native_kernel.py), torch's `_weight_int4pack_mm_for_cpu` with one 4-bit plane (what a
4-bit type costs) and two (what Q5_x / Q8_0 cost as planes), `_weight_int8pack_mm` (per-channel
scales only: no exact form for GGUF's per-32 scales), fbgemm's dynamic int8 linear (activations
quantized per call: not exact either), and a dense float32 matmul. Each weight is timed hot in
cache: these figures compare compute, not the memory traffic of a whole model. Figures belong in
docs/quantized_kernels.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.native_kernel import gguf_matmul, native_kernel  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # SmolLM2: o, up/gate, down, LM head


def _quartile_ms(call, calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 4] * 1e3


def _blocks(type_name: str, out: int, inn: int, rng: np.random.Generator) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType[type_name]
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        raw = gguf.quants.quantize(rng.standard_normal((out, inn)).astype(np.float32) * 0.05, qtype)
    except NotImplementedError:  # K-quants gguf cannot write: random blocks (timing only)
        raw = rng.integers(0, 256, (out, inn // elems * nbytes), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if native_kernel() is None:
        raise SystemExit("error: the C block kernel could not be built here (see the warning above)")
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}; ms, lower quartile of {args.calls} calls; C kernel per type, then the others")
    print(f"{'shape':>10} {'M':>3} " + " ".join(f"{t:>7}" for t in args.types)
          + f" {'int4x1':>7} {'int4x2':>7} {'int8pc':>7} {'dyn8':>7} {'f32':>7}")
    for out, inn in SHAPES:
        raws = {t: _blocks(t, out, inn, rng) for t in args.types if inn % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0}
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out, inn), dtype=torch.int32), 1)
        scales_and_zeros = (torch.rand(inn // 32, out, 2) * 0.01).bfloat16()
        w8, s8 = torch.randint(-127, 127, (out, inn), dtype=torch.int8), torch.rand(out).bfloat16()
        weight = torch.randn(out, inn)
        linear = torch.nn.Linear(inn, out, bias=False)
        linear.weight.data = weight
        dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
        w_t = weight.t().contiguous()
        for m in (1, 16):
            x = torch.randn(m, inn)
            x16 = x.bfloat16()
            int4 = torch.ops.aten._weight_int4pack_mm_for_cpu
            cells = [f"{_quartile_ms(lambda r=raw, t=t: gguf_matmul(x, r, t), args.calls):7.3f}" if t in raws else f"{'-':>7}"
                     for t, raw in ((t, raws.get(t)) for t in args.types)]
            others = [
                lambda: int4(x16, packed, 32, scales_and_zeros),
                lambda: int4(x16, packed, 32, scales_and_zeros).float().add_(int4(x16, packed, 32, scales_and_zeros)),
                lambda: torch.ops.aten._weight_int8pack_mm(x16, w8, s8),
                lambda: dynamic(x),
                lambda: torch.mm(x, w_t),
            ]
            cells += [f"{_quartile_ms(call, args.calls):7.3f}" for call in others]
            print(f"{out}x{inn:<4} {m:>3} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
