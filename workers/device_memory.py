"""What a device is and how much memory a worker may use on it, per platform.

Parts:
- Pure parsers, tested on recorded outputs (hardware CI lacks):
  `parse_sysctl_memsize(text)` (`sysctl hw.memsize` or `sysctl -n hw.memsize`),
  `parse_sysctl_brand(text)` (`sysctl -n machdep.cpu.brand_string`),
  `parse_cpuinfo_model(text)` (/proc/cpuinfo), `parse_meminfo_available_bytes(text)` (/proc/meminfo).
- Pure usable-memory rules: `nvml_usable_bytes(total, used, reserved_fraction)`,
  `cuda_free_usable_bytes(free, total, reserved_fraction)`,
  `apple_usable_bytes(recommended_max_bytes, memsize_bytes, reserved_fraction)`,
  `cpu_usable_bytes(available, reserved_fraction)`.
- Readers that call the platform (each falls back quietly when a source is missing):
  `cuda_usable_bytes(device)` (NVML via pynvml / nvidia-ml-py when importable, and
  `torch.cuda.mem_get_info`; the smaller wins), `mps_usable_bytes()`, `host_usable_bytes()`,
  `usable_memory_bytes(device)`, `device_name(device)` ("cpu: AMD EPYC", "cuda: NVIDIA ...").
- `KNOWN_CHIPS` (of `ChipPrior`, workers/device_profile.py) + `chip_prior(name)`: vendor peak figures of a few chips. They are a
  prior only (a sanity reference next to the measurement); measured figures always win.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import torch

from workers.device_profile import ChipPrior

GIB = 2**30
DEFAULT_RESERVED_FRACTION = 0.05  # left for the runtime, other processes, fragmentation


# ----------------------------------------------------------------------------- pure parsers
def parse_sysctl_memsize(text: str) -> int:
    """Bytes of RAM from `sysctl hw.memsize` ("hw.memsize: 68719476736") or `sysctl -n hw.memsize`."""
    match = re.search(r"(?:hw\.memsize\s*[:=]\s*)?(\d+)\s*$", text.strip())
    if not match:
        raise ValueError(f"cannot read hw.memsize from {text!r}")
    return int(match.group(1))


def parse_sysctl_brand(text: str) -> str:
    """CPU brand from `sysctl -n machdep.cpu.brand_string` (or the `name: value` form)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if line.startswith("machdep.cpu.brand_string"):
        line = line.split(":", 1)[1] if ":" in line else line.split("=", 1)[-1]
    brand = line.strip()
    if not brand:
        raise ValueError(f"cannot read a brand string from {text!r}")
    return brand


def parse_cpuinfo_model(text: str) -> str:
    """The CPU model from /proc/cpuinfo: "model name" (x86), else "Model" (if not a bare number),
    "Hardware", "cpu model" or "CPU part" (ARM / other Linux)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "model", "hardware", "cpu model", "cpu part"):
        if fields.get(key) and not (key == "model" and fields[key].isdigit()):
            return " ".join(fields[key].split())
    raise ValueError("no CPU model in /proc/cpuinfo text")


def parse_meminfo_available_bytes(text: str) -> int:
    """`MemAvailable` from /proc/meminfo (kB) in bytes."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    if not match:
        raise ValueError("no MemAvailable line in /proc/meminfo text")
    return int(match.group(1)) * 1024


# ----------------------------------------------------------------------------- usable-memory rules
def nvml_usable_bytes(total: int, used: int, reserved_fraction: float = DEFAULT_RESERVED_FRACTION) -> int:
    """NVML `nvmlDeviceGetMemoryInfo` figures -> bytes a worker may take (free less a reserve)."""
    if total <= 0 or used < 0:
        raise ValueError(f"implausible NVML memory figures total={total} used={used}")
    return max(0, int(total) - int(used) - int(reserved_fraction * total))


def cuda_free_usable_bytes(free: int, total: int, reserved_fraction: float = DEFAULT_RESERVED_FRACTION) -> int:
    """`torch.cuda.mem_get_info()` -> (free, total) -> bytes a worker may take."""
    if total <= 0 or not 0 <= free <= total:
        raise ValueError(f"implausible CUDA memory figures free={free} total={total}")
    return max(0, int(free) - int(reserved_fraction * total))


