"""Fixtures for placement tests (the problems themselves: tests/support/problems.py)."""
from __future__ import annotations

import pytest

from placement.problem import PlacementProblem
from tests.support.problems import random_problem


@pytest.fixture
def small_problem() -> PlacementProblem:
    return random_problem(1, 3, 4)
