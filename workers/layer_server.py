"""The layer source: a CURVE ROUTER socket that sends a stage's manifest and its pieces to members.

Parts:
- `MemberGate`: the ZAP gate of the source's context; a connection gets through only if its key
  is a registered member's *now* (`is_member(key)`, asked at each handshake: a worker that left
  or a key the scheduler never admitted is refused before any frame arrives).
- `LayerServer(model_path, keys, is_member)`: a thread serving one model; `start(host)` binds a
  free port and returns the address; `stop()`.
- The exchange (DEALER -> ROUTER, one reply per request, msgpack bodies):
  - `[b"manifest", {"start_layer", "end_layer"}]` -> `[b"manifest", Manifest.to_wire()]`
    (workers/layer_manifest.py: digests of every piece);
  - `[b"piece", digest]` -> `[b"piece", digest, bytes]`, only for a digest of a manifest this
    source made (no other byte of any file can be asked for);
  - anything wrong -> `[b"error", one line]`.
Pieces are read with `os.pread` as asked; the thread never holds more than one in memory.
`api/cli.py serve` runs one beside the scheduler, with the scheduler's key pair (which every
worker knows from the token) and the scheduler's members (scheduler/membership.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

from workers import curve
from workers.layer_manifest import stage_manifest

log = logging.getLogger("potluck.layers")


class MemberGate(curve.Gate):
    def __init__(self, context: zmq.Context, is_member: Callable[[str], bool]) -> None:
        super().__init__(context, "layer source")
        self.is_member = is_member

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode("ascii") if isinstance(key, bytes) else str(key)
        allowed = self.is_member(text)
        if not allowed:
            self._log_refused(f"a CURVE key that is not a member of the cluster ({text[:8]}...)")
        return allowed


class LayerServer:
    def __init__(self, model_path: str | Path, keys: curve.KeyPair, is_member: Callable[[str], bool]) -> None:
        self.model_path = Path(model_path)
        self.keys = keys
        self.context = zmq.Context()
        self.gate = MemberGate(self.context, is_member)
        self.sock: zmq.Socket | None = None
        self.address = ""
        self.pieces: dict[str, tuple[Path, int, int]] = {}  # digest -> (file, offset, length)
        self.bytes_sent = 0
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, host: str) -> str:
        self.gate.start()
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)
        curve.make_server(sock, self.keys)
        port = sock.bind_to_random_port(f"tcp://{host}")
        advertised = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        self.sock, self.address = sock, f"tcp://{advertised}:{port}"
        self._running.set()
        self._thread = threading.Thread(target=self._serve, name="layer-source", daemon=True)
        self._thread.start()
        log.info("layer source for %s on %s", self.model_path.name, self.address)
        return self.address

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close(linger=0)
        self.gate.stop()
        self.context.term()

    def _serve(self) -> None:
        assert self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self._running.is_set():
            if not poller.poll(200):
                continue
            identity, *frames = self.sock.recv_multipart()
            try:
                reply = self._answer(frames)
            except Exception as exc:  # one line back to the joiner; the source stays up
                log.warning("layer source: %s", exc)
                reply = [b"error", f"{type(exc).__name__}: {exc}"[:300].encode()]
            self.sock.send_multipart([identity, *reply], copy=False)

    def _answer(self, frames: list[bytes]) -> list:
        if len(frames) == 2 and frames[0] == b"manifest":
            body = msgpack.unpackb(frames[1])
            start, end = int(body["start_layer"]), int(body["end_layer"])
            manifest = stage_manifest(self.model_path, start, end)
            parent = self.model_path.parent if manifest.is_file else self.model_path
            for piece in manifest.pieces:
                self.pieces[piece.digest] = (parent / piece.file, piece.offset, piece.num_bytes)
            return [b"manifest", msgpack.packb(manifest.to_wire())]
        if len(frames) == 2 and frames[0] == b"piece":
            digest = frames[1].decode("ascii", "replace")
            where = self.pieces.get(digest)
            if where is None:
                raise ValueError(f"no piece {digest[:12]} here (ask for the manifest first)")
            path, offset, length = where
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            self.bytes_sent += len(data)
            return [b"piece", frames[1], data]
        raise ValueError("unknown request to the layer source")
