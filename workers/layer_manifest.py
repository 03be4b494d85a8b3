"""What a stage needs of a model, piece by piece, each with its digest: what a joiner fetches.

Parts:
- `Piece`: one byte range of one model file (`file`, `offset`, `num_bytes`), its SHA-256
  `digest`, and its `kind`: "tensor" (a stage's tensor bytes, at most `PIECE_BYTES` each) or
  "meta" (a safetensors / GGUF header, config.json, tokenizer files: small, whole).
- `Manifest`: the pieces of one stage `[start_layer, end_layer)` and every model file's size, so
  a joiner can lay the pieces out as a sparse copy of the model folder (workers/layer_cache.py):
  the files keep their sizes and offsets, the other stages' bytes are holes that hold no disk.
  `to_wire()` / `from_wire()`: plain msgpack-able values, checked on the way in.
- `stage_manifest(model_path, start_layer, end_layer)`: the manifest of a model directory
  (safetensors, one file or sharded) or a `.gguf` file (split ones too); which tensors a stage
  reads is the loaders' own choice (`stage_tensor_names`), so the pieces are exactly what
  workers/checkpoint.py and workers/gguf_file.py will read. Digests are memoised per file range
  and modification time: a second joiner, or a re-plan, hashes nothing again.

A tensor longer than `PIECE_BYTES` is cut at fixed offsets from its start, so the same layer
gives the same digests in every plan: a re-plan fetches only the layers that moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.checkpoint import INDEX_FILE, checkpoint_files, stage_tensor_names
from workers.model_config import ModelConfig

PIECE_BYTES = 4 * 2**20
MAX_META_FILE_BYTES = 64 * 2**20  # config, tokenizer, chat template: sent whole
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._ -]{0,200}$")


@dataclass(frozen=True)
class Piece:
    file: str  # a name inside the model folder (no directories)
    offset: int
    num_bytes: int
    digest: str  # SHA-256, hex
    kind: str  # tensor | meta


@dataclass(frozen=True)
class Manifest:
    model_name: str  # the folder's name, or the .gguf file's
    is_file: bool  # the model is a .gguf file (`model_name` is its first part)
    files: tuple[tuple[str, int], ...]  # every file the stage's copy holds, with its size
    pieces: tuple[Piece, ...]
    start_layer: int
    end_layer: int

    @property
    def tensor_bytes(self) -> int:
        return sum(p.num_bytes for p in self.pieces if p.kind == "tensor")

    @property
    def total_bytes(self) -> int:
        return sum(p.num_bytes for p in self.pieces)

    @property
    def model_key(self) -> str:
        """Names the model (its files and headers), not the stage: one cached copy per model."""
        h = hashlib.sha256(self.model_name.encode())
        for name, size in self.files:
            h.update(f"\0{name}\0{size}".encode())
        for piece in self.pieces:
            if piece.kind == "meta":
                h.update(piece.digest.encode())
        return h.hexdigest()[:16]

    def to_wire(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name, "is_file": self.is_file, "files": [list(f) for f in self.files],
            "pieces": [[p.file, p.offset, p.num_bytes, p.digest, p.kind] for p in self.pieces],
            "start_layer": self.start_layer, "end_layer": self.end_layer,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, raw: Any) -> Manifest:
        """The manifest a layer source sent; ValueError for anything malformed or unsafe (a file
        name with a directory in it, a piece outside its file)."""
        try:
            files = tuple((str(name), int(size)) for name, size in raw["files"])
            sizes = dict(files)
            pieces = tuple(Piece(str(f), int(o), int(n), str(d), str(k)) for f, o, n, d, k in raw["pieces"])
            manifest = cls(str(raw["model_name"]), bool(raw["is_file"]), files, pieces,
                           int(raw["start_layer"]), int(raw["end_layer"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed layer manifest: {exc!r}") from None
        for name in [manifest.model_name, *sizes]:
            if not _NAME_RE.match(name) or name in (".", ".."):
                raise ValueError(f"layer manifest names an unsafe file {name!r}")
        for piece in pieces:
            if piece.file not in sizes or piece.kind not in ("tensor", "meta") or not _DIGEST_RE.match(piece.digest):
                raise ValueError(f"layer manifest has a bad piece {piece}")
            if piece.offset < 0 or piece.num_bytes < 0 or piece.offset + piece.num_bytes > sizes[piece.file]:
                raise ValueError(f"layer manifest piece {piece.digest[:12]} lies outside {piece.file}")
        return manifest


_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()


def range_digest(path: Path, offset: int, num_bytes: int) -> str:
    """SHA-256 of `num_bytes` of `path` from `offset` (memoised per modification time)."""
    key = (str(path), os.stat(path).st_mtime_ns, offset, num_bytes)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = num_bytes
        while left:
            block = f.read(min(left, 2**20))
            if not block:
                raise ValueError(f"{path} is shorter than {offset + num_bytes} bytes")
            h.update(block)
            left -= len(block)
    digest = h.hexdigest()
    with _memo_lock:
        _memo[key] = digest
    return digest


def _tensor_pieces(path: Path, name: str, ranges: list[tuple[int, int]]) -> list[Piece]:
    pieces = []
    for begin, end in sorted(set(ranges)):
        for offset in range(begin, end, PIECE_BYTES):
            length = min(PIECE_BYTES, end - offset)
            pieces.append(Piece(name, offset, length, range_digest(path, offset, length), "tensor"))
    return pieces


def _meta_piece(path: Path, length: int | None = None) -> Piece:
    length = path.stat().st_size if length is None else length
    return Piece(path.name, 0, length, range_digest(path, 0, length), "meta")


def _safetensors_manifest(model_dir: Path, start_layer: int, end_layer: int) -> Manifest:
    mc = ModelConfig.from_path(model_dir)
    files = checkpoint_files(model_dir)
    names = stage_tensor_names(set(files), start_layer, end_layer, mc.num_hidden_layers, mc.tie_word_embeddings)
    ranges: dict[Path, list[tuple[int, int]]] = {}
    headers: dict[Path, tuple[int, dict]] = {}
    for path in sorted(set(files.values())):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            headers[path] = (8 + length, json.loads(f.read(length)))
    for name in names:
        path = files[name]
        data_start, header = headers[path]
        begin, end = header[name]["data_offsets"]
        ranges.setdefault(path, []).append((data_start + begin, data_start + end))
    pieces: list[Piece] = []
    sizes: list[tuple[str, int]] = []
    for path in sorted(model_dir.iterdir()):  # the small files every stage needs
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.stat().st_size <= MAX_META_FILE_BYTES:
            pieces.append(_meta_piece(path))
            sizes.append((path.name, path.stat().st_size))
    for path, (data_start, _) in headers.items():  # each weight file: its header, the stage's tensors
        sizes.append((path.name, path.stat().st_size))
        pieces.append(_meta_piece(path, data_start))
        pieces.extend(_tensor_pieces(path, path.name, ranges.get(path, [])))
    return Manifest(model_dir.name, False, tuple(sizes), tuple(pieces), start_layer, end_layer)


def _gguf_manifest(path: Path, start_layer: int, end_layer: int) -> Manifest:
    from workers.gguf_file import open_gguf

    model = open_gguf(str(path.resolve()))
    mc = ModelConfig.from_path(path)
    names = stage_tensor_names(set(model.tensors), start_layer, end_layer, mc.num_hidden_layers, mc.tie_word_embeddings)
    ranges: dict[Path, list[tuple[int, int]]] = {}
    data_start: dict[Path, int] = {part: part.stat().st_size for part in model.parts}
    for info in model.tensors.values():
        data_start[info.path] = min(data_start.get(info.path, info.start_byte), info.start_byte)
    for name in names:
        info = model.tensors[name]
        ranges.setdefault(info.path, []).append((info.start_byte, info.start_byte + info.num_bytes))
    pieces: list[Piece] = []
    sizes: list[tuple[str, int]] = []
    for part in model.parts:
        sizes.append((part.name, part.stat().st_size))
        pieces.append(_meta_piece(part, data_start[part]))  # header: metadata, tokenizer, tensor infos
        pieces.extend(_tensor_pieces(part, part.name, ranges.get(part, [])))
    return Manifest(path.name, True, tuple(sizes), tuple(pieces), start_layer, end_layer)


def stage_manifest(model_path: str | Path, start_layer: int, end_layer: int) -> Manifest:
    """Every piece stage [start_layer, end_layer) of the model at `model_path` needs, with digests."""
    path = Path(model_path)
    if str(path).endswith(".gguf"):
        return _gguf_manifest(path, start_layer, end_layer)
    if not (path / INDEX_FILE).exists() and not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return _safetensors_manifest(path, start_layer, end_layer)
