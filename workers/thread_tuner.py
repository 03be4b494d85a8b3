"""How many torch threads a small (decode) step runs on, chosen by timing steps on this machine.

Parts:
- `ThreadTuner(max_threads)`: `threads_for(rows)` says how many threads the next step of `rows`
  rows runs on; `record(rows, threads, seconds)` reports how long it took. Steps of more than
  `max_rows` rows (prefill) always get every thread. For smaller steps the first calls alternate
  one thread and `max_threads` (`trials_per_choice` timings each), then the faster (least time
  seen) runs the next `retune_steps` steps, after which both are timed again (the load on a
  shared machine changes).

Why: a decode step at a few rows reads every weight once and is bound by memory bandwidth, which
one core may nearly saturate, while each linear layer on several OpenMP threads ends in a barrier.
When other processes hold the cores (a shared VM, co-located workers), a thread that waits for a
descheduled peer stalls every layer: SmolLM2 fp32 decode, one row, measured interleaved on a
2-core VM at load average 19: 1 thread 289 ms a step, 2 threads 3,875 ms. On a quiet machine two
threads can be faster; hence measured, not fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TUNED_ROWS = 16
TRIALS_PER_CHOICE = 2
RETUNE_STEPS = 256


@dataclass
class _Bucket:
    """Timings and choice for one range of row counts."""

    trials: dict[int, list[float]] = field(default_factory=dict)
    choice: int | None = None
    steps_since_choice: int = 0


class ThreadTuner:
    def __init__(
        self,
        max_threads: int,
        max_rows: int = MAX_TUNED_ROWS,
        trials_per_choice: int = TRIALS_PER_CHOICE,
        retune_steps: int = RETUNE_STEPS,
    ) -> None:
        if max_threads < 1 or trials_per_choice < 1 or retune_steps < 1:
            raise ValueError("max_threads, trials_per_choice and retune_steps must be >= 1")
        self.max_threads = max_threads
        self.max_rows = max_rows
        self.trials_per_choice = trials_per_choice
        self.retune_steps = retune_steps
        self.candidates = (1, max_threads) if max_threads > 1 else (1,)
        self._buckets: dict[int, _Bucket] = {}

    @staticmethod
    def _bucket_key(rows: int) -> int:
        return 1 if rows <= 1 else (rows - 1).bit_length()  # 1 | 2 | 3-4 | 5-8 | 9-16

    def threads_for(self, rows: int) -> int:
        if rows > self.max_rows or len(self.candidates) == 1:
            return self.max_threads
        bucket = self._buckets.setdefault(self._bucket_key(rows), _Bucket())
        if bucket.choice is not None:
            return bucket.choice
        # the candidate with the fewest timings so far (ties: the first, one thread)
        return min(self.candidates, key=lambda n: len(bucket.trials.get(n, ())))

    def record(self, rows: int, threads: int, seconds: float) -> None:
        if rows > self.max_rows or threads not in self.candidates or len(self.candidates) == 1:
            return
        bucket = self._buckets.setdefault(self._bucket_key(rows), _Bucket())
        if bucket.choice is not None:
            bucket.steps_since_choice += 1
            if bucket.steps_since_choice >= self.retune_steps:
                self._buckets[self._bucket_key(rows)] = _Bucket()  # time both again
            return
        bucket.trials.setdefault(threads, []).append(seconds)
        if all(len(bucket.trials.get(n, ())) >= self.trials_per_choice for n in self.candidates):
            bucket.choice = min(self.candidates, key=lambda n: min(bucket.trials[n]))

    def choice(self, rows: int) -> int | None:
        """The settled thread count for steps of `rows` rows (None: still timing)."""
        if rows > self.max_rows:
            return self.max_threads
        bucket = self._buckets.get(self._bucket_key(rows))
        return bucket.choice if bucket is not None else None
