"""The scheduler engine: workers register, layers are assigned, requests flow through routes.

The request loop (`Engine.generate`, what the API calls), in the order a request lives it:

    state = RequestState(request)                 # scheduler/request_state.py: the whole life
    await self._admit(state)                      # admission: route now, or wait (FIFO) or 429
    while True:
        output = await self._next_output(state)   # a token; a lost stage replays via _admit
        taken = state.token(output, workers)      # only the current attempt's next index
        yield stream.step(taken, output)          # text, logprobs, finish; finished() frees KV

Beside it two loops serve the sockets: `_receive_loop` takes everything workers send on one PULL
socket (registrations, heartbeats, layers ready, tokens, failures) and `_monitor_loop` declares
silent workers lost and re-plans. One PUSH socket per worker carries assignments, request starts
and releases. Every reservation a request holds on a stage changes in `RequestState` alone.

Every socket is CURVE and every message is checked against who may send it before it is handled
(scheduler/membership.py, workers/curve.py).

Parts: `Engine` (the loops above, planning: `replan`, `_assign`, and the snapshots the API serves).
`EngineConfig` (imported from here too): scheduler/engine_config.py; worker sockets: worker_links.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import zmq
import zmq.asyncio

from scheduler import snapshots
from scheduler.admission import AdmissionQueue
from scheduler.cluster import Cluster, LayerPlan, WorkerState, weight_format
from scheduler.engine_config import EngineConfig
from scheduler.errors import GenerationFailedError, InvalidRequestError, NoCapacityError, OverloadedError
from scheduler.link_table import LinkTable, probe_requests
from scheduler.load import load_snapshot
from scheduler.membership import Membership, check_request, ghost_requests
from scheduler.metrics import EngineMetrics
from scheduler.planner import MIN_MIX_REQUESTS, PlannerConfig, assignment, plan_layers
from scheduler.output_stream import OutputStream
from scheduler.prefix_index import PrefixIndex, prompt_hashes
from scheduler.request import GenerationOutput, GenerationRequest
from scheduler.request_state import RequestState, WorkloadStats
from scheduler.rollout import Rollout
from scheduler.routing import choose_route
from scheduler.tokenizer import Tokenizer
from scheduler.worker_links import WorkerLinks
from workers import codec, curve, protocol as p

log = logging.getLogger("potluck.scheduler")
Inbox = asyncio.Queue  # of p.TokenOutput, or None: the attempt ended, look at the RequestState


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_id = config.served_model_name
        self.max_model_len = config.max_model_len or config.model.max_position_embeddings
        self.planner_config = PlannerConfig(self.max_model_len, config.max_concurrent_sequences, placement=config.placement,
            objective=config.placement_objective, prompt_tokens_per_output_token=config.prompt_tokens_per_output_token,
            kv_tokens=config.kv_tokens)
        self.cluster = Cluster(config.model.num_layers, weight_format=weight_format(config.model_dir), quantization=config.quantization)
        self.requests: dict[str, RequestState] = {}  # routed requests, by wire id
        self.inboxes: dict[str, Inbox] = {}  # each routed request's tokens, by wire id
        self.async_context = zmq.asyncio.Context()
        self.pull: zmq.asyncio.Socket | None = None
        self.control_address = ""
        self.tasks: list[asyncio.Task] = []
        self.routes_changed = asyncio.Event()
        self.admission: AdmissionQueue[str] = AdmissionQueue(config.max_waiting, config.retry_after_s, config.route_wait_s)
        self.workload = WorkloadStats()
        self.metrics = EngineMetrics(self)  # Prometheus series (scheduler/metrics.py)
        self.membership = Membership(config.token, config.curve)  # token, keys, who may say what
        self.token = self.membership.token
        self.links = WorkerLinks(self.membership)  # a PUSH socket to each registered worker
        self.prefix_index = PrefixIndex()  # which stages hold which prefixes (cache-aware routing)
        self.link_table = LinkTable()  # links the workers measured (scheduler/link_table.py)
        self.layer_source = ("", "")  # (address, public key) joiners fetch layers from (api/cli.py sets it)
        self.rollout = Rollout()  # a plan held while joiners fetch their layers (scheduler/rollout.py)

    # ------------------------------------------------------------------------------- the request loop
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        request = request.within_context(self.max_model_len)
        check_request(request, self.config.model.vocab_size)  # what a worker would refuse: a 400 now
        state = RequestState(request)
        inbox: Inbox = Inbox()
        stream = OutputStream(self.tokenizer, request)
        timer = self.metrics.on_start(len(request.prompt_token_ids))
        try:
            await self._admit(state, inbox)
            while True:
                output = await self._next_output(state, inbox)
                taken = state.token(output, self.cluster.workers)
                if taken is None:
                    continue  # from an earlier attempt, or a duplicate
                if taken.prompt_through and len(self.admission):
                    self._routes_changed()  # shorter stage queues: a held request may go
                self.workload.on_token()
                self.metrics.on_token(timer)
                step = stream.step(taken, output)
                if step.finish_reason is not None:
                    self.metrics.on_finish(timer, step.finish_reason)
                    self.workload.on_finished(state)
                    self._release(state.wire_id, state.finished(step.finish_reason, self.cluster.workers))
                yield step
                if step.finish_reason is not None:
                    return
        finally:
            self._release(state.wire_id, state.aborted(self.cluster.workers))
            self.metrics.on_end(timer)

    async def _admit(self, state: RequestState, inbox: Inbox) -> None:
        """Route now, or wait: for layers being loaded (up to `route_wait_s`), or in the admission
        queue while every path is KV-full or queued past `MAX_QUEUE_WAIT_S` (scheduler/admission.py:
        FIFO; past `max_waiting`, or after `route_wait_s`, the request gets a 429)."""
        started_s = time.monotonic()
        key = state.request.request_id
        try:
            while True:
                now_s = time.monotonic()
                if self.cluster.usable_routes():
                    decision, route = self.admission.poll(key, now_s, lambda: self.choose_route(state), since_s=started_s)
                    if route is not None:
                        self._start(state, route, inbox)
                        return
                    if decision.reason == "full":
                        raise OverloadedError(f"all {len(self.admission)} admission slots are taken and every path "
                                              "is full or queued; retry later", retry_after_s=self.config.retry_after_s)
                    if decision.reason == "expired":
                        raise OverloadedError(f"every path stayed full or queued for {self.config.route_wait_s:.0f} s; "
                                              "retry later", retry_after_s=self.config.retry_after_s)
                elif not self.cluster.expecting_routes(self.config.local_workers):
                    raise NoCapacityError("no path through the model's layers is available: " + (
                        "no worker has joined yet (start one with `potluck join`)" if not self.cluster.workers else "no worker serves it"))
                elif now_s - started_s >= self.config.route_wait_s:
                    raise NoCapacityError(f"no path through the model's layers became available in {self.config.route_wait_s:.0f} s")
                remaining_s = started_s + self.config.route_wait_s - time.monotonic()
                try:
                    await asyncio.wait_for(self.routes_changed.wait(), timeout=max(0.0, min(remaining_s, 0.5)))
                except TimeoutError:
                    pass
        finally:
            if self.admission.remove(key):
                self._routes_changed()  # the next in line may go

    def choose_route(self, state: RequestState) -> tuple[str, ...] | None:
        """The path with the least predicted TTFT + DECODE_WEIGHT x decode time among stages with room;
        None while every path is full or would queue the prompt past MAX_QUEUE_WAIT_S (routing.py)."""
        snapshot = load_snapshot(self.cluster, self.config.model, self.link_table)
        request = state.route_request
        if self.config.prefix_caching:  # a stage holding a prefix prefills only the rest
            tokens = state.replay_token_ids
            request = replace(request, cached_tokens=self.prefix_index.lookup(prompt_hashes(tokens), len(tokens)))
        choice = choose_route(snapshot, request, max_queue_wait_s=self.config.max_queue_wait_s)
        return None if choice is None else choice.worker_ids

    def _start(self, state: RequestState, route: tuple[str, ...], inbox: Inbox) -> None:
        transition = state.routed if state.lost_reason is None else state.replayed
        start = transition(route, self.cluster.workers, self.control_address)
        self.requests[state.wire_id] = state
        self.inboxes[state.wire_id] = inbox
        if self.config.prefix_caching:
            capacity_blocks = {w: self.cluster.workers[w].kv_capacity_tokens // self.prefix_index.block_size for w in route}
            self.prefix_index.record(capacity_blocks, prompt_hashes(start.token_ids))
        self._send(route[0], start)

    async def _next_output(self, state: RequestState, inbox: Inbox) -> p.TokenOutput:
        """The next output a stage sent for this request; after a lost stage, replay first."""
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), timeout=self.config.token_timeout_s)
            except TimeoutError:
                raise GenerationFailedError(f"no token for {self.config.token_timeout_s:.0f} s") from None
            if item is not None:
                return item
            if state.error is not None:
                raise state.error
            log.info("replaying %s after %d tokens: %s", state.request.request_id, state.num_generated, state.lost_reason)
            await self._admit(state, inbox)

    def _restart(self, state: RequestState, reason: str) -> None:
        """A stage of the request's route is gone: end the attempt, wake its stream to replay."""
        if not state.is_routed:
            return
        wire_id = state.wire_id
        inbox = self.inboxes.get(wire_id)
        self.metrics.on_restart(reason)
        self._release(wire_id, state.stage_lost(reason, self.cluster.workers, self.config.max_restarts))
        if inbox is not None:
            inbox.put_nowait(None)

    def _fail(self, state: RequestState, error: Exception) -> None:
        """End the request with `error` for its client."""
        wire_id = state.wire_id
        inbox = self.inboxes.get(wire_id)
        self._release(wire_id, state.aborted(self.cluster.workers, error))
        if inbox is not None:
            inbox.put_nowait(None)

    def _restart_through(self, worker_id: str, reason: str) -> None:
        for state in [state for state in self.requests.values() if worker_id in state.route]:
            self._restart(state, reason)

    def _release(self, wire_id: str, held: tuple[str, ...]) -> None:
        """Forget an ended attempt and tell the stages that still hold it to free its KV."""
        self.requests.pop(wire_id, None)
        self.inboxes.pop(wire_id, None)
        for worker_id in held:
            self._send(worker_id, p.ReleaseRequests((wire_id,)))
        self._routes_changed()  # capacity freed: waiting requests may go

    def _routes_changed(self) -> None:
        self.routes_changed.set()
        self.routes_changed = asyncio.Event()

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.pull = self.async_context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.membership.start(self.async_context)
        self.membership.secure_server(self.pull)
        host, port = self.config.control_host, self.config.control_port
        if port:
            self.pull.bind(f"tcp://{host}:{port}")
        else:
            port = self.pull.bind_to_random_port(f"tcp://{host}")
        advertised = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        self.control_address = f"tcp://{advertised}:{port}"
        self.tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._monitor_loop())]
        log.info("scheduler listening on %s", self.control_address)

    async def stop(self, shutdown_workers: bool = False) -> None:
        if shutdown_workers:
            for worker_id in list(self.cluster.workers):
                self._send(worker_id, p.Shutdown("scheduler stopping"))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for wire_id, state in list(self.requests.items()):
            state.aborted(self.cluster.workers, NoCapacityError("the server is shutting down"))
            self.inboxes[wire_id].put_nowait(None)
        self.links.close_all(linger_ms=100 if shutdown_workers else 0)
        if self.pull is not None:
            self.pull.close(linger=0)
        self.membership.stop()
        self.links.term()
        self.async_context.term()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until at least one route is usable."""
        deadline = time.monotonic() + timeout_s
        while not self.cluster.usable_routes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no usable route after {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------------------- messages
    def _send(self, worker_id: str, message: p.Message) -> None:
        self.links.send(worker_id, message)

    async def _receive_loop(self) -> None:
        assert self.pull is not None
        while True:
            frames = await self.pull.recv_multipart(copy=False)
            try:
                message = self.membership.authorise(codec.decode(frames), curve.peer_key(frames[0]), self.requests, self.cluster.workers)
                if message is not None:
                    self._handle(message)
            except p.ProtocolError as exc:
                log.warning("dropped a malformed message: %s", exc)
            except Exception:
                log.exception("failed to handle a worker message")

    def _handle(self, message: p.Message) -> None:
        match message:
            case p.TokenOutputs():
                for output in message.outputs:
                    if (inbox := self.inboxes.get(output.request_id)) is not None:
                        inbox.put_nowait(output)
            case p.Heartbeat():
                if message.worker_id in self.cluster.workers:
                    self.cluster.on_heartbeat(message)
                    if ghosts := ghost_requests(message, self.requests):  # held, unknown here: free them
                        self._send(message.worker_id, p.ReleaseRequests(ghosts))
                elif message.data_address:  # a worker we declared lost is back: take it in again
                    log.info("worker %s is back; asking it to register again", message.worker_id)
                    self.links.send_once(message.data_address, p.Reregister("evicted after a silence"), message.worker_id)
            case p.Register():
                self._on_register(message)
            case p.LinkReport():  # a re-plan when a link is new or changed (the plan may avoid it)
                workers = self.cluster.workers
                if message.worker_id in workers and self.link_table.record(message.worker_id, message.links, workers):
                    if self.cluster.plan is not None:
                        self.replan()
            case p.LayersReady() if message.prefetched:
                self.rollout.on_prefetched(self, message)
            case p.Leave():  # Ctrl-C / SIGTERM on the worker: its requests replay now
                if message.worker_id in self.cluster.workers:
                    self._lose(message.worker_id, f"left ({message.reason})")
                    self.replan()
            case p.LayersReady():
                if (state := self.cluster.on_layers_ready(message)) is not None and state.error:
                    log.error("%s cannot load layers %s: %s; planning without it", state.worker_id, state.assigned, state.error)
                    state.draining = True  # out of the plan (its error in /cluster) until it registers again
                    self.replan()
                self._routes_changed()
            case p.RequestFailed():
                if (state := self.requests.get(message.request_id)) is not None:
                    log.warning("%s failed on %s: %s", message.request_id, message.worker_id, message.message)
                    if message.fatal:  # bad input: another route would refuse it too
                        self._fail(state, InvalidRequestError(message.message))
                    else:
                        self._restart(state, reason=message.message)
            case _:
                log.warning("unexpected message %s", type(message).__name__)

    def _on_register(self, message: p.Register) -> None:
        if message.protocol_version != p.PROTOCOL_VERSION:
            log.error("%s speaks protocol %d, not %d", message.worker_id, message.protocol_version, p.PROTOCOL_VERSION)
            return
        if message.worker_id in self.cluster.workers:
            self._lose(message.worker_id, "registered again")
        held = self.cluster.register(message)
        if held.refused:
            log.warning("worker %s is left out of the plan: %s", message.worker_id, held.refused)
        if message.loaded_model_dir == self.config.model_dir and message.loaded_end_layer > message.loaded_start_layer:
            held.loaded = (message.loaded_start_layer, message.loaded_end_layer)  # the re-plan keeps it where it can
        self.links.connect(message.worker_id, message.data_address, message.public_key)
        self._send_members()
        self.probe_links((message.worker_id,))
        log.info("worker %s registered from %s (%s, %d bytes)", message.worker_id, message.data_address, message.device, message.memory_bytes)
        if len(self.cluster.workers) >= self.config.min_workers:
            self.replan()

    def _lose(self, worker_id: str, reason: str) -> None:
        log.warning("worker %s lost: %s", worker_id, reason)
        self.cluster.remove(worker_id)
        self.prefix_index.forget(worker_id)
        self.link_table.forget(worker_id)
        self.links.close(worker_id)
        self._send_members()
        self._restart_through(worker_id, f"worker {worker_id} lost")

    def _send_members(self) -> None:
        members = self.membership.members_message(self.cluster.workers)
        for worker_id in self.cluster.workers:
            self._send(worker_id, members)

    def probe_links(self, worker_ids: tuple[str, ...] = ()) -> int:
        """Ask these workers (all: every pair once) to measure their links; how many were asked."""
        asks = probe_requests(self.cluster.workers, self.membership.key_of, worker_ids)
        for worker_id, message in asks.items():
            self._send(worker_id, message)
        return len(asks)

    async def _monitor_loop(self) -> None:
        tick_s = 0.25
        last_s = time.monotonic()
        while True:
            await asyncio.sleep(tick_s)
            now_s = time.monotonic()
            stalled = now_s - last_s > 4 * tick_s  # this loop was starved: heartbeats may be queued
            last_s = now_s
            if stalled:
                continue
            stale = self.cluster.stale_workers(self.config.heartbeat_timeout_s)
            for worker_id in stale:
                self._lose(worker_id, f"silent for more than {self.config.heartbeat_timeout_s} s")
            if (stale or self.cluster.drained_workers()) and self.cluster.workers:
                self.replan()

    def drain(self, worker_id: str) -> None:
        """Finish the worker's in-flight requests, route nothing new to it, then unload its layers."""
        self.cluster.workers[worker_id].draining = True  # KeyError for a worker it does not know
        self._routes_changed()

    # ------------------------------------------------------------------------------- planning
    def workload_mix(self) -> tuple[float, float]:
        """(prompt tokens per output token, KV tokens per sequence) the next plan is for."""
        return self.workload.mix(self.planner_config.prompt_tokens_per_output_token, MIN_MIX_REQUESTS)

    def replan(self) -> None:
        """Plan for the registered workers; only workers whose range changes reload."""
        self.rollout.cancel()
        workers = [w for w in self.cluster.workers.values() if not w.draining and not w.refused]
        if not workers:
            self.cluster.plan = None
            return
        current = {w.worker_id: w.loaded for w in workers if w.loaded is not None}
        self.cluster.epoch += 1
        ratio, kv_tokens = self.workload_mix()
        config = replace(self.planner_config, prompt_tokens_per_output_token=ratio, kv_tokens_per_sequence=kv_tokens)
        try:
            plan = plan_layers(self.config.model, workers, config, self.cluster.epoch, current, self.link_table)
        except NoCapacityError as exc:
            log.error("cannot plan: %s", exc)
            return
        if not self.rollout.start(self, plan):  # else the current plan serves until the fetches are done
            self.apply_plan(plan)

    def apply_plan(self, plan: LayerPlan) -> None:
        self.cluster.plan = plan
        for worker in self.cluster.workers.values():
            new_range = plan.ranges.get(worker.worker_id)
            if new_range is not None and worker.assigned == new_range and worker.error is None:
                continue  # keeps its layers (and its requests)
            self._assign(worker, new_range, plan)
        self._routes_changed()

    def _assign(self, worker: WorkerState, new_range: tuple[int, int] | None, plan: LayerPlan) -> None:
        held = self.cluster.assign(worker, new_range, plan.epoch)
        self.prefix_index.forget(worker.worker_id)  # new layers, empty cache
        self._restart_through(worker.worker_id, f"{worker.worker_id} re-assigned")
        if new_range is None:
            if held:
                self._send(worker.worker_id, p.UnloadLayers(plan.epoch))
            return
        message = assignment(self.config.model_dir, self.config.dtype, self.config.model, worker, new_range, plan,
                             self.planner_config, self.config.prefix_caching)
        address, key = self.layer_source
        self._send(worker.worker_id, replace(message, quantization=self.config.quantization, layers_address=address, layers_key=key))

    # ------------------------------------------------------------------------------- snapshots
    def worker_snapshot(self, worker_id: str) -> dict:
        return snapshots.worker_snapshot(self.cluster.workers[worker_id])

    def cluster_snapshot(self) -> dict:
        return snapshots.cluster_snapshot(self)

    def requests_snapshot(self) -> list[dict]:
        return snapshots.requests_snapshot(self.requests.values())
