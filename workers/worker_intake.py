"""What a worker does with each message it receives, after its sender is known (workers/peers.py).

Parts: `MessageIntake`, a part of `Worker` (workers/worker.py), with
- `handle(message, sender)`: the dispatch, one case per message type (`ProbeLinks` goes to the
  link prober's thread, workers/link_prober.py);
- `on_members`, `on_assign` (load the new layers before the old ones go; report `LayersReady`);
- `on_start` (first stage: a request's prompt), `on_activations` (hidden states from the stage
  before), `on_next_tokens` (the last stage's tokens back at the first), `on_prefix_miss` (a
  later stage lacks the reused prefix: prefill again).
Every message counts only from its rightful sender, and every field is checked before it is taken
(workers/validation.py); a bad one raises `ProtocolError`, which the worker logs and drops.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from workers import protocol as p, validation
from workers.backend import StageConfig, load_backend
from workers.batching import WorkItem
from workers.host_arrays import payload_to_array
from workers.kv_cache import block_hashes
from workers.peers import source_address
from workers.request_sampler import StageSampler
from workers.thread_affinity import pin_compute_threads

log = logging.getLogger("potluck.worker")


class MessageIntake:
    """The receiving half of `Worker`; it reads and changes the worker's state (workers/worker.py)."""

    def handle(self, message: p.Message, sender: str | None = None) -> None:
        match message:
            case p.Activations():
                self.on_activations(message, sender)
            case p.NextTokens():
                self.on_next_tokens(message, sender)
            case p.Members():
                self.on_members(message)
            case p.PrefixMiss():
                self.on_prefix_miss(message, sender)
            case p.StartRequest():
                self.on_start(message)
            case p.ReleaseRequests():
                self.release(message.request_ids)
            case p.AssignLayers():
                self.on_assign(message)
            case p.UnloadLayers():
                self.release(tuple(self.requests))
                self.backend = self.expected = None
                self.epoch = message.epoch
            case p.Reregister():
                log.warning("the scheduler asks for a new registration: %s", message.reason)
                self.release(tuple(self.requests))
                self.backend = self.expected = None
                self.register()
            case p.ProbeLinks():
                self.links.ask(message.peers)
            case p.Shutdown():
                log.info("shutdown: %s", message.reason)
                self.running = False
            case _:
                log.warning("unexpected message %s", type(message).__name__)

    def on_members(self, message: p.Members) -> None:
        changed, admitted = self.members.update(message, self.data_address)
        for address in changed:  # gone, or another key: connect afresh
            if (sock := self.peers.pop(address, None)) is not None:
                sock.close(linger=0)
        if admitted:
            self.admitted.set()

    def on_assign(self, message: p.AssignLayers) -> None:
        # the new layers load before the old ones go: a bad assignment leaves this stage serving
        try:
            backend = load_backend(
                StageConfig(
                    model_dir=message.model_dir,
                    start_layer=message.start_layer,
                    end_layer=message.end_layer,
                    dtype=message.dtype,
                    device=self.config.device,
                    kv_budget_bytes=message.kv_budget_bytes,
                    prefix_caching=message.prefix_caching,
                    quantization=None if message.quantization == "none" else message.quantization,
                ),
                self.config.backend,
            )
        except Exception as exc:  # report, stay up, wait for another assignment
            log.exception("loading layers failed")
            self.to_scheduler(
                p.LayersReady(self.worker_id, message.epoch, message.start_layer, message.end_layer, error=str(exc))
            )
            return
        self.release(tuple(self.requests))
        self.backend, self.expected = backend, None
        self.num_stages_hint = max(1, message.num_stages_hint)
        self.epoch = message.epoch
        self.sampler = StageSampler(message.model_dir, self.backend.vocab_size)
        if self.compute_threads is not None:
            pinned = pin_compute_threads(self.compute_threads)
            log.info("pinned threads to cores (thread id: core): %s", pinned)
            self.compute_threads = None
        self.to_scheduler(
            p.LayersReady(
                worker_id=self.worker_id,
                epoch=message.epoch,
                start_layer=message.start_layer,
                end_layer=message.end_layer,
                kv_capacity_tokens=self.backend.kv_capacity_tokens(),
                weight_bytes=self.backend.weight_bytes,
            )
        )

    def on_start(self, message: p.StartRequest) -> None:
        backend = self._require_backend()
        if not backend.is_first or not message.token_ids:
            raise p.ProtocolError("StartRequest needs a first stage and at least one token")
        if message.request_id in self.requests:
            raise p.ProtocolError(f"request {message.request_id} already started")
        try:
            validation.check_token_ids(message.token_ids, backend.vocab_size)
            validation.check_start(message.start, self.data_address)
        except p.ProtocolError as exc:  # the scheduler sent it: tell it, so its client gets the reason
            failed = p.RequestFailed(self.worker_id, message.request_id, f"refused by {self.worker_id}: {exc}", fatal=True)
            self.send(self.config.scheduler_address, failed)
            raise
        self.members.scheduler_addresses.add(message.start.scheduler_address)
        start = message.start
        if backend.config.prefix_caching:  # later stages find the cached prefix by these hashes
            start = replace(start, block_hashes=block_hashes(message.token_ids, backend.config.kv_block_size_tokens))
        state = self._new_request(message.request_id, start)
        state.prompt = np.array(message.token_ids, dtype=np.int64)
        self.requests[message.request_id] = state
        self.pending.append(WorkItem(message.request_id, 0, state.prompt, forward_start=start, is_prompt_start=True))

    def on_activations(self, message: p.Activations, sender: str | None = None) -> None:
        backend = self._require_backend()
        validation.check_entries(message.entries)
        hidden = payload_to_array(message.hidden)  # [sum(num_tokens), hidden_size]
        if message.hidden.dtype != backend.dtype:
            raise p.ProtocolError(f"activations in {message.hidden.dtype}, this stage runs {backend.dtype}")
        total = sum(entry.num_tokens for entry in message.entries)
        if hidden.ndim != 2 or hidden.shape[0] != total or hidden.shape[1] != backend.hidden_size:
            raise p.ProtocolError(f"activations of shape {tuple(hidden.shape)} do not match entries")
        for entry in message.entries:  # every entry checked before any is taken
            state = self.requests.get(entry.request_id)
            if state is None and entry.start is None:
                continue  # stale: dropped below
            start = entry.start if entry.start is not None else state.start
            if entry.start is not None:  # a first hop (the first stage may have reused a cached prefix)
                validation.check_start(entry.start, self.data_address)
            if sender is not None and source_address(start, self.data_address) != sender:
                raise p.ProtocolError(f"activations of {entry.request_id} from {sender}, not the stage before")
        row = 0
        for entry in message.entries:
            rows = hidden[row : row + entry.num_tokens]
            row += entry.num_tokens
            state = self.requests.get(entry.request_id)
            if entry.start is not None:  # the first hop (again after a prefix miss further on)
                self.members.scheduler_addresses.add(entry.start.scheduler_address)
                if state is not None:
                    self._forget(entry.request_id)
                state = self._new_request(entry.request_id, entry.start)
                state.position = entry.start_position  # what the first stage reused of its cache
                self.requests[entry.request_id] = state
            elif state is None or state.position != entry.start_position:
                log.debug("dropped stale activations for %s", entry.request_id)
                continue
            self.pending.append(
                WorkItem(entry.request_id, entry.start_position, rows, entry.start, is_prompt_start=entry.start is not None)
            )

    def on_next_tokens(self, message: p.NextTokens, sender: str | None = None) -> None:
        vocab_size = self._require_backend().vocab_size
        for token in message.tokens:
            state = self.requests.get(token.request_id)
            if state is None or state.position != token.position:
                continue  # released (finished, stopped or aborted) meanwhile
            if sender is not None and source_address(state.start, self.data_address) != sender:
                raise p.ProtocolError(f"next tokens of {token.request_id} from {sender}, not the last stage")
            if not 0 <= token.token_id < vocab_size:
                self.fail(token.request_id, f"next token {token.token_id} outside the vocabulary")
                continue
            if token.finished:
                self.release((token.request_id,))
                continue
            inputs = np.array([token.token_id], dtype=np.int64)
            self.pending.append(WorkItem(token.request_id, token.position, inputs))

    def on_prefix_miss(self, message: p.PrefixMiss, sender: str | None = None) -> None:
        """First stage: a later stage lacks part of the prefix reused here; prefill it again."""
        state = self.requests.get(message.request_id)
        if state is None or state.prompt is None or state.num_generated:
            return
        if sender is not None and sender not in state.start.route[1:]:
            raise p.ProtocolError(f"prefix miss of {message.request_id} from {sender}, not a later stage")
        log.info("prefix miss for %s: prefilling again, reusing at most %d tokens", message.request_id, message.cached_tokens)
        self._forget(message.request_id)
        state.position = 0
        self.requests[message.request_id] = state
        self.pending.append(
            WorkItem(message.request_id, 0, state.prompt, forward_start=state.start, is_prompt_start=True,
                     prefix_cap_tokens=message.cached_tokens)
        )  # fmt: skip

