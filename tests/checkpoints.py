"""Moved to tests/support/checkpoints.py; this name stays until the branches in flight have merged."""
from tests.support.checkpoints import *  # noqa: F401,F403
from tests.support.checkpoints import make_checkpoint  # noqa: F401
