"""Who belongs to the cluster, and who may say what: the scheduler's side of workers/curve.py.

Parts:
- `Membership`: the cluster token, the scheduler's key pair, the ZAP gate of the control socket, and
  the binding of each worker id to one public key.
  - `start(context)` / `stop()`, `secure_server(sock)` / `secure_client(sock, key)`: the gate and
    CURVE on the scheduler's sockets (`workers/curve.py` `Endpoint`).
  - `authorise(message, sender_key, requests, workers)`: the message if its sender may send it
    (a `TokenOutputs` keeps only the outputs of requests whose route ends at the sender), else None.
  - `members_message(workers)`: the `Members` every worker gets when the membership changes.
- `check_request(request, vocab_size)`: the scheduler's check of what a worker would refuse (400).
- `ghost_requests(heartbeat, requests)`: what a worker holds that the scheduler does not run there.

Rules (one sender key per message, from ZeroMQ's `User-Id`):
- `Register`: only over the join key (token holders), with a valid proof for its public key and id;
  an id registered now under another key is refused (impostor).
- `Heartbeat`, `LayersReady`: only from the key bound to that worker id.
- `TokenOutputs`: only from the last stage of each request's route.
- `RequestFailed`: only from a stage of that request's route.
With CURVE off (benchmarks only) there is no sender key; ids and proofs are still checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import zmq

from scheduler.errors import InvalidRequestError
from scheduler.request import GenerationRequest
from workers import curve, validation
from workers import protocol as p
from workers.log_throttle import LogThrottle

log = logging.getLogger("potluck.scheduler")

MAX_WORKER_ID_CHARS = 128


class Membership(curve.Endpoint):
    def __init__(self, token: str | None, use_curve: bool = True) -> None:
        self.token = curve.check_token(token) if token is not None else curve.new_token()
        super().__init__(curve.scheduler_keys(self.token), use_curve)
        self.join_public_key = curve.join_keys(self.token).public_key
        self.key_of: dict[str, str] = {}  # worker id -> public key
        self.worker_of: dict[str, str] = {}  # public key -> worker id
        self.refused_messages = 0
        self.throttle = LogThrottle()

    # ----------------------------------------------------------------------------- sockets
    def start(self, context: zmq.Context) -> None:
        """The gate admits the join key; workers' keys as they register (`stop()`: curve.Endpoint)."""
        self.open_gate(context, "scheduler", self.join_public_key)

    # ----------------------------------------------------------------------------- authority
    def authorise(self, message: p.Message, sender_key: str | None,
                  requests: Mapping[str, Any], workers: Mapping[str, Any]) -> p.Message | None:
        if isinstance(message, p.Register):
            return message if self._admit(message, sender_key, workers) else None
        sender = self.worker_of.get(sender_key) if sender_key is not None else None
        if self.use_curve and sender is None:
            return self._refuse(f"{type(message).__name__} from a key that is not a member", sender_key)
        claimed = getattr(message, "worker_id", None)
        if sender is not None and claimed != sender:
            return self._refuse(f"{type(message).__name__} from {sender} claiming to be {claimed!r}", sender_key)
        sender = claimed
        match message:
            case p.TokenOutputs():
                kept = tuple(o for o in message.outputs if _route_end(requests.get(o.request_id)) == sender)
                if len(kept) != len(message.outputs):
                    self._refuse(f"token outputs from {sender} for requests whose route does not end there", sender_key)
                return replace(message, outputs=kept) if kept else None
            case p.RequestFailed():
                state = requests.get(message.request_id)
                if state is not None and sender not in state.route:
                    return self._refuse(f"a failure report from {sender}, not on the route of {message.request_id}", sender_key)
        return message

    def _admit(self, message: p.Register, sender_key: str | None, workers: Mapping[str, Any]) -> bool:
        if not (0 < len(message.worker_id) <= MAX_WORKER_ID_CHARS and message.worker_id.isprintable()):
            self._refuse(f"Register with a worker id that is empty, too long or not printable", sender_key)
            return False
        if self.use_curve and sender_key != self.join_public_key:
            self._refuse(f"Register for {message.worker_id!r} not over the join key", sender_key)
            return False
        if not message.public_key or not curve.proof_is_valid(self.token, message.worker_id, message.public_key, message.proof):
            self._refuse(f"Register for {message.worker_id!r} without a valid token proof", sender_key)
            return False
        bound = self.key_of.get(message.worker_id)
        if bound is not None and bound != message.public_key and message.worker_id in workers:
            self._refuse(f"Register for {message.worker_id!r}, which is registered under another key (impostor)", sender_key)
            return False
        if self.worker_of.get(message.public_key, message.worker_id) != message.worker_id:
            self._refuse(f"Register for {message.worker_id!r} with the key of another worker", sender_key)
            return False
        if bound is not None and bound != message.public_key:
            self.forget(message.worker_id)
        self.key_of[message.worker_id] = message.public_key
        self.worker_of[message.public_key] = message.worker_id
        if self.gate is not None:
            self.gate.admit(message.public_key)
        return True

    def forget(self, worker_id: str) -> None:
        key = self.key_of.pop(worker_id, None)
        if key is not None:
            self.worker_of.pop(key, None)
            if self.gate is not None:
                self.gate.revoke(key)

    def _refuse(self, what: str, sender_key: str | None) -> None:
        self.refused_messages += 1
        self.throttle.warning(log, what, "refused %s", what)
        return None

    def members_message(self, workers: Mapping[str, Any]) -> p.Members:
        return p.Members(tuple(
            (worker.data_address, self.key_of.get(worker_id, "")) for worker_id, worker in workers.items()
        ))


def check_request(request: GenerationRequest, vocab_size: int) -> None:
    """InvalidRequestError (400) for what a worker would refuse: token ids outside the vocabulary,
    sampling values out of range (workers/validation.py)."""
    try:
        if request.prompt_token_ids:
            validation.check_token_ids(request.prompt_token_ids, vocab_size)
        validation.check_sampling(request.sampling)
    except p.ProtocolError as exc:
        raise InvalidRequestError(str(exc)) from None


def ghost_requests(heartbeat: p.Heartbeat, requests: Mapping[str, Any]) -> tuple[str, ...]:
    """Requests the worker holds that the scheduler does not run there (a StartRequest it never
    sent, an attempt already ended): they are released, so nothing holds KV for nobody."""
    return tuple(
        request_id for request_id in heartbeat.request_ids
        if (state := requests.get(request_id)) is None or heartbeat.worker_id not in state.route
    )


def _route_end(state: Any) -> str | None:
    return state.route[-1] if state is not None and state.route else None
