"""Pinning a CPU worker's compute threads: its Python thread on one core, torch's OpenMP threads
on the others.

Parts:
- `ComputeThreads`: the ids of the main thread and of torch's OpenMP threads, and the cores the
  process may use.
- `find_compute_threads()`: starts torch's OpenMP pool (one parallel GEMM) and tells its threads
  from the others by the thread ids that appeared; None where there is nothing to pin (not
  Linux, one core, or fewer torch threads than cores: workers that split a machine's cores are
  left to the kernel, which spreads them).
- `pin_compute_threads(threads)`: OpenMP thread i -> one of the cores after the first (round
  robin); every other thread of the process (main, ZeroMQ's, the heartbeat) -> the first core,
  where threads started later inherit it from the main thread.

Why: workers of a co-located ring wake one after another at every hop. Left to the kernel, a
waking stage's main thread and its OpenMP thread can land on the same core and share it for a
while (every layer then runs ~2x slower). Measured with 3 workers on 2 cores, one stream, 1 and
3 workers interleaved over 8 rounds per run: 3 workers vs 1 worker 0.84x on average over 10
runs pinned, 0.79x over 9 runs not pinned; single runs range 0.78-0.88 and 0.66-0.86 (noisy VM).
The spine benchmark (5-9 interleaved rounds) gave 0.79-0.80x pinned, 0.78x before: a small gain
at most on this machine, kept because it costs nothing measurable (16 streams unchanged).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

_TASKS = "/proc/self/task"


@dataclass(frozen=True)
class ComputeThreads:
    main_tid: int
    openmp_tids: tuple[int, ...]
    cpus: tuple[int, ...]  # cores the process may run on, in order


def _thread_ids() -> set[int]:
    return {int(name) for name in os.listdir(_TASKS)}


def find_compute_threads() -> ComputeThreads | None:
    """Call before anything else runs torch in parallel (the pool must start here to be seen)."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir(_TASKS):
        return None
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2 or torch.get_num_threads() < len(cpus):
        return None  # fewer threads than cores (several workers share them): the kernel spreads them
    before = _thread_ids()
    matrix = torch.ones(512, 512)
    for _ in range(2):
        matrix @ matrix  # a GEMM this size runs on every OpenMP thread
    openmp = tuple(sorted(_thread_ids() - before))
    if not openmp:
        return None
    return ComputeThreads(threading.get_native_id(), openmp, cpus)


def pin_compute_threads(threads: ComputeThreads) -> dict[int, int]:
    """Pin as described above; returns {thread id: core} of the threads pinned (gone ones skipped)."""
    placement = {tid: threads.cpus[0] for tid in _thread_ids() - set(threads.openmp_tids)}
    others = threads.cpus[1:]
    for index, tid in enumerate(threads.openmp_tids):
        placement[tid] = others[index % len(others)]
    pinned = {}
    for tid, cpu in placement.items():
        try:
            os.sched_setaffinity(tid, {cpu})
        except (ProcessLookupError, PermissionError, OSError):
            continue
        pinned[tid] = cpu
    return pinned
