"""Fixtures for the OpenAI-layer tests: one TinyEngine and one real uvicorn server per session (used on demand)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from api.server import create_app
from engine_fixture import TinyEngine, running_server, write_tokenizer_dir

API_KEY = "sk-test-potluck"


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return TinyEngine(write_tokenizer_dir(Path(tmp_path_factory.mktemp("model")), "chatml"))


@pytest.fixture(scope="session")
def base_url(engine: TinyEngine) -> Iterator[str]:
    with running_server(create_app(engine, api_key=API_KEY)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture()
def reset_faults(engine: TinyEngine) -> Iterator[None]:
    """Use in modules that inject faults into the TinyEngine (not autouse: other API tests have their own engines)."""
    yield
    engine.reject_with = None
    engine.fail_after_tokens = None
    engine.step_delay_s = 0.0
