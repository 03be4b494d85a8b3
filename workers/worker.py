"""The worker process: sockets and the continuous-batching loop (heartbeats: workers/heartbeat.py).

Parts:
- `WorkerConfig` (workers/worker_config.py, imported from here too): where the scheduler is, where
  to listen, which device and how much memory.
- `Worker`: owns one PULL socket (everything it receives: control from the scheduler, activations
  and next tokens from peers) and one PUSH socket per peer; runs `StageBackend.forward` on
  whatever work is pending, in one batch per step. What it does with each message it receives
  (`handle`, `on_start`, `on_activations`, ...): `MessageIntake`, workers/worker_intake.py.
- `run_worker`: builds a `Worker` and runs its loop (`python -m workers` / `potluck join`).
  Registering is a series of watched attempts (workers/join_attempts.py); Ctrl-C or SIGTERM
  sends `Leave` before the worker exits (`Worker.leave`), so its requests move at once.

The loop (`run`) is: receive everything pending -> take a batch (workers/batching.py) -> forward
-> send. A request joins or leaves the batch between steps (continuous batching). The first stage
sizes decode microbatches so that every stage of the pipeline has one to work on (no pipeline
bubble), or on one machine holds the ring's decodes until they can run as one batch. A prompt's
first chunk at a stage reuses the stage's cached prefix first (workers/prompt_start.py; a later
stage lacking it answers `PrefixMiss` and the first stage prefills again). After a
step that held every request of the stage, with nothing else waiting, the next decode step is
made ready, and the message that brings exactly its inputs runs it at once, skipping decode,
batching and planning (workers/expected_step.py); the last stage's outputs are built by
workers/ring_close.py. A malformed or stale message is logged and dropped; the worker stays up.
Every socket is CURVE (workers/peers.py; made in workers/worker_sockets.py): a message counts
only from its rightful sender (layer commands from the scheduler, hidden states from the stage
before, next tokens from the last stage); every field is checked before compute
(workers/validation.py), and a step that raises fails only its own requests.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import zmq

from workers import codec, curve
from workers import protocol as p
from workers.backend import SequenceChunk, StageBackend
from workers.backend_plugins import claimed_formats
from workers.host_arrays import array_to_payload
from workers.batching import MAX_PREFILL_TOKENS_PER_STEP, StageRequest, WorkItem, take_batch
from workers.device_memory import usable_memory_bytes
from workers.expected_step import ExpectedStep, expect_next
from workers.heartbeat import HEARTBEAT_INTERVAL_S, heartbeat_loop
from workers.join_attempts import JoinAttempts, held_layers
from workers.link_prober import LinkProber
from workers.log_throttle import LogThrottle
from workers.peers import Peers, source_address
from workers.prompt_start import start_prompts
from workers.ring_close import close_ring
from workers.request_sampler import StageSampler
from workers.thread_affinity import ComputeThreads, find_compute_threads
from workers.worker_config import WorkerConfig
from workers.worker_intake import MessageIntake
from workers.worker_sockets import bind_data_socket, peer_socket

log = logging.getLogger("potluck.worker")

_yield_cpu = getattr(os, "sched_yield", lambda: None)  # not on Windows


LEAVE_LINGER_S = 1.0  # how long a stopping worker waits for its `Leave` to reach the scheduler
STOP_GRACE_S = 10.0  # Ctrl-C ends a worker within this, clean-up or not (`stop_within`)


class Worker(MessageIntake):  # what it does with each message it receives: workers/worker_intake.py
    def __init__(self, config: WorkerConfig, compute_threads: ComputeThreads | None = None) -> None:
        self.config = config
        self.compute_threads = compute_threads  # pinned once layers are loaded (loading keeps every core)
        self.worker_id = config.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.context = zmq.Context()  # its own: the ZAP gate is one per context
        # keys, members, the ZAP gate (workers/peers.py, workers/curve.py)
        self.members = Peers(self.context, config.token, config.secret_key, config.scheduler_address, config.use_curve)
        self.admitted = threading.Event()  # the scheduler listed this worker's key as a member
        self.registered_at_s = 0.0
        self.joining = JoinAttempts(config.scheduler_address)  # registrations, watched and retried
        self.expected_source_key: str | None = None  # who sends the expected step's inputs
        self.throttle = LogThrottle()
        self.pull, self.data_address = bind_data_socket(self.context, self.members, config)  # workers/worker_sockets.py
        self.peers: dict[str, zmq.Socket] = {}
        # the links to peers, measured when the scheduler asks (workers/link_prober.py)
        self.links = LinkProber(self.context, self.members.keys, self.worker_id, config.listen_host,
                                self.data_address.removeprefix("tcp://").rpartition(":")[0],
                                config.scheduler_address, self.members.scheduler_key, config.use_curve)
        self.backend: StageBackend | None = None
        self.epoch = -1
        self.num_stages_hint = 1
        self.requests: dict[str, StageRequest] = {}
        self.pending: list[WorkItem] = []
        self.step_time_ewma_s = 0.0
        self.tokens_processed = 0
        self.running = True
        self.hold_until_s = 0.0  # decodes wait for the rest of the ring until then (workers/batching.py)
        self.expected: ExpectedStep | None = None  # the decode step made ready (workers/expected_step.py)
        self.expected_steps_run = 0  # steps that took that fast path
        self.profile: p.DeviceProfile | None = None
        self.profiled = False  # measured once, at the first registration
        self.sampler: StageSampler | None = None  # last stage: per-request sampling state
        self.prefetches: list = []  # layer fetches under way (workers/layer_fetch.py `Prefetch`)
        self.assignment: p.AssignLayers | None = None  # what the loaded backend holds (kept if assigned again)

    # ----------------------------------------------------------------------------- sockets
    def _peer(self, address: str) -> zmq.Socket:
        sock = self.peers.get(address)
        if sock is None:
            sock = self.peers[address] = peer_socket(self.context, self.members, address)
        return sock

    def send(self, address: str, message: p.Message) -> None:
        self.send_frames(address, codec.encode(message), type(message).__name__)

    def send_frames(self, address: str, frames: list, kind: str) -> None:
        # zero-copy frames pay for themselves only when large (a small one is copied anyway, after
        # a costlier setup): one decode step's hidden state goes by copy, a prompt's without
        copy = all(memoryview(frame).nbytes < zmq.COPY_THRESHOLD for frame in frames[1:])
        try:
            self._peer(address).send_multipart(frames, copy=copy, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.throttle.warning(log, f"again {address}", "peer %s is not taking messages; dropped %s", address, kind)
        except p.ProtocolError as exc:
            self.throttle.warning(log, f"member {address}", "dropped %s: %s", kind, exc)

    def to_scheduler(self, message: p.Message) -> None:
        self.send(self.config.scheduler_address, message)

    # ----------------------------------------------------------------------------- lifecycle
    def register(self) -> None:
        if not self.profiled:
            self.profile, self.profiled = self.measure(), True
        profile = self.profile
        self.admitted.clear()
        self.registered_at_s = time.monotonic()
        for address in self.members.scheduler_addresses:  # a refused connection is not retried: connect afresh
            if (old := self.peers.pop(address, None)) is not None:
                old.close(linger=0)
        # sent with the join key (the token's): the scheduler admits this worker's own key with it;
        # the attempt is watched and, failed, retried after a backoff (workers/join_attempts.py)
        join_keys, public_key, proof = self.members.registration(self.worker_id)
        self.joining.send(self.context, join_keys if self.config.use_curve else None, self.members.scheduler_key,
            p.Register(
                worker_id=self.worker_id,
                data_address=self.data_address,
                memory_bytes=self.config.memory_bytes or usable_memory_bytes(self.config.device),
                device=self.config.device,
                profile=profile,
                pid=os.getpid(),
                prefill_tokens_per_step=MAX_PREFILL_TOKENS_PER_STEP,
                public_key=public_key,
                proof=proof,
                backend=self.config.backend,
                echo_address=self.links.echo_address,
                **claimed_formats(self.config.backend),
                fetches_layers=self.config.may_fetch_layers,
                **held_layers(self.assignment if self.backend is not None else None),
            ),
            self.registered_at_s,
        )

    def measure(self) -> p.DeviceProfile | None:
        if not self.config.profile:
            return None
        from workers.backend_plugins import get_plugin

        measure = get_plugin(self.config.backend).profile  # each backend measures itself
        if measure is None:
            return None
        profile = measure(self.config.device, self.config.profile_model_dir, self.config.profile_seconds, self.config.slowdown)
        return profile if isinstance(profile, p.DeviceProfile) else p.DeviceProfile.from_json(profile)

    def run(self) -> None:
        self.register()
        heartbeat = threading.Thread(target=heartbeat_loop, args=(self,), name="heartbeat", daemon=True)
        heartbeat.start()
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        try:
            while self.running:
                timeout_ms = 200
                if self.pending:  # a message ends a hold early: the poll returns when one arrives
                    timeout_ms = max(0, math.ceil(1000 * (self.hold_until_s - time.monotonic())))
                if poller.poll(timeout_ms):
                    self.receive_all()
                if self.prefetches:
                    self.report_prefetches()
                # not admitted: the attempt failed (one line, workers/join_attempts.py) and its backoff is
                # over, or the heartbeat thread asked for a new registration (registered_at_s 0)
                if self.joining.watch(self.admitted.is_set(), time.monotonic()) or not self.registered_at_s:
                    self.register()
                if self.pending and self.backend is not None:
                    self.step()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (workers/__main__.py): tell the scheduler first
            stop_within(STOP_GRACE_S)
            self.leave("stopped by Ctrl-C or SIGTERM")
            raise
        finally:
            self.running = False
            heartbeat.join(timeout=2 * HEARTBEAT_INTERVAL_S)
            self.close()

    def leave(self, reason: str, linger_s: float = LEAVE_LINGER_S) -> None:
        """A `Leave` to the scheduler, flushed before the sockets close: this worker's requests
        replay elsewhere at once instead of after a heartbeat timeout."""
        if not self.admitted.is_set():
            return  # not a member: nothing runs here
        self.to_scheduler(p.Leave(self.worker_id, reason))
        if (sock := self.peers.pop(self.config.scheduler_address, None)) is not None:
            sock.close(linger=int(1000 * linger_s))  # the context's end waits up to this for the send
        log.warning("%s left the cluster (%s): the scheduler moves its requests now", self.worker_id, reason)

    def close(self) -> None:
        self.links.close()
        self.joining.close()
        for sock in self.peers.values():
            sock.close(linger=0)
        self.pull.close(linger=0)
        self.members.stop()
        self.context.destroy(linger=0)

    # ----------------------------------------------------------------------------- receive
    def receive_all(self) -> None:
        while self.pull.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a zmq.Again at the end
            frames = self.pull.recv_multipart(copy=False)
            sender = curve.peer_key(frames[0]) if self.config.use_curve else None
            if (self.expected is not None and not self.pending and sender == self.expected_source_key
                    and self.run_expected(frames)):
                continue
            try:
                message = codec.decode(frames)
                self.handle(message, self.members.sender_address(message, sender))
            except p.ProtocolError as exc:
                self.throttle.warning(log, str(exc)[:40], "dropped a message: %s", exc)
            except Exception as exc:
                self.throttle.warning(log, type(exc).__name__, "dropped a message that failed: %r", exc)

    def _forget(self, request_id: str) -> None:
        """Drop the request's state, KV and pending work here (no message sent)."""
        self.expected = None
        self.requests.pop(request_id, None)
        if self.backend is not None:
            self.backend.free(request_id)
        self.pending = [item for item in self.pending if item.request_id != request_id]

    def release(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        if gone:
            self.expected = None
        for request_id in gone:
            if self.requests.pop(request_id, None) is not None and self.backend is not None:
                self.backend.free(request_id)
            if self.sampler is not None:
                self.sampler.forget(request_id)
        if gone:
            self.pending = [item for item in self.pending if item.request_id not in gone]

    def _require_backend(self) -> StageBackend:
        if self.backend is None:
            raise p.ProtocolError("no layers assigned yet")
        return self.backend

    # ----------------------------------------------------------------------------- step
    def step(self) -> None:
        backend = self._require_backend()
        batch, self.hold_until_s = take_batch(
            self.pending, self.requests, is_first=backend.is_first, num_stages_hint=self.num_stages_hint,
            now_s=time.monotonic(),
        )  # fmt: skip
        if any(item.is_prompt_start for item in batch):  # prefix caching (workers/prompt_start.py)
            starts = start_prompts(batch, self.requests, backend)
            for item, held_tokens in starts.misses:
                state = self.requests[item.request_id]
                self._forget(item.request_id)
                self.send(state.start.route[0], p.PrefixMiss(item.request_id, held_tokens))
            for item in starts.never_fit:
                self.fail(item.request_id, f"KV cache is full on {self.worker_id}")
            batch = starts.run
        if not batch:
            return
        chunks = [SequenceChunk(item.request_id, item.start_position, item.num_tokens) for item in batch]
        if backend.is_last and self.sampler is not None:  # prompt logprobs need every row's logits
            wants = self.sampler.wants_all_logits
            chunks = [replace(c, all_logits=True) if wants(self.requests[c.request_id].start.sampling, c.start_position,
                                                           c.num_tokens) else c for c in chunks]
        if not backend.can_allocate(chunks):
            batch, chunks = self._fit_kv(batch, chunks)
            if not batch:
                return
        taken = {id(item) for item in batch}
        self.pending = [item for item in self.pending if id(item) not in taken]
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([item.inputs for item in batch])
        self.run_batch(chunks, inputs, [item.forward_start for item in batch])

    def run_expected(self, frames: list) -> bool:
        """Run the expected decode step if `frames` bring its inputs (workers/expected_step.py)."""
        expected = self.expected
        inputs = expected.inputs(frames) if expected is not None else None
        if inputs is None:
            return False
        self.expected_steps_run += 1
        self.run_batch(expected.chunks, inputs, [None] * len(expected.chunks), expected)
        return True

    def run_batch(
        self,
        chunks: Sequence[SequenceChunk],
        inputs: np.ndarray,
        starts: Sequence[p.RequestStart | None],
        expected: ExpectedStep | None = None,
    ) -> None:
        """Forward one batch, send its outputs on, then make the next decode step ready. A step that
        raises fails only its own requests (the reason goes to the scheduler, then the client)."""
        try:
            self._run_batch(chunks, inputs, starts, expected)
        except Exception as exc:
            self.expected = None
            self.throttle.warning(log, f"step {type(exc).__name__}", "a step failed: %r", exc)
            for chunk in chunks:
                self.fail(chunk.request_id, f"a step failed on {self.worker_id}: {type(exc).__name__}: {exc}"[:500])

    def _run_batch(
        self,
        chunks: Sequence[SequenceChunk],
        inputs: np.ndarray,
        starts: Sequence[p.RequestStart | None],
        expected: ExpectedStep | None = None,
    ) -> None:
        backend = self._require_backend()
        self.expected = None
        started = time.perf_counter()
        outputs = backend.forward(chunks, inputs, expected.prepared if expected is not None else None)
        if self.config.slowdown > 1.0:
            time.sleep((self.config.slowdown - 1.0) * (time.perf_counter() - started))
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        elapsed_s = time.perf_counter() - started
        for chunk in chunks:
            self.requests[chunk.request_id].position += chunk.num_tokens
        if backend.is_last:
            self.emit_tokens(chunks, outputs)
        elif expected is not None and expected.send_header is not None:
            frames = [expected.send_header, array_to_payload(outputs, backend.dtype).data]
            self.send_frames(expected.send_address, frames, "Activations")
        else:
            self.forward_activations(chunks, starts, outputs)
        # The outputs are on their way: let the threads that carry them run before the rest here
        # (ZeroMQ's I/O thread, and on a shared core the next stage), or the kernel may finish this
        # thread's time slice first (on the 2-core VM a co-located hop took 0.25-0.45 ms -> 0.23-0.26).
        _yield_cpu()
        self.step_time_ewma_s = elapsed_s if not self.step_time_ewma_s else 0.8 * self.step_time_ewma_s + 0.2 * elapsed_s
        self.tokens_processed += sum(chunk.num_tokens for chunk in chunks)
        if backend.is_first:  # only the first stage waits for the ring (workers/batching.py)
            now_s = time.monotonic()
            for chunk in chunks:
                state = self.requests.get(chunk.request_id)  # a one-stage ring may have finished it
                if state is not None:
                    state.left_stage(now_s, elapsed_s)
        self.expect_next(chunks)

    def expect_next(self, chunks: Sequence[SequenceChunk]) -> None:
        """Make ready the step that runs every request of `chunks` one token on, when nothing else
        can come first: no pending work, and the batch held every request of this stage (on the
        first stage the ring then runs as one batch, as `take_batch` would have run it)."""
        backend = self.backend
        if backend is None or self.pending or len(chunks) != len(self.requests):
            return
        positions: dict[str, int] = {}
        next_addresses = []
        for chunk in chunks:
            state = self.requests.get(chunk.request_id)
            if state is None or chunk.request_id in positions:
                return  # released in this step (finished), or a request twice in the batch
            positions[chunk.request_id] = state.position
            next_addresses.append(state.next_address)
        self.expected = expect_next(backend, positions, next_addresses)
        if self.config.use_curve:  # the fast path takes its inputs only from the one stage that sends them
            sources = {source_address(self.requests[request_id].start, self.data_address) for request_id in positions}
            self.expected_source_key = self.members.member_keys.get(sources.pop()) if len(sources) == 1 else ""

    def _fit_kv(self, batch: list[WorkItem], chunks: list[SequenceChunk]) -> tuple[list[WorkItem], list[SequenceChunk]]:
        """Keep the items that fit; fail decodes that cannot grow, leave prefills waiting."""
        backend = self._require_backend()
        kept_items: list[WorkItem] = []
        kept_chunks: list[SequenceChunk] = []
        for item, chunk in zip(batch, chunks):
            if backend.can_allocate([*kept_chunks, chunk]):
                kept_items.append(item)
                kept_chunks.append(chunk)
            elif item.start_position > 0 or len(self.requests) <= 1:
                # a running request cannot grow, or a prompt will never fit: tell the scheduler
                self.fail(item.request_id, f"KV cache is full on {self.worker_id}")
        return kept_items, kept_chunks

    def fail(self, request_id: str, message: str) -> None:
        state = self.requests.get(request_id)
        if state is not None:
            self.send(state.start.scheduler_address, p.RequestFailed(self.worker_id, request_id, message))
        self.release((request_id,))

    def _new_request(self, request_id: str, start: p.RequestStart) -> StageRequest:
        """This stage's state of a request; its successor on the route is found once, here."""
        backend = self._require_backend()
        route = start.route
        index = route.index(self.data_address) if self.data_address in route else -1
        if not backend.is_last and not 0 <= index < len(route) - 1:
            raise p.ProtocolError(f"{self.data_address} has no successor in the route of {request_id}")
        return StageRequest(request_id, start, None if backend.is_last else route[index + 1])

    def forward_activations(
        self, chunks: Sequence[SequenceChunk], starts: Sequence[p.RequestStart | None], hidden: np.ndarray
    ) -> None:
        groups: dict[str, tuple[list[p.ActivationEntry], list[np.ndarray]]] = {}
        row = 0
        for chunk, start in zip(chunks, starts):
            rows = hidden[row : row + chunk.num_tokens]
            row += chunk.num_tokens
            state = self.requests[chunk.request_id]
            entries, tensors = groups.setdefault(state.next_address, ([], []))
            entries.append(p.ActivationEntry(chunk.request_id, chunk.start_position, chunk.num_tokens, start))
            tensors.append(rows)
        for address, (entries, tensors) in groups.items():
            stacked = tensors[0] if len(tensors) == 1 else np.concatenate(tensors)
            self.send(address, p.Activations(tuple(entries), array_to_payload(stacked, self._require_backend().dtype)))

    def emit_tokens(self, chunks: Sequence[SequenceChunk], logits: np.ndarray) -> None:
        states = [self.requests[chunk.request_id] for chunk in chunks]
        indices = [state.start.first_token_index + state.num_generated for state in states]
        rows = [chunk.num_tokens if chunk.all_logits else 1 for chunk in chunks]
        assert self.sampler is not None
        sampled = self.sampler.sample([c.request_id for c in chunks], [s.start.sampling for s in states], indices,
                                      torch.from_numpy(logits), rows)
        ring = close_ring(states, indices, sampled, self.worker_id)
        # the next step's inputs first: the first stage waits on them, the scheduler only streams
        for address, message in ring.next_tokens.items():
            if address == self.data_address:  # a single-stage pipeline: the ring is this worker
                self.on_next_tokens(message)
            else:
                self.send(address, message)
        for address, message in ring.token_outputs.items():
            self.send(address, message)
        self.release(ring.finished)


def stop_within(grace_s: float) -> None:
    """Ctrl-C ends the process within `grace_s` whatever the clean-up meets (a socket that will
    not close, a thread that will not stop): a daemon timer exits hard after one log line."""

    def exit_now() -> None:
        log.error("stopping took over %.0f s; exiting now", grace_s)
        logging.shutdown()
        os._exit(130)

    timer = threading.Timer(grace_s, exit_now)
    timer.daemon = True
    timer.start()


def run_worker(config: WorkerConfig) -> None:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    pin = config.pin_threads and config.device == "cpu" and config.backend == "torch"  # torch's OpenMP threads
    worker = Worker(config, find_compute_threads() if pin else None)
    log.info("%s listening on %s, scheduler %s", worker.worker_id, worker.data_address, config.scheduler_address)
    worker.run()
