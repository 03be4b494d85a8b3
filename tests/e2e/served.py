"""Moved to tests/support/served.py; this name stays until the branches in flight have merged."""
from tests.support.served import *  # noqa: F401,F403
from tests.support.served import ServedModel, free_port  # noqa: F401
