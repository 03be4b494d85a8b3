"""Pinning a CPU worker's threads: checked in a fresh process (pinning is per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.__main__ import build_arg_parser, config_from_args

_PROBE = """
import json, os, torch
torch.set_num_threads(len(os.sched_getaffinity(0)))  # a worker that has the machine to itself
from workers.thread_affinity import find_compute_threads, pin_compute_threads
threads = find_compute_threads()
pinned = pin_compute_threads(threads)
def allowed(tid):
    with open(f"/proc/self/task/{tid}/status") as status:
        line = next(l for l in status if l.startswith("Cpus_allowed_list"))
    return line.split(":")[1].strip()
print(json.dumps({"main": threads.main_tid, "openmp": list(threads.openmp_tids), "cpus": list(threads.cpus),
                  "pinned": {str(t): c for t, c in pinned.items()},
                  "allowed": {str(t): allowed(t) for t in [threads.main_tid, *threads.openmp_tids]}}))
"""


@pytest.mark.slow  # worker subprocesses
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 cores")
def test_main_thread_and_openmp_threads_get_separate_cores():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    cpus = facts["cpus"]
    assert len(facts["openmp"]) == len(cpus) - 1  # the main thread + one OpenMP thread per other core
    assert facts["allowed"][str(facts["main"])] == str(cpus[0])
    openmp_cores = sorted(int(facts["allowed"][str(tid)]) for tid in facts["openmp"])
    assert openmp_cores == cpus[1:]  # one each, none on the main thread's core
    assert {facts["pinned"][str(tid)] for tid in facts["openmp"]} == set(cpus[1:])


def test_pinning_is_on_by_default_and_can_be_turned_off():
    parser = build_arg_parser()
    assert config_from_args(parser.parse_args(["--scheduler", "127.0.0.1:1", "--token", "t" * 32])).pin_threads
    assert not config_from_args(parser.parse_args(["--scheduler", "127.0.0.1:1", "--token", "t" * 32, "--no-pin-threads"])).pin_threads


@pytest.mark.slow  # worker subprocesses
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 cores")
def test_workers_with_fewer_threads_than_cores_are_not_pinned():
    probe = "import torch; torch.set_num_threads(1); from workers.thread_affinity import find_compute_threads; print(find_compute_threads())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "None"
