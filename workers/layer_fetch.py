"""A joiner fetches exactly its stage's pieces from a layer source, checks each, caches them.

Parts:
- `FetchStats`: what one fetch did: pieces and bytes received (tensor bytes apart), pieces the
  cache already held, pieces that arrived or sat on disk corrupt (and were fetched again), time.
- `LayerSource`: where to fetch from: the source's address and its CURVE public key.
- `fetch_stage(context, keys, source, start_layer, end_layer, cache, ...) -> (model path, stats)`:
  asks the source for the stage's manifest (workers/layer_manifest.py), keeps what the cache
  holds intact (workers/layer_cache.py), fetches the rest over one CURVE DEALER socket with up to
  `WINDOW` pieces in flight, checks every piece against its digest (a mismatch is fetched again,
  up to `MAX_TRIES` times, then the fetch fails), shows a tqdm progress bar on a terminal, and
  lays the stage out on disk for the loaders. Any failure is a `FetchError` with one line.
- `needs_fetch(model_dir, source, always)`: whether an assignment's model is to be fetched: the
  path is not on this box (or `--fetch-layers` says always) and the scheduler named a source.
- `stage_model_path(assign, ...)`: the path a worker loads an `AssignLayers` from (fetched or not).
- `Prefetch`: an `AssignLayers(prefetch=True)` fetched on a thread while the worker serves on
  (scheduler/rollout.py holds the re-plan until then); its answer is `LayersReady(prefetched=True)`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from workers import curve
from workers import protocol as p
from workers.layer_cache import LayerCache, default_cache_dir
from workers.layer_manifest import Manifest, Piece

log = logging.getLogger("potluck.layers")

WINDOW = 8  # pieces in flight: enough to fill a link, bounded memory (8 x 4 MiB)
MAX_TRIES = 3  # per piece
REPLY_TIMEOUT_S = 30.0


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class LayerSource:
    address: str
    public_key: str


@dataclass(frozen=True)
class FetchStats:
    pieces_received: int
    bytes_received: int
    tensor_bytes_received: int
    pieces_cached: int
    corrupt_pieces: int  # arrived with the wrong digest, or found corrupt in the cache
    stage_tensor_bytes: int  # the stage's tensor bytes (what a cold fetch receives of tensors)
    seconds: float

    def line(self, start_layer: int, end_layer: int) -> str:
        return (f"layers [{start_layer}, {end_layer}): received {self.pieces_received} pieces, "
                f"{self.bytes_received} bytes ({self.tensor_bytes_received} tensor bytes of the stage's "
                f"{self.stage_tensor_bytes}), {self.pieces_cached} from the cache, {self.corrupt_pieces} corrupt "
                f"fetched again, in {self.seconds:.2f} s")


def needs_fetch(model_dir: str, source: LayerSource | None, always: bool) -> bool:
    return source is not None and bool(source.address) and (always or not Path(model_dir).exists())


class _Link:
    """One DEALER socket to the source: requests out, replies in, each within the timeout."""

    def __init__(self, context: zmq.Context, keys: curve.KeyPair, source: LayerSource, use_curve: bool) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if use_curve:
            curve.make_client(self.sock, keys, source.public_key)
        self.sock.connect(source.address)
        self.address = source.address

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def receive(self) -> list[bytes]:
        if not self.sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            raise FetchError(f"the layer source at {self.address} did not answer in {REPLY_TIMEOUT_S:.0f} s")
        frames = self.sock.recv_multipart()
        if frames[0] == b"error":
            raise FetchError(f"the layer source at {self.address} refused: {frames[1].decode(errors='replace')}")
        return frames

    def close(self) -> None:
        self.sock.close(linger=0)


def _progress(total_bytes: int, start_layer: int, end_layer: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=f"layers [{start_layer}, {end_layer})", disable=not show, leave=False)


def fetch_stage(
    context: zmq.Context, keys: curve.KeyPair, source: LayerSource, start_layer: int, end_layer: int,
    cache: LayerCache, *, use_curve: bool = True, show_progress: bool | None = None,
) -> tuple[Path, FetchStats]:
    """The local path of stage [start_layer, end_layer)'s copy of the model, fetched as needed."""
    started_s = time.monotonic()
    link = _Link(context, keys, source, use_curve)
    try:
        link.send(b"manifest", msgpack.packb({"start_layer": start_layer, "end_layer": end_layer}))
        frames = link.receive()
        try:
            manifest = Manifest.from_wire(msgpack.unpackb(frames[1]))
        except (ValueError, IndexError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise FetchError(f"the layer source at {source.address} sent a bad manifest: {exc}") from None
        if (manifest.start_layer, manifest.end_layer) != (start_layer, end_layer):
            raise FetchError(f"the layer source sent the manifest of another stage [{manifest.start_layer}, {manifest.end_layer})")
        corrupt_before = cache.corrupt_found
        missing = cache.missing(manifest.pieces)
        unique = {p.digest for p in manifest.pieces}
        show = sys.stderr.isatty() if show_progress is None else show_progress
        received = _receive(link, missing, cache, _progress(sum(p.num_bytes for p in missing), start_layer, end_layer, show))
    finally:
        link.close()
    path = cache.assemble(manifest)
    pieces_received, bytes_received, tensor_bytes, corrupt = received
    stats = FetchStats(pieces_received, bytes_received, tensor_bytes, len(unique) - len(missing),
                       corrupt + cache.corrupt_found - corrupt_before, manifest.tensor_bytes, time.monotonic() - started_s)
    return path, stats


def _receive(link: _Link, missing: list[Piece], cache: LayerCache, bar) -> tuple[int, int, int, int]:
    """Fetch `missing` with up to WINDOW in flight; (pieces, bytes, tensor bytes, corrupt)."""
    queue = list(reversed(missing))
    by_digest = {p.digest: p for p in missing}
    tries: dict[str, int] = {}
    in_flight = 0
    pieces = total = tensor = corrupt = 0
    with bar:
        while queue or in_flight:
            while queue and in_flight < WINDOW:
                piece = queue.pop()
                tries[piece.digest] = tries.get(piece.digest, 0) + 1
                link.send(b"piece", piece.digest.encode("ascii"))
                in_flight += 1
            frames = link.receive()
            in_flight -= 1
            if len(frames) != 3 or frames[0] != b"piece":
                raise FetchError(f"the layer source at {link.address} sent a malformed reply")
            piece = by_digest.get(frames[1].decode("ascii", "replace"))
            if piece is None:
                raise FetchError(f"the layer source at {link.address} sent a piece nobody asked for")
            data = frames[2]
            pieces += 1
            total += len(data)
            tensor += len(data) if piece.kind == "tensor" else 0
            if len(data) != piece.num_bytes or hashlib.sha256(data).hexdigest() != piece.digest:
                corrupt += 1
                log.warning("piece %s of %s arrived corrupt (try %d of %d); fetching it again",
                            piece.digest[:12], piece.file, tries[piece.digest], MAX_TRIES)
                if tries[piece.digest] >= MAX_TRIES:
                    raise FetchError(f"piece {piece.digest[:12]} of {piece.file} arrived corrupt {MAX_TRIES} times")
                queue.append(piece)
                continue
            cache.put(piece, data)
            bar.update(len(data))
    return pieces, total, tensor, corrupt


def stage_model_path(message: p.AssignLayers, context: zmq.Context, keys: curve.KeyPair, cache_dir: str,
                     always: bool, use_curve: bool) -> str:
    """Where this worker reads the assigned stage from: the scheduler's path when this box has it,
    else a copy fetched from the layer source the assignment names (logged with its figures)."""
    source = LayerSource(message.layers_address, message.layers_key) if message.layers_address else None
    if not needs_fetch(message.model_dir, source, always):
        return message.model_dir
    assert source is not None
    cache = LayerCache(cache_dir or default_cache_dir())
    path, stats = fetch_stage(context, keys, source, message.start_layer, message.end_layer, cache, use_curve=use_curve)
    log.info("fetched %s", stats.line(message.start_layer, message.end_layer))
    return str(path)


class Prefetch:
    """`AssignLayers(prefetch=True)` run on a thread, so the worker keeps serving its current
    layers meanwhile; `answer()` is the `LayersReady(prefetched=True)` once done (else None)."""

    def __init__(self, message: p.AssignLayers, worker_id: str, context: zmq.Context, keys: curve.KeyPair,
                 cache_dir: str, always: bool, use_curve: bool) -> None:
        self.message, self.worker_id = message, worker_id
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(context, keys, cache_dir, always, use_curve),
                                       name="layer-prefetch", daemon=True)
        self.thread.start()

    def _run(self, context: zmq.Context, keys: curve.KeyPair, cache_dir: str, always: bool, use_curve: bool) -> None:
        try:
            stage_model_path(self.message, context, keys, cache_dir, always, use_curve)
        except Exception as exc:
            log.exception("fetching layers failed")
            self.error = f"{type(exc).__name__}: {exc}"[:500]

    def answer(self) -> p.LayersReady | None:
        if self.thread.is_alive():
            return None
        m = self.message
        return p.LayersReady(self.worker_id, m.epoch, m.start_layer, m.end_layer, error=self.error, prefetched=True)
