"""The GGUF block kernel (workers/gguf_kernel.c), compiled on first use and called through ctypes.

Parts:
- `GGML_TYPE_IDS`: GGUF type name -> ggml's type number (what the C code switches on).
- `native_kernel()`: the loaded library, or None when it cannot be built here (no C compiler,
  `POTLUCK_NATIVE_KERNEL=0`); callers then fall back to torch's int4 kernel. Built once per source
  and machine into `~/.cache/potluck/kernels` (`POTLUCK_CACHE_DIR` overrides) with the system C
  compiler (`cc`, `-O3 -march=native -fopenmp`), written to a temporary name and renamed, so
  workers starting together never load a half-written file.
- `gguf_matmul(x, raw, type_name, out)`: float32 x [M, K] @ dequantize(raw [out, row bytes])^T.
- `gguf_dequantize_rows(raw, type_name, ids, k)`: float32 [len(ids), k] rows of a GGUF table.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
_SOURCE = Path(__file__).with_name("gguf_kernel.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    return Path(os.environ.get("POTLUCK_CACHE_DIR") or Path.home() / ".cache" / "potluck") / "kernels"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [os.environ.get("CC", "cc"), *_FLAGS, str(_SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def native_kernel() -> ctypes.CDLL | None:
    """The compiled GGUF kernel, or None (logged once) when it is turned off or cannot be built."""
    if os.environ.get("POTLUCK_NATIVE_KERNEL", "1") == "0":
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + platform.machine().encode() + _cpu_flags()).hexdigest()
    target = _cache_dir() / f"gguf_kernel-{key[:16]}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        _log.warning("GGUF C kernel unavailable (%s %s); using torch's int4 kernel", error, detail.decode()[-300:])
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gguf_matmul.argtypes = [ptr, i64, i64, ptr, i64, i64, ctypes.c_int, ptr, i64, ctypes.c_int]
    lib.gguf_matmul.restype = ctypes.c_int
    lib.gguf_dequantize_rows.argtypes = [ptr, i64, ctypes.c_int, i64, ptr, i64, ptr]
    lib.gguf_dequantize_rows.restype = ctypes.c_int
    return lib


def _cpu_flags() -> bytes:
    """The CPU's feature flags (`-march=native` code is only reused on the same kind of CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, type_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [M, K] contiguous, raw uint8 [N, row bytes] -> float32 [M, N] (into `out`, which may
    be a column slice of a wider contiguous-row tensor)."""
    lib = native_kernel()
    m, k = x.shape
    n = raw.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=torch.float32)
    status = lib.gguf_matmul(
        x.data_ptr(), m, k, raw.data_ptr(), n, raw.shape[1], GGML_TYPE_IDS[type_name], out.data_ptr(),
        out.stride(0), torch.get_num_threads(),
    )
    if status:
        raise ValueError(f"{type_name} weight of row bytes {raw.shape[1]} does not hold {k} inputs")
    return out


def gguf_dequantize_rows(raw: np.ndarray, type_name: str, ids: np.ndarray, k: int) -> torch.Tensor:
    """float32 [len(ids), k]: rows `ids` of the GGUF table raw [rows, row bytes], dequantized."""
    lib = native_kernel()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = torch.empty((len(ids), k), dtype=torch.float32)
    status = lib.gguf_dequantize_rows(raw.ctypes.data, raw.shape[1], GGML_TYPE_IDS[type_name], k, ids.ctypes.data, len(ids), out.data_ptr())
    if status:
        raise ValueError(f"{type_name} rows of {raw.shape[1]} bytes do not hold {k} values")
    return out
