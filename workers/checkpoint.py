"""Reading a model directory's safetensors: sizes from headers, one stage's tensors.

Parts:
- `checkpoint_files(model_dir)`: tensor name -> file, for `model.safetensors` or a sharded
  `model.safetensors.index.json`.
- `read_safetensors_header(path)`: the JSON header of one file (8-byte little-endian length +
  JSON); never touches tensor data.
- `CheckpointSizes` / `layer_parameter_bytes(model_dir)`: bytes per decoder layer (and of its
  routed MoE experts), embeddings, final norm and LM head, from headers only.
- `stage_tensor_names(...)`: which checkpoint names a stage `[start_layer, end_layer)` needs.
- `load_stage_tensors(...)`: reads exactly those names with `safe_open` (one tensor at a time,
  never the whole model); the keys of the result are exactly the names read.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBED_PREFIX = "model.embed_tokens."
NORM_PREFIX = "model.norm."
LM_HEAD_PREFIX = "lm_head."
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# routed experts of an MoE layer (Qwen MoE `mlp.experts.`, Mixtral `block_sparse_moe.experts.`)
_EXPERT_RE = re.compile(r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.experts\.")


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.exists():
        return {name: single for name in read_safetensors_header(single)}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of one safetensors file (no tensor data read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class CheckpointSizes:
    layer_bytes: tuple[int, ...]  # per decoder layer, index = layer number
    embedding_bytes: int  # model.embed_tokens.*
    final_norm_bytes: int  # model.norm.*
    lm_head_bytes: int  # lm_head.* (when tied and absent: the embedding bytes the last stage uses)
    lm_head_tied: bool  # no lm_head tensor in the checkpoint: the LM head is embed_tokens
    # per decoder layer, the part of layer_bytes that is routed MoE experts (all 0: dense model);
    # memory holds all of it, a token's decode step reads top-k / num_experts of it
    expert_bytes: tuple[int, ...] = ()

    def stage_bytes(self, start_layer: int, end_layer: int) -> int:
        """Parameter bytes a stage [start_layer, end_layer) holds."""
        total = sum(self.layer_bytes[start_layer:end_layer])
        if start_layer == 0:
            total += self.embedding_bytes
        if end_layer == len(self.layer_bytes):
            total += self.final_norm_bytes
            tied_and_shared = self.lm_head_tied and start_layer == 0
            total += 0 if tied_and_shared else self.lm_head_bytes
        return total


def layer_parameter_bytes(model_dir: str | Path) -> CheckpointSizes:
    """Parameter bytes per part of the model, from the safetensors headers only."""
    files = checkpoint_files(model_dir)
    sizes: dict[str, int] = {}
    for path in sorted(set(files.values())):
        for name, meta in read_safetensors_header(path).items():
            begin, end = meta["data_offsets"]
            sizes[name] = end - begin
    layers: dict[int, int] = {}
    experts: dict[int, int] = {}
    embed = norm = head = 0
    for name, nbytes in sizes.items():
        match = _LAYER_RE.match(name)
        if match:
            layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + nbytes
            if _EXPERT_RE.match(name):
                experts[int(match.group(1))] = experts.get(int(match.group(1)), 0) + nbytes
        elif name.startswith(EMBED_PREFIX):
            embed += nbytes
        elif name.startswith(NORM_PREFIX):
            norm += nbytes
        elif name.startswith(LM_HEAD_PREFIX):
            head += nbytes
    num_layers = max(layers) + 1 if layers else 0
    tied = head == 0
    return CheckpointSizes(
        layer_bytes=tuple(layers.get(i, 0) for i in range(num_layers)),
        embedding_bytes=embed,
        final_norm_bytes=norm,
        lm_head_bytes=embed if tied else head,
        lm_head_tied=tied,
        expert_bytes=tuple(experts.get(i, 0) for i in range(num_layers)),
    )


def stage_tensor_names(
    all_names: list[str] | set[str],
    start_layer: int,
    end_layer: int,
    num_layers: int,
    tie_word_embeddings: bool,
) -> list[str]:
    """The checkpoint names a stage [start_layer, end_layer) reads, sorted."""
    if not 0 <= start_layer < end_layer <= num_layers:
        raise ValueError(f"bad layer range [{start_layer}, {end_layer}) of {num_layers} layers")
    first, last = start_layer == 0, end_layer == num_layers
    has_lm_head = any(n.startswith(LM_HEAD_PREFIX) for n in all_names)
    use_embed_as_head = last and (tie_word_embeddings or not has_lm_head)
    wanted = []
    for name in all_names:
        match = _LAYER_RE.match(name)
        if match:
            keep = start_layer <= int(match.group(1)) < end_layer
        elif name.startswith(EMBED_PREFIX):
            keep = first or use_embed_as_head
        elif name.startswith(NORM_PREFIX):
            keep = last
        elif name.startswith(LM_HEAD_PREFIX):
            keep = last and not use_embed_as_head
        else:
            keep = False
        if keep and not name.endswith("rotary_emb.inv_freq"):
            wanted.append(name)
    return sorted(wanted)


def load_stage_tensors(
    model_dir: str | Path,
    start_layer: int,
    end_layer: int,
    num_layers: int,
    tie_word_embeddings: bool,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    convert: Callable[[str, torch.Tensor], Any] | None = None,
) -> dict[str, Any]:
    """Read only the tensors of stage [start_layer, end_layer), keyed by checkpoint name.

    Tensors are read one at a time and converted to `dtype` (None: as stored) on `device`,
    so peak memory is the stage plus one tensor. When the LM head is tied (or the checkpoint
    has no `lm_head.*`), the last stage reads `model.embed_tokens.*` instead. `convert(name,
    tensor)` (e.g. `--quantization`, workers/quantization.py) is applied to each tensor as it is
    read, so a stage never holds all its tensors unconverted.
    """
    files = checkpoint_files(model_dir)
    names = stage_tensor_names(set(files), start_layer, end_layer, num_layers, tie_word_embeddings)
    # One open per (file, layer): safe_open maps the file, and every page read stays resident
    # until it is closed, so reading a layer at a time keeps at most one layer mapped.
    groups: dict[tuple[Path, str], list[str]] = {}
    for name in names:
        layer = name.split(".")[2] if name.startswith("model.layers.") else name
        groups.setdefault((files[name], layer), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for (path, _), group_names in groups.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in group_names:
                tensor = f.get_tensor(name)  # a view of the file's mapping
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                else:  # own the bytes: one tensor left on the mapping keeps the whole file resident
                    tensor = tensor.clone()
                tensor = tensor.to(device) if device != "cpu" else tensor
                tensors[name] = tensor if convert is None else convert(name, tensor)
    return tensors
