"""The backend conformance suite (workers/conformance.py) against the in-tree backends: torch, mlx.

One case per (backend, check). The example out-of-tree backend runs the same suite from its own
installation in tests/e2e/test_example_backend.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.backend_plugins import BackendNotFound, discover, get_plugin, resolve_backend
from workers.conformance import run_suite
from workers.conformance_checks import CHECKS

pytestmark = pytest.mark.slow
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not get_plugin("mlx").devices(), reason="mlx is not installed"))]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend: str, check: str, root: Path) -> None:
    (result,) = run_suite(backend, root, only=[check])
    assert result.passed, result.error


def test_in_tree_backends_register_through_the_entry_point_group() -> None:
    assert {"torch", "mlx"} <= set(discover())
    assert get_plugin("torch").name == "torch" and "cpu" in get_plugin("torch").devices()
    assert resolve_backend("auto").name in discover()
    with pytest.raises(BackendNotFound, match="no backend named 'nope' is installed"):
        get_plugin("nope")