def apple_usable_bytes(recommended_max_bytes: int | None, memsize_bytes: int | None,
                       reserved_fraction: float = 0.25) -> int:
    """Apple Silicon (unified memory): Metal's recommended working set if known (it already leaves
    room for the OS), else `hw.memsize` less `reserved_fraction`; never more than `hw.memsize`."""
    if recommended_max_bytes:
        return int(min(recommended_max_bytes, memsize_bytes or recommended_max_bytes))
    if memsize_bytes:
        return int(memsize_bytes * (1.0 - reserved_fraction))
    raise ValueError("neither recommended_max_memory nor hw.memsize is known")


def cpu_usable_bytes(available: int, reserved_fraction: float = 0.10) -> int:
    """psutil `virtual_memory().available` less a share for the rest of the machine."""
    if available < 0:
        raise ValueError(f"negative available memory {available}")
    return int(available * (1.0 - reserved_fraction))


# ----------------------------------------------------------------------------- platform readers
def _run(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml_memory(index: int) -> tuple[str, int, int] | None:
    """(name, total, used) from NVML for the torch device `index`, or None if NVML is unusable."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            handle = None
            if uuid is not None:  # survives CUDA_VISIBLE_DEVICES renumbering
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            elif index == 0 and torch.cuda.device_count() == 1:
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            if handle is None:
                return None
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            return name, int(info.total), int(info.used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means: use torch's figure
        return None


def cuda_usable_bytes(device: str = "cuda") -> int:
    """NVML figure and `torch.cuda.mem_get_info` figure; the smaller (more cautious) one."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    usable = cuda_free_usable_bytes(int(free), int(total))
    nvml = _nvml_memory(index)
    if nvml is not None:
        usable = min(usable, nvml_usable_bytes(nvml[1], nvml[2]))
    return usable


def _sysctl_memsize() -> int | None:
    text = _run(["sysctl", "-n", "hw.memsize"])
    try:
        return parse_sysctl_memsize(text) if text else None
    except ValueError:
        return None


def mps_usable_bytes() -> int:
    recommended = None
    if hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        try:
            recommended = int(torch.mps.recommended_max_memory())
        except RuntimeError:
            recommended = None
    return apple_usable_bytes(recommended, _sysctl_memsize())


def host_usable_bytes() -> int:
    try:
        import psutil

        return cpu_usable_bytes(int(psutil.virtual_memory().available))
    except ImportError:
        return cpu_usable_bytes(parse_meminfo_available_bytes(Path("/proc/meminfo").read_text()))


def usable_memory_bytes(device: str) -> int:
    """Bytes a worker may use on `device` ("cpu", "cuda", "cuda:N", "mps")."""
    if device.startswith("cuda"):
        return cuda_usable_bytes(device)
    if device == "mps":
        return mps_usable_bytes()
    return host_usable_bytes()


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        try:
            return parse_cpuinfo_model(cpuinfo.read_text())
        except ValueError:
            pass
    if platform.system() == "Darwin":
        text = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if text:
            return parse_sysctl_brand(text)
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str) -> str:
    """"<kind>: <model>", e.g. "cpu: AMD EPYC", "cuda: NVIDIA GeForce RTX 4090", "mps: Apple M2 Ultra"."""
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    if device == "mps":
        return f"mps: {cpu_name()}"
    return f"cpu: {cpu_name()}"


# ----------------------------------------------------------------------------- known chips (prior)
KNOWN_CHIPS: tuple[ChipPrior, ...] = (
    ChipPrior("RTX 3090", 71e12, 936e9, 24 * GIB),
    ChipPrior("RTX 4090", 165e12, 1008e9, 24 * GIB),
    ChipPrior("A100", 312e12, 2039e9, 80 * GIB),
    ChipPrior("H100 PCIe", 756e12, 2000e9, 80 * GIB),
    ChipPrior("H100", 989e12, 3350e9, 80 * GIB),
    ChipPrior("H200", 989e12, 4800e9, 141 * 10**9),
    ChipPrior("M1 Max", 10.4e12, 400e9, None),
    ChipPrior("M1 Ultra", 21e12, 800e9, None),
    ChipPrior("M2 Max", 13.6e12, 400e9, None),
    ChipPrior("M2 Ultra", 27.2e12, 800e9, None),
    ChipPrior("M3 Ultra", 28e12, 819e9, None),
    ChipPrior("M4 Max", 18e12, 546e9, None),
)


def chip_prior(name: str) -> ChipPrior | None:
    """The known chip whose name occurs in `name` (longest match), or None."""
    hits = [c for c in KNOWN_CHIPS if c.chip.lower() in name.lower()]
    return max(hits, key=lambda c: len(c.chip)) if hits else None
