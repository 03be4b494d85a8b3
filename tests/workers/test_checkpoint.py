"""Sizes from safetensors headers; a stage reads only its own tensors (single file and sharded)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from workers.backend import StageConfig
from workers.checkpoint import layer_parameter_bytes, load_stage_tensors, read_safetensors_header
from workers.model_config import ModelConfig
from workers.torch_backend import TorchStageBackend


def _all_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "sharded"])
def test_header_sizes_equal_real_tensor_sizes(request, name):
    model_dir = request.getfixturevalue(f"{name}_checkpoint")
    sizes = layer_parameter_bytes(model_dir)
    tensors = _all_tensors(model_dir)
    real = [0] * len(sizes.layer_bytes)
    for key, tensor in tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        if match:
            real[int(match.group(1))] += tensor.numel() * tensor.element_size()
    assert list(sizes.layer_bytes) == real and len(real) == ModelConfig.from_hf(model_dir).num_layers
    embed = tensors["model.embed_tokens.weight"]
    assert sizes.embedding_bytes == embed.numel() * embed.element_size()
    assert sizes.final_norm_bytes == tensors["model.norm.weight"].numel() * 4
    head = tensors.get("lm_head.weight", embed)
    assert sizes.lm_head_bytes == head.numel() * head.element_size()
    assert sizes.lm_head_tied == ("lm_head.weight" not in tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert sizes.stage_bytes(0, len(real)) == total


def test_sharded_checkpoint_uses_index(sharded_checkpoint):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    first = sorted(sharded_checkpoint.glob("*.safetensors"))[0]
    header = read_safetensors_header(first)
    assert header and all("data_offsets" in meta for meta in header.values())


@pytest.mark.parametrize("name", ["llama", "qwen2", "sharded"])
@pytest.mark.parametrize("start,end", [(0, 1), (1, 3), (2, 4), (0, 3)])
def test_stage_reads_only_its_range(request, name, start, end):
    model_dir = request.getfixturevalue(f"{name}_checkpoint")
    cfg = ModelConfig.from_hf(model_dir)
    end = min(end, cfg.num_layers)
    backend = TorchStageBackend(StageConfig(str(model_dir), start, end, kv_budget_bytes=2**20))
    names = backend.loaded_tensor_names
    layers = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    assert layers == set(range(start, end))
    last = end == cfg.num_layers
    assert ("model.embed_tokens.weight" in names) == (start == 0 or (last and cfg.tie_word_embeddings))
    assert ("model.norm.weight" in names) == last
    assert ("lm_head.weight" in names) == (last and not cfg.tie_word_embeddings)
    every = set(_all_tensors(model_dir))
    expected = {n for n in every if (m := re.match(r"model\.layers\.(\d+)\.", n)) and start <= int(m.group(1)) < end}
    assert expected <= names
    sizes = layer_parameter_bytes(model_dir)
    assert backend.weight_bytes == sizes.stage_bytes(start, end)


def test_load_stage_tensors_converts_dtype(llama_checkpoint):
    tensors = load_stage_tensors(llama_checkpoint, 3, 4, 4, False, dtype=torch.bfloat16)
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "model.norm.weight" in tensors and "lm_head.weight" in tensors
    with pytest.raises(ValueError):
        load_stage_tensors(llama_checkpoint, 2, 5, 4, False)
