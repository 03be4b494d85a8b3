"""Log lines for repeated bad input, throttled: the first of a kind is logged, then at most one per
interval with how many were suppressed, so a flood of bad messages cannot flood the log.

Parts:
- `LogThrottle(interval_s)`: `.warning(logger, key, fmt, *args)` logs when the key's interval has passed.
"""

from __future__ import annotations

import logging
import threading
import time


class LogThrottle:
    def __init__(self, interval_s: float = 30.0, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, logger: logging.Logger, key: str, fmt: str, *args: object) -> None:
        now_s = time.monotonic()
        with self._lock:
            last_s = self._last_s.get(key)
            if last_s is not None and now_s - last_s < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            if len(self._last_s) >= self.max_keys:  # bounded: forget the oldest kinds
                for old in sorted(self._last_s, key=self._last_s.__getitem__)[: self.max_keys // 2]:
                    self._last_s.pop(old, None)
                    self._suppressed.pop(old, None)
            self._last_s[key] = now_s
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fmt += f" ({suppressed} more like it in the last {self.interval_s:.0f} s not logged)"
        logger.warning(fmt, *args)
