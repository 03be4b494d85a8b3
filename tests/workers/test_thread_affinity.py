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
torch.set_num_threads(2)
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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 cores")
def test_main_thread_and_openmp_threads_get_separate_cores():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(facts["openmp"]) == 1  # 2 torch threads: the main one + one OpenMP thread
    first, second = facts["cpus"][0], facts["cpus"][1]
    assert facts["allowed"][str(facts["main"])] == str(first)
    assert facts["allowed"][str(facts["openmp"][0])] == str(second)
    assert facts["pinned"][str(facts["openmp"][0])] == second


def test_pinning_is_on_by_default_and_can_be_turned_off():
    parser = build_arg_parser()
    assert config_from_args(parser.parse_args(["--scheduler", "127.0.0.1:1"])).pin_threads
    assert not config_from_args(parser.parse_args(["--scheduler", "127.0.0.1:1", "--no-pin-threads"])).pin_threads
