"""Shared fixtures for the whole suite: tiny random-weight checkpoints built once per session.

Parts:
- `checkpoint_factory`: session fixture; `checkpoint_factory(family, **overrides) -> Path` builds
  (once per distinct arguments) a checkpoint with tests/support/checkpoints.py `make_checkpoint`.
- `llama_checkpoint`: Llama, 4 layers, llama3 rope scaling (rope_parameters layout).
- `qwen2_checkpoint`: Qwen2 (qkv bias), 3 layers, tied word embeddings.
- `qwen3_checkpoint`: Qwen3 (q/k norm), 5 layers, explicit head_dim 32 (!= hidden / heads).
- `sharded_checkpoint`: Llama, 4 layers, split over several safetensors files + index.
- `tiny_checkpoints`: {"llama": ..., "qwen2": ..., "qwen3": ...}.
- `moe_checkpoints`: {"qwen3_moe": ..., "mixtral": ..., "qwen2_moe": ...} (tests/support/checkpoints.py
  `MOE_DEFAULTS`: Qwen3-MoE with a dense layer 0, Qwen2-MoE with dense odd layers + shared expert).
All are float32, hidden 64, 4 heads, 2 KV heads, vocab 384, with a trained tokenizer
(tokenizer.json + tokenizer_config.json with a chat template) and generation_config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.checkpoints import make_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling changes short sequences
}
TINY_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"num_hidden_layers": 4, "rope_scaling": LLAMA3_ROPE, "seed": 1}),
    "qwen2": ("qwen2", {"num_hidden_layers": 3, "tie_word_embeddings": True, "seed": 2}),
    "qwen3": ("qwen3", {"num_hidden_layers": 5, "head_dim": 32, "seed": 3}),
    "sharded": ("llama", {"num_hidden_layers": 4, "max_shard_size": "60KB", "seed": 4}),
    "qwen3_moe": ("qwen3_moe", {"num_hidden_layers": 4, "seed": 6}),
    "mixtral": ("mixtral", {"num_hidden_layers": 3, "seed": 7}),
    "qwen2_moe": ("qwen2_moe", {"num_hidden_layers": 4, "seed": 8}),
}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def build(family: str, **overrides) -> Path:
        key = f"{family}-{sorted(overrides.items())!r}"
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(family), family, **overrides)
        return cache[key]

    return build


def _spec(name: str) -> tuple[str, dict]:
    family, overrides = TINY_SPECS[name]
    return family, dict(overrides)


@pytest.fixture(scope="session")
def llama_checkpoint(checkpoint_factory: Callable[..., Path]) -> Path:
    family, overrides = _spec("llama")
    return checkpoint_factory(family, **overrides)


@pytest.fixture(scope="session")
def qwen2_checkpoint(checkpoint_factory: Callable[..., Path]) -> Path:
    family, overrides = _spec("qwen2")
    return checkpoint_factory(family, **overrides)


@pytest.fixture(scope="session")
def qwen3_checkpoint(checkpoint_factory: Callable[..., Path]) -> Path:
    family, overrides = _spec("qwen3")
    return checkpoint_factory(family, **overrides)


@pytest.fixture(scope="session")
def sharded_checkpoint(checkpoint_factory: Callable[..., Path]) -> Path:
    family, overrides = _spec("sharded")
    return checkpoint_factory(family, **overrides)


@pytest.fixture(scope="session")
def tiny_checkpoints(llama_checkpoint: Path, qwen2_checkpoint: Path, qwen3_checkpoint: Path) -> dict[str, Path]:
    return {"llama": llama_checkpoint, "qwen2": qwen2_checkpoint, "qwen3": qwen3_checkpoint}


@pytest.fixture(scope="session")
def moe_checkpoints(checkpoint_factory: Callable[..., Path]) -> dict[str, Path]:
    paths = {}
    for name in ("qwen3_moe", "mixtral", "qwen2_moe"):
        family, overrides = _spec(name)
        paths[name] = checkpoint_factory(family, **overrides)
    return paths
