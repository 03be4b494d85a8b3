"""The solver's clock: wall seconds, or a fixed budget of work that no machine's speed changes.

Parts:
- ``now()``: the time on the clock in force, in seconds: ``time.monotonic()``, or the work done
  so far under ``work_budget()``.
- ``limit(solver, seconds)``: bound one CP-SAT solve by ``seconds`` of that clock: wall
  (``max_time_in_seconds``) or work (``max_deterministic_time``, CP-SAT's own count of work, with
  one search worker so the search is the same on every machine).
- ``charge(solver)``: after a solve, advance the work clock by the solve's deterministic time.
- ``work_budget()``: a context manager under which every deadline of the solver is in work
  seconds: each ``now()`` reading (one step of a heuristic loop: a move tried, a target probed)
  costs ``STEP_S``, each CP-SAT solve its deterministic time. Quality tests run under it, so a
  loaded machine gets the same answer, only later (the wall clock stays for the scheduler, which
  must answer in time).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ortools.sat.python import cp_model

# One heuristic step: about what a move with an exact max-flow evaluation costs on the 2-core
# VM the placement figures were measured on (docs/performance-notes.md).
STEP_S = 2e-4


@dataclass
class _Work:
    spent_s: float = 0.0


_work: ContextVar[_Work | None] = ContextVar("placement_work", default=None)


def now() -> float:
    work = _work.get()
    if work is None:
        return time.monotonic()
    work.spent_s += STEP_S
    return work.spent_s


def limit(solver: cp_model.CpSolver, seconds: float) -> None:
    if _work.get() is None:
        solver.parameters.max_time_in_seconds = seconds
    else:
        solver.parameters.max_deterministic_time = seconds
        solver.parameters.num_workers = 1


def charge(solver: cp_model.CpSolver) -> None:
    work = _work.get()
    if work is not None:
        work.spent_s += solver.deterministic_time


@contextmanager
def work_budget() -> Iterator[None]:
    token = _work.set(_Work())
    try:
        yield
    finally:
        _work.reset(token)
