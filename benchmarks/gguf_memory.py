"""Worker memory on a GGUF: each stage of an N-worker split loaded in its own process, its peak
resident memory above the process's baseline (torch imported, nothing loaded) printed against the
bound of issue 12: 1.1 x the bytes of its tensors in the file + 200 MB.

    python benchmarks/gguf_memory.py [--model FILE.gguf] [--workers 1 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_stage(model: str, start: int, end: int) -> dict:
    """In this process: baseline RSS, then load the stage; peak RSS (VmHWM) and held weight bytes."""
    import torch  # noqa: F401  (part of the baseline)

    from workers.backend import StageConfig
    from workers.checkpoint import stage_tensor_names
    from workers.gguf_file import open_gguf
    from workers.model_config import ModelConfig

    config = ModelConfig.from_path(model)
    gguf_model = open_gguf(str(Path(model).resolve()))
    names = stage_tensor_names(set(gguf_model.tensors), start, end, config.num_layers, config.tie_word_embeddings)
    file_bytes = sum(gguf_model.tensors[n].num_bytes for n in names)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    baseline = _rss_bytes()
    from workers.torch_backend import TorchStageBackend

    backend = TorchStageBackend(StageConfig(model, start, end, kv_budget_bytes=1 << 20))
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {
        "layers": [start, end],
        "file_bytes": file_bytes,
        "held_weight_bytes": int(backend.model.weight_bytes),
        "resident_after_load_bytes": _rss_bytes() - baseline,
        "peak_above_baseline_bytes": peak - baseline,
        "bound_bytes": int(1.1 * file_bytes + 200e6),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--stage", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from api.demo_model import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    if args.stage:
        print(json.dumps(measure_stage(args.model, *args.stage)))
        return
    from workers.model_config import ModelConfig

    num_layers = ModelConfig.from_path(args.model).num_layers
    for workers in args.workers:
        bounds = [round(i * num_layers / workers) for i in range(workers + 1)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--stage", str(start), str(end)],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            mb = {k: v / 1e6 for k, v in row.items() if k.endswith("_bytes")}
            verdict = "within" if row["peak_above_baseline_bytes"] <= row["bound_bytes"] else "ABOVE"
            print(
                f"{workers} worker(s), layers [{start}, {end}): file {mb['file_bytes']:.1f} MB, weights held "
                f"{mb['held_weight_bytes']:.1f} MB, resident after load +{mb['resident_after_load_bytes']:.1f} MB, "
                f"peak +{mb['peak_above_baseline_bytes']:.1f} MB; bound {mb['bound_bytes']:.1f} MB: {verdict}",
                flush=True,
            )


if __name__ == "__main__":
    main()
