"""One request's life in the scheduler, as plain state and transitions (no sockets, no asyncio).

Parts:
- `RequestState`: a request in flight: its current attempt (route and wire id), the KV tokens and
  prompt tokens it holds on each stage of that route, the tokens accepted so far (in index order)
  and how it ended. Transitions are methods:
  `routed(route, workers, control_address)` -> the `StartRequest` for the route's first stage;
  `token(output, workers)` -> whether the token was taken (and whether the prompt just cleared
  every stage); `stage_lost(reason, workers, max_restarts)` ends the attempt (the request waits to
  be routed again, or fails past `max_restarts`); `replayed(...)` routes it again from the prompt
  plus the tokens already accepted; `finished(reason, workers)` and `aborted(workers)` end it.
  Every transition that ends an attempt returns the worker ids that still hold it (to release).
  `route_request` is what the router weighs for the next attempt.
- `TokenTaken`: what `token()` reports for an accepted token.
- `WorkloadStats`: tokens generated and what finished requests had (prompt and output tokens);
  `mix()` is the workload mix placement plans for.

The idea that keeps recovery simple: a request's state is the prompt plus the tokens the client
already received. When its route breaks, the next attempt starts from exactly that state
(`first_token_index` = tokens accepted), and a token is accepted only from the current attempt and
at the next index, so the client's stream has no lost or duplicated token.

Reservations: while an attempt runs, each stage on its route counts the request in `in_flight`,
holds `reserved_kv_tokens` (prompt + every token it may still generate, in whole KV blocks, what a
worker allocates) and, until the first token
comes back, `queued_prefill_tokens` (the prompt still to run). The router reads these counters
(`scheduler/load.py`); this module is the only place that changes them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduler.cluster import WorkerState
from scheduler.errors import GenerationFailedError
from scheduler.request import GenerationRequest, resumed_sampling
from scheduler.routing import KV_BLOCK_TOKENS, RouteRequest, kv_block_tokens
from workers import protocol as p


@dataclass(frozen=True)
class TokenTaken:
    token_id: int
    index: int  # 0-based index in the request's output
    prompt_through: bool  # this token is the attempt's first: its prompt left every stage queue


@dataclass
class RequestState:
    request: GenerationRequest
    started_at_s: float = field(default_factory=time.monotonic)
    attempt: int = 0  # attempts ended by a lost stage so far
    route: tuple[str, ...] = ()  # worker ids of the current attempt; () while not routed
    generated: list[int] = field(default_factory=list)  # accepted token ids, in index order
    reserved_kv_tokens: int = 0  # per stage of the current route
    queued_prefill_tokens: int = 0  # per stage of the current route, until its first token
    lost_reason: str | None = None  # why the last attempt ended, while waiting for a replay
    error: Exception | None = None  # set when the request can no longer go on
    finish_reason: str | None = None

    @property
    def wire_id(self) -> str:
        """The id stages know the current attempt by: tokens of older attempts carry another."""
        return f"{self.request.request_id}#{self.attempt}"

    @property
    def is_routed(self) -> bool:
        return bool(self.route)

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    @property
    def replay_token_ids(self) -> tuple[int, ...]:
        """What the next attempt's first stage runs: the prompt, then the tokens already sent."""
        return self.request.prompt_token_ids + tuple(self.generated)

    @property
    def route_request(self) -> RouteRequest:
        """What the router weighs for the next attempt: the replayed prompt and the tokens left."""
        return RouteRequest(num_prompt_tokens=len(self.replay_token_ids),
                            max_new_tokens=self.request.sampling.max_new_tokens - self.num_generated,
                            kv_block_tokens=KV_BLOCK_TOKENS)

    # ----------------------------------------------------------------------------- transitions
    def routed(self, route: tuple[str, ...], workers: Mapping[str, WorkerState],
               control_address: str) -> p.StartRequest:
        """Start an attempt on `route`: reserve KV and queued prompt tokens on every stage."""
        if self.is_routed or self.is_done:
            raise RuntimeError(f"{self.wire_id} cannot be routed now")
        done = self.num_generated
        remaining_new = self.request.sampling.max_new_tokens - done
        self.route = route
        self.lost_reason = None
        self.queued_prefill_tokens = len(self.request.prompt_token_ids) + done
        self.reserved_kv_tokens = kv_block_tokens(self.queued_prefill_tokens + remaining_new)  # whole KV blocks
        for worker_id in route:
            worker = workers[worker_id]
            worker.in_flight += 1
            worker.requests_routed += 1
            worker.reserved_kv_tokens += self.reserved_kv_tokens
            worker.queued_prefill_tokens += self.queued_prefill_tokens
        sampling = resumed_sampling(self.request.sampling, tuple(self.generated))  # max_new_tokens - done too
        addresses = tuple(workers[worker_id].data_address for worker_id in route)
        start = p.RequestStart(addresses, control_address, sampling, first_token_index=done)
        return p.StartRequest(self.wire_id, self.replay_token_ids, start)

    def replayed(self, route: tuple[str, ...], workers: Mapping[str, WorkerState],
                 control_address: str) -> p.StartRequest:
        """Route again after a lost stage, from the prompt plus the tokens already accepted."""
        if self.lost_reason is None:
            raise RuntimeError(f"{self.wire_id} lost no stage")
        return self.routed(route, workers, control_address)

    def token(self, output: p.TokenOutput, workers: Mapping[str, WorkerState]) -> TokenTaken | None:
        """Accept `output` if it is the current attempt's next token; None for a stale or
        duplicate one. The attempt's first token frees its queued prompt tokens."""
        if not self.is_routed or output.request_id != self.wire_id or output.index != self.num_generated:
            return None
        prompt_through = self.queued_prefill_tokens > 0
        if prompt_through:
            for worker_id in self.route:
                if (worker := workers.get(worker_id)) is not None:
                    worker.queued_prefill_tokens -= self.queued_prefill_tokens
            self.queued_prefill_tokens = 0
        self.generated.append(output.token_id)
        return TokenTaken(output.token_id, output.index, prompt_through)

    def stage_lost(self, reason: str, workers: Mapping[str, WorkerState], max_restarts: int) -> tuple[str, ...]:
        """A stage of the route is gone (lost, re-assigned, failed the request): end the attempt.
        The request waits for `replayed`, or fails once it has lost more than `max_restarts`."""
        if not self.is_routed:
            return ()
        held = self._end_attempt(workers)
        self.attempt += 1
        self.lost_reason = reason
        if self.attempt > max_restarts:
            self.error = GenerationFailedError(f"request failed {self.attempt} times; last: {reason}")
        return held

    def finished(self, finish_reason: str, workers: Mapping[str, WorkerState]) -> tuple[str, ...]:
        """The last token came (eos, length or a stop string): free the route."""
        self.finish_reason = finish_reason
        return self._end_attempt(workers)

    def aborted(self, workers: Mapping[str, WorkerState], error: Exception | None = None) -> tuple[str, ...]:
        """The client went away or the request failed: free the route (safe to call again)."""
        if error is not None and self.error is None:
            self.error = error
        return self._end_attempt(workers)

    def _end_attempt(self, workers: Mapping[str, WorkerState]) -> tuple[str, ...]:
        held = []
        for worker_id in self.route:
            worker = workers.get(worker_id)
            if worker is not None:
                worker.in_flight -= 1
                worker.reserved_kv_tokens -= self.reserved_kv_tokens
                worker.queued_prefill_tokens -= self.queued_prefill_tokens
                held.append(worker_id)
        self.route = ()
        self.reserved_kv_tokens = self.queued_prefill_tokens = 0
        return tuple(held)


@dataclass
class WorkloadStats:
    """Counted over the engine's life; placement plans for the mix of the finished requests."""

    tokens_generated: int = 0
    finished_requests: int = 0
    finished_prompt_tokens: int = 0
    finished_output_tokens: int = 0

    def on_token(self) -> None:
        self.tokens_generated += 1

    def on_finished(self, state: RequestState) -> None:
        self.finished_requests += 1
        self.finished_prompt_tokens += len(state.request.prompt_token_ids)
        self.finished_output_tokens += state.num_generated

    def mix(self, default_prompt_tokens_per_output_token: float, min_requests: int) -> tuple[float, float]:
        """(prompt tokens per output token, KV tokens per sequence): the default ratio and no KV
        cap until `min_requests` have finished, then what those requests had."""
        n = self.finished_requests
        if n < min_requests or self.finished_output_tokens == 0:
            return default_prompt_tokens_per_output_token, 0.0
        return (self.finished_prompt_tokens / self.finished_output_tokens,
                (self.finished_prompt_tokens + self.finished_output_tokens) / n)
