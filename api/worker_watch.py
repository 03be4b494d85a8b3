"""`potluck serve` fails fast: local workers that die or cannot load their layers while starting.

Parts:
- `StartupVerdict`: what serving looks like now: `waiting`, `serving` (with the missing workers),
  or `failed` (no worker left to serve on), each with one line to print.
- `startup_verdict(local_ids, cluster, others_expected)`: the decision, pure over the
  cluster's state (`Cluster.failures` and each registered worker's load error).
- `watch_local_workers(engine, workers, on_failed, ...)`: every `poll_s` records local workers
  that ended (exit status, last stderr line) and those whose layers failed to load in the
  cluster's failure record; when some came up, it serves on them (the failed ones leave the plan)
  and says what is missing; when none can before any route was usable, it calls `on_failed(line)`
  (serve then exits with `ExitCode.WORKERS_FAILED`); later deaths are recorded and printed only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.local_workers import LocalWorkers
    from scheduler.cluster import Cluster

log = logging.getLogger("potluck")


@dataclass(frozen=True)
class StartupVerdict:
    state: str  # waiting | serving | failed
    line: str = ""
    failed_ids: tuple[str, ...] = ()


def _reasons(cluster: Cluster, ids: Sequence[str]) -> str:
    """`a, b: reason; c: other reason` (workers grouped by reason)."""
    by_reason: dict[str, list[str]] = {}
    for wid in ids:
        by_reason.setdefault(cluster.failures[wid].reason, []).append(wid)
    return "; ".join(f"{', '.join(wids)}: {reason}" for reason, wids in by_reason.items())


def startup_verdict(local_ids: Sequence[str], cluster: Cluster, others_expected: bool = False) -> StartupVerdict:
    failed = tuple(wid for wid in local_ids if wid in cluster.failures)
    if not failed:
        return StartupVerdict("serving" if cluster.usable_routes() else "waiting")
    healthy = [w for wid, w in cluster.workers.items() if wid not in cluster.failures and w.error is None]
    if cluster.usable_routes() or (healthy and all(w.is_ready for w in healthy)):
        return StartupVerdict("serving", f"serving without {_reasons(cluster, failed)}", failed)
    if len(failed) == len(local_ids) and not healthy and not others_expected:
        noun = "the local worker" if len(failed) == 1 else f"all {len(failed)} local workers"
        return StartupVerdict("failed", f"{noun} failed to start: {_reasons(cluster, failed)}", failed)
    return StartupVerdict("waiting", "", failed)


def _record(engine: Any, workers: LocalWorkers) -> bool:
    """Record what failed since the last look; True when something new failed."""
    cluster = engine.cluster
    new = False
    for wid, (code, last_line) in workers.exited().items():
        if wid not in cluster.failures:
            reason = last_line.removeprefix(f"potluck worker {wid}: ") if last_line else f"exited with status {code}"
            cluster.record_failure(wid, reason if code else f"exited: {reason}")
            new = True
    for wid, state in cluster.workers.items():
        if state.error and wid not in cluster.failures:
            cluster.record_failure(wid, f"cannot load layers {list(state.assigned or ())}: {state.error}")
            new = True
    return new


async def watch_local_workers(engine: Any, workers: LocalWorkers, on_failed: Callable[[str], None], *,
                              others_expected: bool = False, poll_s: float = 0.2) -> None:
    """Until serving is settled (or forever after, for workers that die later: they are recorded)."""
    local_ids = list(workers.ids)
    if not local_ids:
        return
    announced: set[str] = set()
    replanned_for: frozenset[str] = frozenset()
    served = False  # once a route was usable, workers that die later are recorded, never fatal
    while True:
        await asyncio.sleep(poll_s)
        served = served or bool(engine.cluster.usable_routes())
        if not _record(engine, workers):
            if announced or engine.cluster.usable_routes() or not engine.cluster.failures:
                continue
        verdict = startup_verdict(local_ids, engine.cluster, others_expected)
        if verdict.state == "failed" and not served:
            on_failed(verdict.line)
            return
        failed_now = set(verdict.failed_ids)
        for wid in failed_now & set(engine.cluster.workers):  # out of the plan: serve on the others
            if not engine.cluster.workers[wid].draining:
                engine.drain(wid)
        remaining = [wid for wid in local_ids if wid not in failed_now]
        registered = all(wid in engine.cluster.workers for wid in remaining)
        if failed_now and remaining and registered and failed_now != replanned_for and not engine.cluster.usable_routes():
            replanned_for = frozenset(failed_now)
            engine.replan()  # the scheduler waits for every expected worker: plan for those that came
        if verdict.state == "serving" and failed_now - announced:
            print(f"potluck: {verdict.line}", flush=True)
            announced |= failed_now
