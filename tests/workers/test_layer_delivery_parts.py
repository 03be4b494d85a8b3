"""The layer source, the fetch and the cache, in one process over real CURVE sockets on 127.0.0.1.

- a manifest's tensor pieces are exactly the byte ranges the loaders read (safetensors and GGUF);
- a stage fetched into an empty cache loads and computes what the original model computes;
- a piece that arrives corrupt is found by its digest and fetched again; one always corrupt fails
  the fetch with a clear error; a cached piece corrupt on disk is fetched again;
- a key that is not a member is refused by the source; a malformed or unsafe manifest is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tests.gguf_checkpoints import write_gguf
from workers import curve
from workers import layer_fetch
from workers.backend import SequenceChunk, StageConfig, load_backend
from workers.checkpoint import layer_parameter_bytes, load_stage_tensors
from workers.gguf_file import open_gguf
from workers.layer_cache import LayerCache
from workers.layer_fetch import FetchError, LayerSource, fetch_stage, needs_fetch
from workers.layer_manifest import Manifest, stage_manifest
from workers.layer_server import LayerServer

TOKEN = "ptk-test-layer-parts-0123456789"


class CorruptingServer(LayerServer):
    """A test hook: one piece (the first of over 4 KiB asked for) has a byte flipped in transit,
    the first `times` times it is sent."""

    def __init__(self, *args, times: int = 1) -> None:
        super().__init__(*args)
        self.times = times
        self.victim = b""

    def _answer(self, frames: list[bytes]) -> list:
        reply = super()._answer(frames)
        if reply[0] == b"piece" and not self.victim and len(reply[2]) > 4096:
            self.victim = reply[1]
        if reply[0] == b"piece" and reply[1] == self.victim and self.times > 0:
            self.times -= 1
            data = bytearray(reply[2])
            data[100] ^= 0x01
            reply[2] = bytes(data)
        return reply


@pytest.fixture
def member() -> curve.KeyPair:
    return curve.KeyPair.generate()


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _serve(model: Path, member: curve.KeyPair, cls: type = LayerServer, **kwargs) -> tuple[LayerServer, LayerSource]:
    keys = curve.scheduler_keys(TOKEN)
    server = cls(model, keys, lambda key: key == member.public_key, **kwargs)
    return server, LayerSource(server.start("127.0.0.1"), keys.public_key)


def _tensor_ranges(manifest: Manifest) -> set[tuple[str, int, int]]:
    spans: dict[str, list[list[int]]] = {}
    for piece in sorted((p for p in manifest.pieces if p.kind == "tensor"), key=lambda p: (p.file, p.offset)):
        runs = spans.setdefault(piece.file, [])
        if runs and runs[-1][1] == piece.offset:
            runs[-1][1] += piece.num_bytes
        else:
            runs.append([piece.offset, piece.offset + piece.num_bytes])
    return {(f, a, b) for f, runs in spans.items() for a, b in runs}


def test_safetensors_manifest_is_the_stage_and_a_fetched_stage_computes_the_same(
    llama_checkpoint: Path, tmp_path: Path, member: curve.KeyPair, context: zmq.Context
) -> None:
    sizes = layer_parameter_bytes(llama_checkpoint)
    manifest = stage_manifest(llama_checkpoint, 1, 3)
    assert manifest.tensor_bytes == sizes.stage_bytes(1, 3)
    assert {p.file for p in manifest.pieces} >= {"config.json", "tokenizer.json", "model.safetensors"}
    server, source = _serve(llama_checkpoint, member)
    try:
        path, stats = fetch_stage(context, member, source, 1, 3, LayerCache(tmp_path / "cache"), show_progress=False)
        assert stats.tensor_bytes_received == sizes.stage_bytes(1, 3) and stats.pieces_cached == 0
        assert server.bytes_sent == stats.bytes_received
        _, again = fetch_stage(context, member, source, 1, 4, LayerCache(tmp_path / "cache"), show_progress=False)
        assert again.tensor_bytes_received == sizes.stage_bytes(1, 4) - sizes.stage_bytes(1, 3)  # layer 3 and the head
    finally:
        server.stop()
    assert path.parent == tmp_path / "cache" / "models"
    ours, theirs = (load_stage_tensors(p, 1, 3, 4, False) for p in (path, llama_checkpoint))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = dict(start_layer=1, end_layer=3, dtype="float32", device="cpu")
    fetched = load_backend(StageConfig(model_dir=str(path), **config), "torch")
    original = load_backend(StageConfig(model_dir=str(llama_checkpoint), **config), "torch")
    hidden = np.random.default_rng(0).standard_normal((5, fetched.hidden_size)).astype(np.float32)
    out = [b.forward([SequenceChunk("r", 0, 5)], hidden) for b in (fetched, original)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-4)  # GEMM kernels may differ by run


def test_gguf_manifest_is_exactly_the_byte_ranges_the_loader_reads(llama_checkpoint: Path, tmp_path: Path,
                                                                   member: curve.KeyPair, context: zmq.Context) -> None:
    gguf_path = write_gguf(llama_checkpoint, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    manifest = stage_manifest(gguf_path, 2, 4)
    backend = load_backend(StageConfig(model_dir=str(gguf_path), start_layer=2, end_layer=4, device="cpu"), "torch")
    read = {(Path(f).name, a, b) for f, a, b in backend.gguf_bytes_read}
    assert _tensor_ranges(manifest) == _merge(read)
    assert manifest.tensor_bytes == open_gguf(str(gguf_path.resolve())).layer_sizes().stage_bytes(2, 4)
    server, source = _serve(gguf_path, member)
    try:
        path, stats = fetch_stage(context, member, source, 2, 4, LayerCache(tmp_path / "cache"), show_progress=False)
    finally:
        server.stop()
    assert path.name == gguf_path.name and stats.tensor_bytes_received == manifest.tensor_bytes
    assert path.stat().st_blocks * 512 < 0.8 * gguf_path.stat().st_size  # the other layers are holes
    fetched = load_backend(StageConfig(model_dir=str(path), start_layer=2, end_layer=4, device="cpu"), "torch")
    hidden = np.random.default_rng(1).standard_normal((3, fetched.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(fetched.forward([SequenceChunk("r", 0, 3)], hidden),
                               backend.forward([SequenceChunk("r", 0, 3)], hidden), rtol=1e-4, atol=1e-4)


def _merge(ranges: set[tuple[str, int, int]]) -> set[tuple[str, int, int]]:
    merged: list[list] = []
    for f, a, b in sorted(ranges):
        if merged and merged[-1][0] == f and merged[-1][2] == a:
            merged[-1][2] = b
        else:
            merged.append([f, a, b])
    return {tuple(m) for m in merged}


def test_a_piece_corrupt_in_transit_is_fetched_again(llama_checkpoint: Path, tmp_path: Path, member: curve.KeyPair,
                                                     context: zmq.Context) -> None:
    server, source = _serve(llama_checkpoint, member, CorruptingServer, times=1)
    try:
        _, stats = fetch_stage(context, member, source, 0, 2, LayerCache(tmp_path / "cache"), show_progress=False)
    finally:
        server.stop()
    clean = stage_manifest(llama_checkpoint, 0, 2)
    assert stats.corrupt_pieces == 1
    assert stats.pieces_received == len({p.digest for p in clean.pieces}) + 1


def test_a_piece_always_corrupt_fails_the_fetch_with_its_reason(llama_checkpoint: Path, tmp_path: Path,
                                                                member: curve.KeyPair, context: zmq.Context) -> None:
    server, source = _serve(llama_checkpoint, member, CorruptingServer, times=layer_fetch.MAX_TRIES)
    try:
        with pytest.raises(FetchError, match="arrived corrupt 3 times"):
            fetch_stage(context, member, source, 0, 1, LayerCache(tmp_path / "cache"), show_progress=False)
    finally:
        server.stop()


def test_a_cached_piece_corrupt_on_disk_is_fetched_again(llama_checkpoint: Path, tmp_path: Path,
                                                         member: curve.KeyPair, context: zmq.Context) -> None:
    cache = LayerCache(tmp_path / "cache")
    server, source = _serve(llama_checkpoint, member)
    try:
        fetch_stage(context, member, source, 0, 2, cache, show_progress=False)
        blob = max(cache.blobs.iterdir(), key=lambda p: p.stat().st_size)
        blob.write_bytes(b"\0" + blob.read_bytes()[1:])
        _, stats = fetch_stage(context, member, source, 0, 2, LayerCache(tmp_path / "cache"), show_progress=False)
    finally:
        server.stop()
    assert (stats.pieces_received, stats.corrupt_pieces, stats.bytes_received) == (1, 1, blob.stat().st_size)


def test_a_key_that_is_not_a_member_is_refused(llama_checkpoint: Path, tmp_path: Path, member: curve.KeyPair,
                                               context: zmq.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_fetch, "REPLY_TIMEOUT_S", 1.0)
    server, source = _serve(llama_checkpoint, member)
    try:
        with pytest.raises(FetchError, match="did not answer"):
            fetch_stage(context, curve.KeyPair.generate(), source, 0, 1, LayerCache(tmp_path / "cache"), show_progress=False)
        assert server.gate.refused_count >= 1 and server.bytes_sent == 0
    finally:
        server.stop()
    assert not (tmp_path / "cache" / "blobs").exists()


def test_unsafe_or_malformed_manifests_are_refused(llama_checkpoint: Path) -> None:
    wire = stage_manifest(llama_checkpoint, 0, 1).to_wire()
    assert Manifest.from_wire(wire).to_wire() == wire
    for bad in ({**wire, "files": [["../../etc/passwd", 10]]}, {**wire, "model_name": ".."},
                {**wire, "pieces": [["config.json", 0, 10**12, "0" * 64, "meta"]]}, {"files": 3}):
        with pytest.raises(ValueError):
            Manifest.from_wire(bad)


def test_a_model_is_fetched_only_when_this_box_lacks_it(tmp_path: Path) -> None:
    source = LayerSource("tcp://127.0.0.1:1", "k" * 40)
    assert needs_fetch(str(tmp_path / "absent"), source, always=False)
    assert not needs_fetch(str(tmp_path), source, always=False)
    assert needs_fetch(str(tmp_path), source, always=True)
    assert not needs_fetch(str(tmp_path / "absent"), None, always=True)
