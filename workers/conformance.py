"""The backend conformance suite: `python -m workers.conformance NAME` checks an installed backend.

Parts:
- `run_suite(backend, root, device, only)`: runs the checks of workers/conformance_checks.py
  against the backend registered as `backend` (entry-point group `potluck.backends`), each on its
  own; returns one `CheckResult` per check (passed, or the one-line reason it failed).
- `main(argv)`: the command line; prints one line per check and exits 1 if any failed.

A backend package runs it against itself in its own CI (`python -m workers.conformance mybackend`),
or from pytest: `run_suite` in a test, one parametrized case per `CHECKS` name (potluck's own
tests/workers/test_conformance.py does that for torch, mlx and the example numpy backend).
It needs `transformers` (the reference) and torch (the other side of the mixed pipelines).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.conformance_checks import CHECKS, Suite


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    seconds: float
    error: str = ""


def run_suite(backend: str, root: Path, device: str | None = None, only: Sequence[str] = ()) -> list[CheckResult]:
    suite = Suite(backend, Path(root), device)
    results = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        begin = time.perf_counter()
        try:
            check(suite)
        except Exception as exc:  # a failed check is reported, the others still run
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reason = f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
            results.append(CheckResult(name, False, time.perf_counter() - begin, reason))
        else:
            results.append(CheckResult(name, True, time.perf_counter() - begin))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.conformance", description="check a potluck backend")
    parser.add_argument("backend", help="name the backend registers under potluck.backends")
    parser.add_argument("--device", default=None, help="device to test on (default: the backend's first)")
    parser.add_argument("--only", action="append", default=[], choices=sorted(CHECKS), help="run only this check (repeatable)")
    parser.add_argument("--dir", default=None, help="where tiny checkpoints are built (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="potluck-conformance-") as tmp:
        results = run_suite(args.backend, Path(args.dir or tmp), args.device, args.only)
    for result in results:
        status = "ok  " if result.passed else "FAIL"
        print(f"{status} {result.name:<28} {result.seconds:6.2f} s  {result.error}")
    failed = [r.name for r in results if not r.passed]
    print(f"{args.backend}: {len(results) - len(failed)}/{len(results)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
