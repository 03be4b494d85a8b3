"""A joiner's layer cache on disk: pieces by digest, and the sparse model copy the loaders read.

Parts:
- `default_cache_dir()`: `$POTLUCK_LAYER_CACHE`, else `$XDG_CACHE_HOME/potluck/layers`, else
  `~/.cache/potluck/layers`.
- `LayerCache(root)`:
  - `blobs/<sha256>`: one file per piece, named by its digest (written to a temporary name, then
    renamed: a crash never leaves a half piece under a digest);
  - `missing(pieces)`: the pieces not held intact; each held one is hashed again, and one whose
    bytes no longer match its digest (a bad disk, a bad earlier write) is deleted and counted in
    `corrupt_found`, so it is fetched again;
  - `put(piece, data)`: keep a fetched piece (ValueError if the bytes do not match its digest);
  - `assemble(manifest) -> Path`: the model as the loaders expect it, under
    `models/<model name>-<model key>/`: every file at its full size, the stage's pieces written at
    their offsets, everything else a hole (no disk used). The returned path is the folder, or the
    `.gguf` file in it; workers/checkpoint.py and workers/gguf_file.py read only the stage's
    ranges, which are all there.
A re-plan writes its new pieces into the same copy; the bytes of a stage still loaded are never
changed (the same offsets get the same bytes), and the loaders hold their own copies anyway.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from workers.layer_manifest import Manifest, Piece

CACHE_ENV = "POTLUCK_LAYER_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "potluck" / "layers"


def _digest_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


class LayerCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.models = self.root / "models"
        self.corrupt_found = 0  # held pieces whose bytes no longer matched their digest

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest

    def missing(self, pieces: Iterable[Piece]) -> list[Piece]:
        """The pieces not held intact (each held one is verified against its digest)."""
        missing, seen = [], set()
        for piece in pieces:
            if piece.digest in seen:
                continue
            seen.add(piece.digest)
            path = self.blob_path(piece.digest)
            if path.is_file() and path.stat().st_size == piece.num_bytes and _digest_of_file(path) == piece.digest:
                continue
            if path.exists():
                self.corrupt_found += 1
                path.unlink()
            missing.append(piece)
        return missing

    def put(self, piece: Piece, data: bytes | memoryview) -> None:
        if len(data) != piece.num_bytes or hashlib.sha256(data).hexdigest() != piece.digest:
            raise ValueError(f"piece {piece.digest[:12]} of {piece.file} does not match its digest")
        self.blobs.mkdir(parents=True, exist_ok=True)
        final = self.blob_path(piece.digest)
        temporary = final.with_name(f".{piece.digest}.{os.getpid()}.part")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, final)

    def assemble(self, manifest: Manifest) -> Path:
        """The stage's copy of the model (every piece must be held): a folder or a .gguf path."""
        folder = self.models / f"{manifest.model_name}-{manifest.model_key}"
        folder.mkdir(parents=True, exist_ok=True)
        by_file: dict[str, list[Piece]] = {}
        for piece in manifest.pieces:
            by_file.setdefault(piece.file, []).append(piece)
        for name, size in manifest.files:
            path = folder / name
            with open(path, "r+b" if path.exists() else "w+b") as f:
                if os.fstat(f.fileno()).st_size != size:
                    f.truncate(size)  # grows with a hole
                for piece in by_file.get(name, []):
                    with open(self.blob_path(piece.digest), "rb") as blob:
                        data = blob.read()
                    os.pwrite(f.fileno(), data, piece.offset)
        return folder / manifest.model_name if manifest.is_file else folder
