"""`stop_within`: a worker stopped by Ctrl-C ends even when its clean-up blocks."""

from __future__ import annotations

import subprocess
import sys


def test_a_blocked_clean_up_still_ends_the_process_with_130() -> None:
    code = "import threading, workers.worker as w; w.stop_within(0.5); threading.Event().wait()"  # blocks forever
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert "exiting now" in done.stderr
