"""The scheduler engine: workers register, layers are assigned, requests flow through routes.

Parts:
- `EngineConfig`: the model, where the control socket listens, timeouts.
- `RequestState`: one request in flight: its route, tokens so far, the queue its stream reads.
- `Engine`: one PULL socket receives everything workers send (registrations, heartbeats, tokens,
  failures); one PUSH socket per worker carries assignments, request starts and releases.
  `generate()` is what the API calls: it yields `GenerationOutput`s as tokens arrive.

The idea that keeps recovery simple: a request's state is the prompt plus the tokens the client
has already received. Whenever its route breaks (a worker lost, re-assigned or out of KV), the
request starts again on another route from exactly that state (`first_token_index` =
tokens already sent), and tokens are accepted only in index order, so the client's stream has no
lost or duplicated token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from scheduler.cluster import Cluster, LayerPlan, WorkerState
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler import snapshots
from scheduler.admission import AdmissionQueue
from scheduler.errors import InvalidRequestError, GenerationFailedError, NoCapacityError, OverloadedError, PromptTooLongError
from scheduler.load import load_snapshot
from scheduler.membership import Membership, check_request, ghost_requests
from scheduler.metrics import EngineMetrics
from scheduler.planner import (DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN, MIN_MIX_REQUESTS, PlannerConfig,
                               kv_budget_bytes, plan_layers)
from scheduler.request import GenerationOutput, GenerationRequest, TokenLogprob
from scheduler.routing import MAX_QUEUE_WAIT_S, RouteRequest, choose_route
from scheduler.tokenizer import Tokenizer
from workers import codec, curve
from workers import protocol as p

log = logging.getLogger("potluck.scheduler")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    model: p.ModelFacts
    served_model_name: str
    control_host: str = "127.0.0.1"
    control_port: int = 0  # 0: a free port
    dtype: str = "auto"
    min_workers: int = 1  # plan once this many workers have registered
    local_workers: int = 0  # workers started with this scheduler: requests wait for them to join
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_concurrent_sequences: int = 16  # KV reserve is sized for this many full-length sequences
    heartbeat_timeout_s: float = 5.0
    token_timeout_s: float = 120.0  # no token for this long: the request fails
    route_wait_s: float = 30.0  # how long a request waits for layers being loaded or a path with room
    max_restarts: int = 8
    max_waiting: int = 64  # admission queue bound: beyond it, HTTP 429
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S  # late binding (scheduler/routing.py); inf: off
    retry_after_s: float = 2.0
    placement: str = "auto"  # auto | solver | pipeline (scheduler/planner.py)
    placement_objective: str = "throughput"  # or "latency"
    # prompt tokens per output token placement plans for until MIN_MIX_REQUESTS have finished
    # (then: what they had); scheduler/planner.py
    prompt_tokens_per_output_token: float = DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN
    token: str | None = None  # the cluster token (None: a new one, `Engine.token`); scheduler/membership.py
    curve: bool = True  # CurveZMQ on every socket (off only to measure what it costs)


@dataclass
class RequestState:
    request: GenerationRequest
    queue: asyncio.Queue
    route: tuple[str, ...] = ()
    attempt: int = 0
    generated: list[int] = field(default_factory=list)
    started_at_s: float = field(default_factory=time.monotonic)
    reserved_kv_tokens: int = 0  # per stage of the current route
    queued_prefill_tokens: int = 0  # per stage of the current route, until its first token

    @property
    def wire_id(self) -> str:
        return f"{self.request.request_id}#{self.attempt}"


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_id = config.served_model_name
        self.max_model_len = config.max_model_len or config.model.max_position_embeddings
        self.planner_config = PlannerConfig(
            self.max_model_len,
            config.max_concurrent_sequences,
            objective=config.placement_objective,
            placement=config.placement,
            prompt_tokens_per_output_token=config.prompt_tokens_per_output_token,
        )
        self.cluster = Cluster(num_layers=config.model.num_layers)
        self.requests: dict[str, RequestState] = {}  # by wire id
        self.sockets: dict[str, zmq.Socket] = {}
        self.sync_context = zmq.Context()
        self.async_context = zmq.asyncio.Context()
        self.pull: zmq.asyncio.Socket | None = None
        self.control_address = ""
        self.tasks: list[asyncio.Task] = []
        self.routes_changed = asyncio.Event()
        self.admission: AdmissionQueue[str] = AdmissionQueue(config.max_waiting, config.retry_after_s)
        self.tokens_generated = 0
        self.finished_requests = 0  # and their prompt / generated tokens: the workload mix
        self.finished_prompt_tokens = 0
        self.finished_output_tokens = 0
        self.metrics = EngineMetrics(self)  # Prometheus series (scheduler/metrics.py)
        self.membership = Membership(config.token, config.curve)  # token, keys, who may say what
        self.token = self.membership.token

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.pull = self.async_context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.membership.start(self.async_context)
        self.membership.secure_server(self.pull)
        host = self.config.control_host
        if self.config.control_port:
            self.pull.bind(f"tcp://{host}:{self.config.control_port}")
            port = self.config.control_port
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
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for state in self.requests.values():
            state.queue.put_nowait(NoCapacityError("the server is shutting down"))
        for sock in self.sockets.values():
            sock.close(linger=100 if shutdown_workers else 0)
        if self.pull is not None:
            self.pull.close(linger=0)
        self.membership.stop()
        self.sync_context.term()
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
        sock = self.sockets.get(worker_id)
        if sock is None:
            return
        try:
            sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("worker %s is not taking messages", worker_id)

    def _send_once(self, address: str, message: p.Message, worker_id: str = "") -> None:
        key = self.membership.key_at(address, self.cluster.workers) or self.membership.key_of.get(worker_id, "")
        if self.membership.use_curve and not key:
            return
        sock = self.sync_context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        self.membership.secure_client(sock, key)
        sock.connect(address)
        try:
            sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        sock.close()

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
                    state = self.requests.get(output.request_id)
                    if state is not None:
                        state.queue.put_nowait(output)
            case p.Heartbeat():
                if message.worker_id in self.cluster.workers:
                    self.cluster.on_heartbeat(message)
                    if ghosts := ghost_requests(message, self.requests):  # held, unknown here: free them
                        self._send(message.worker_id, p.ReleaseRequests(ghosts))
                elif message.data_address:  # a worker we declared lost is back: take it in again
                    log.info("worker %s is back; asking it to register again", message.worker_id)
                    self._send_once(message.data_address, p.Reregister("evicted after a silence"), message.worker_id)
            case p.Register():
                self._on_register(message)
            case p.LayersReady():
                state = self.cluster.on_layers_ready(message)
                if state is not None and state.error:
                    log.error("%s failed to load layers: %s", state.worker_id, state.error)
                self._routes_changed()
            case p.RequestFailed():
                state = self.requests.get(message.request_id)
                if state is not None:
                    log.warning("%s failed on %s: %s", message.request_id, message.worker_id, message.message)
                    if message.fatal:  # bad input: another route would refuse it too
                        self._end_attempt(state)
                        state.queue.put_nowait(InvalidRequestError(message.message))
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
        self.cluster.register(message)
        sock = self.sync_context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        self.membership.secure_client(sock, message.public_key)
        sock.connect(message.data_address)
        self.sockets[message.worker_id] = sock
        self._send_members()
        log.info("worker %s registered from %s (%s, %d bytes)", message.worker_id, message.data_address, message.device, message.memory_bytes)
        if len(self.cluster.workers) >= self.config.min_workers:
            self.replan()

    def _send_members(self) -> None:
        members = self.membership.members_message(self.cluster.workers)
        for worker_id in self.cluster.workers:
            self._send(worker_id, members)

    def _lose(self, worker_id: str, reason: str) -> None:
        log.warning("worker %s lost: %s", worker_id, reason)
        self.cluster.remove(worker_id)
        sock = self.sockets.pop(worker_id, None)
        if sock is not None:
            sock.close(linger=0)
        self._send_members()
        for state in list(self.requests.values()):
            if worker_id in state.route:
                self._restart(state, reason=f"worker {worker_id} lost")

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
            drained = [w for w in self.cluster.workers.values() if w.draining and w.in_flight == 0 and w.assigned is not None]
            if (stale or drained) and self.cluster.workers:
                self.replan()

    def drain(self, worker_id: str) -> None:
        """Finish the worker's in-flight requests, route nothing new to it, then unload its layers."""
        if worker_id not in self.cluster.workers:
            raise KeyError(worker_id)
        self.cluster.workers[worker_id].draining = True
        self._routes_changed()

    # ------------------------------------------------------------------------------- planning
    def workload_mix(self) -> tuple[float, float]:
        """(prompt tokens per output token, KV tokens per sequence) placement plans for: the
        configured ratio and no KV cap on the batch until ``MIN_MIX_REQUESTS`` requests have
        finished, then what those requests had."""
        n = self.finished_requests
        if n < MIN_MIX_REQUESTS or self.finished_output_tokens == 0:
            return self.planner_config.prompt_tokens_per_output_token, 0.0
        return (self.finished_prompt_tokens / self.finished_output_tokens,
                (self.finished_prompt_tokens + self.finished_output_tokens) / n)

    def replan(self) -> None:
        """Plan for the registered workers; only workers whose range changes reload."""
        workers = [w for w in self.cluster.workers.values() if not w.draining]
        if not workers:
            self.cluster.plan = None
            return
        current = {w.worker_id: w.loaded for w in workers if w.loaded is not None}
        self.cluster.epoch += 1
        ratio, kv_tokens = self.workload_mix()
        config = replace(self.planner_config, prompt_tokens_per_output_token=ratio, kv_tokens_per_sequence=kv_tokens)
        try:
            plan = plan_layers(self.config.model, workers, config, self.cluster.epoch, current)
        except NoCapacityError as exc:
            log.error("cannot plan: %s", exc)
            return
        self.cluster.plan = plan
        for worker in self.cluster.workers.values():
            new_range = plan.ranges.get(worker.worker_id)
            if new_range is not None and worker.assigned == new_range and worker.error is None:
                continue  # keeps its layers (and its requests)
            self._assign(worker, new_range, plan)
        self._routes_changed()

    def _assign(self, worker: WorkerState, new_range: tuple[int, int] | None, plan: LayerPlan) -> None:
        held = worker.assigned is not None
        worker.assigned = new_range
        worker.loaded = None
        worker.assigned_epoch = plan.epoch
        for state in list(self.requests.values()):
            if worker.worker_id in state.route:
                self._restart(state, reason=f"{worker.worker_id} re-assigned")
        if new_range is None:
            if held:
                self._send(worker.worker_id, p.UnloadLayers(plan.epoch))
            return
        stages = 1 if plan.co_located else max((len(r) for r in plan.pipelines if worker.worker_id in r), default=1)
        self._send(
            worker.worker_id,
            p.AssignLayers(
                epoch=plan.epoch,
                model_dir=self.config.model_dir,
                start_layer=new_range[0],
                end_layer=new_range[1],
                dtype=self.config.dtype,
                kv_budget_bytes=kv_budget_bytes(self.config.model, worker, *new_range, self.planner_config),
                num_stages_hint=stages,
            ),
        )

    def _routes_changed(self) -> None:
        self.routes_changed.set()
        self.routes_changed = asyncio.Event()

    # ------------------------------------------------------------------------------- requests
    def choose_route(self, state: RequestState) -> tuple[str, ...] | None:
        """The path with the least predicted TTFT + DECODE_WEIGHT x decode time, among stages with
        room; None while every path is full or would queue the prompt past MAX_QUEUE_WAIT_S
        (scheduler/routing.py)."""
        request = state.request
        route_request = RouteRequest(
            num_prompt_tokens=len(request.prompt_token_ids) + len(state.generated),
            max_new_tokens=request.sampling.max_new_tokens - len(state.generated),
        )
        snapshot = load_snapshot(self.cluster, self.config.model.activation_bytes_per_token)
        choice = choose_route(snapshot, route_request, max_queue_wait_s=self.config.max_queue_wait_s)
        return None if choice is None else choice.worker_ids

    def _start_attempt(self, state: RequestState, route: tuple[str, ...]) -> None:
        request = state.request
        state.route = route
        done = len(state.generated)
        state.queued_prefill_tokens = len(request.prompt_token_ids) + done
        state.reserved_kv_tokens = state.queued_prefill_tokens + request.sampling.max_new_tokens - done
        for worker_id in route:
            worker = self.cluster.workers[worker_id]
            worker.in_flight += 1
            worker.requests_routed += 1
            worker.reserved_kv_tokens += state.reserved_kv_tokens
            worker.queued_prefill_tokens += state.queued_prefill_tokens
        sampling = replace(request.sampling, max_new_tokens=request.sampling.max_new_tokens - done)
        start = p.RequestStart(self.cluster.addresses(route), self.control_address, sampling, first_token_index=done)
        self.requests[state.wire_id] = state
        self._send(route[0], p.StartRequest(state.wire_id, request.prompt_token_ids + tuple(state.generated), start))

    def _end_attempt(self, state: RequestState) -> None:
        self.requests.pop(state.wire_id, None)
        for worker_id in state.route:
            worker = self.cluster.workers.get(worker_id)
            if worker is not None:
                worker.in_flight -= 1
                worker.reserved_kv_tokens -= state.reserved_kv_tokens
                worker.queued_prefill_tokens -= state.queued_prefill_tokens
                self._send(worker_id, p.ReleaseRequests((state.wire_id,)))
        state.route = ()
        state.reserved_kv_tokens = state.queued_prefill_tokens = 0
        self._routes_changed()  # capacity freed: waiting requests may go

    def _restart(self, state: RequestState, reason: str) -> None:
        """Move the request to a new route from the tokens the client already has."""
        if state.wire_id not in self.requests:
            return
        self._end_attempt(state)
        state.attempt += 1
        if state.attempt > self.config.max_restarts:
            state.queue.put_nowait(GenerationFailedError(f"request failed {state.attempt} times; last: {reason}"))
            return
        state.queue.put_nowait(("restart", reason))

    async def _acquire_route(self, state: RequestState) -> None:
        """Route now, or wait: for layers being loaded (up to `route_wait_s`), or in the admission
        queue while every path is KV-full or queued past `MAX_QUEUE_WAIT_S` (FIFO; past
        `max_waiting`, or after `route_wait_s`, the request gets a 429)."""
        deadline = time.monotonic() + self.config.route_wait_s
        key = state.request.request_id
        try:
            while True:
                usable = bool(self.cluster.usable_routes())
                is_head = not len(self.admission) or self.admission.waiting()[0] == key
                route = self.choose_route(state) if usable and is_head else None
                if route is not None:
                    self.admission.remove(key)
                    self._start_attempt(state, route)
                    return
                if usable and key not in self.admission:  # every path is full or queued: wait or turn away
                    decision = self.admission.offer(key, time.monotonic(), has_route=False)
                    if decision.outcome == "rejected":
                        raise OverloadedError(
                            f"all {len(self.admission)} admission slots are taken and every path is full or queued; retry later",
                            retry_after_s=decision.retry_after_s or 1.0,
                        )
                elif not usable and not self._expecting_routes():
                    raise NoCapacityError(
                        "no path through the model's layers is available: "
                        + ("no worker has joined yet (start one with `potluck join`)" if not self.cluster.workers else "no worker serves it")
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if usable:
                        raise OverloadedError(
                            f"every path stayed full or queued for {self.config.route_wait_s:.0f} s; retry later",
                            retry_after_s=self.config.retry_after_s,
                        )
                    raise NoCapacityError(f"no path through the model's layers became available in {self.config.route_wait_s:.0f} s")
                try:
                    await asyncio.wait_for(self.routes_changed.wait(), timeout=min(remaining, 0.5))
                except TimeoutError:
                    pass
        finally:
            if self.admission.remove(key):
                self._routes_changed()  # the next in line may go

    def _expecting_routes(self) -> bool:
        """Whether a route may appear soon without anyone acting (layers loading, drain, workers due)."""
        return (
            self.cluster.is_loading()
            or len(self.cluster.workers) < self.config.local_workers
            or any(w.draining and w.assigned is not None for w in self.cluster.workers.values())
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        num_prompt = len(request.prompt_token_ids)
        check_request(request, self.config.model.vocab_size)  # what a worker would refuse: a 400 now
        if num_prompt == 0:
            raise PromptTooLongError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {num_prompt} tokens; this model's context is {self.max_model_len} tokens")
        max_new = min(request.sampling.max_new_tokens, self.max_model_len - num_prompt)
        request = replace(request, sampling=replace(request.sampling, max_new_tokens=max(1, max_new)))
        state = RequestState(request, asyncio.Queue())
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.stop, request.skip_special_tokens)
        timer = self.metrics.on_start(num_prompt)
        try:
            await self._acquire_route(state)
            while True:
                try:
                    item = await asyncio.wait_for(state.queue.get(), timeout=self.config.token_timeout_s)
                except TimeoutError:
                    raise GenerationFailedError(f"no token for {self.config.token_timeout_s:.0f} s") from None
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, tuple):  # restart: the old route is gone
                    log.info("restarting %s after %d tokens: %s", request.request_id, len(state.generated), item[1])
                    await self._acquire_route(state)
                    continue
                output: p.TokenOutput = item
                if output.request_id != state.wire_id or output.index != len(state.generated):
                    continue  # from an earlier attempt, or a duplicate
                if state.queued_prefill_tokens:  # the prompt is through every stage
                    for worker_id in state.route:
                        if (worker := self.cluster.workers.get(worker_id)) is not None:
                            worker.queued_prefill_tokens -= state.queued_prefill_tokens
                    state.queued_prefill_tokens = 0
                    if len(self.admission):
                        self._routes_changed()  # shorter queues: a held request may go
                state.generated.append(output.token_id)
                self.tokens_generated += 1
                self.metrics.on_token(timer)
                step = detokenizer.add(output.token_id)
                finish_reason = output.finish_reason
                text = step.text
                if step.stopped:
                    finish_reason = "stop"
                elif finish_reason is not None:
                    text += detokenizer.flush()
                logprobs = ()
                if request.sampling.num_top_logprobs is not None and output.logprob is not None:
                    logprobs = (TokenLogprob(output.token_id, output.logprob, tuple(output.top_logprobs)),)
                if finish_reason is not None:
                    self.metrics.on_finish(timer, finish_reason)
                    self.finished_requests += 1
                    self.finished_prompt_tokens += len(request.prompt_token_ids)
                    self.finished_output_tokens += len(state.generated)
                yield GenerationOutput(
                    request_id=request.request_id,
                    text=text,
                    token_ids=(output.token_id,),
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    num_prompt_tokens=num_prompt,
                    num_generated_tokens=len(state.generated),
                )
                if finish_reason is not None:
                    return
        finally:
            self._end_attempt(state)
            self.metrics.on_end(timer)

    # ------------------------------------------------------------------------------- snapshots
    def worker_snapshot(self, worker_id: str) -> dict:
        return snapshots.worker_snapshot(self.cluster.workers[worker_id])

    def cluster_snapshot(self) -> dict:
        return snapshots.cluster_snapshot(self)

    def requests_snapshot(self) -> list[dict]:
        return snapshots.requests_snapshot(self.requests.values())
