"""A worker's view of the cluster's members: whom it admits, whom it connects to, who sent what.

Parts:
- `CONTROL_MESSAGES`: the kinds only the scheduler may send (workers send each other
  `Activations` and `NextTokens` only).
- `Peers`: this worker's key pair, the cluster's (scheduler's) key, each member's key by data
  address (from `Members`), the scheduler's addresses, and the ZAP gate of the worker's context.
  - `secure_server(sock)`, `secure_client(sock, address)`: CURVE for the data socket and for a
    socket to the scheduler or a member (ProtocolError for an address that is neither).
  - `registration(worker_id)`: the join key pair and this worker's (public key, proof).
  - `update(message, own_address) -> (changed addresses, admitted)`: a new `Members`.
  - `sender_address(message, sender_key)`: who sent a message ("" the scheduler, a member's
    data address, None with CURVE off); ProtocolError when that sender may not send it.
- `source_address(start, data_address)`: the stage whose messages feed this one for a request.
"""

from __future__ import annotations

import zmq

from workers import curve
from workers import protocol as p

CONTROL_MESSAGES = (p.StartRequest, p.ReleaseRequests, p.AssignLayers, p.UnloadLayers, p.Reregister, p.Shutdown, p.Members,
                    p.ProbeLinks)


class Peers(curve.Endpoint):
    def __init__(self, context: zmq.Context, token: str, secret_key: str, scheduler_address: str, use_curve: bool) -> None:
        self.token = curve.check_token(token)
        super().__init__(curve.KeyPair.from_secret(secret_key) if secret_key else curve.KeyPair.generate(), use_curve)
        self.scheduler_key = curve.scheduler_keys(self.token).public_key
        self.member_keys: dict[str, str] = {}  # data address -> public key
        self.member_at: dict[str, str] = {}  # public key -> data address
        self.scheduler_addresses = {scheduler_address}
        self.open_gate(context, "worker", self.scheduler_key)  # the scheduler, then the members it lists

    def secure_client(self, sock: zmq.Socket, address: str) -> None:  # type: ignore[override]
        """CURVE client to the scheduler or a member, by its address (not by key)."""
        if not self.use_curve:
            return
        server_key = self.scheduler_key if address in self.scheduler_addresses else self.member_keys.get(address)
        if server_key is None:
            raise p.ProtocolError(f"{address} is not a member of the cluster")
        super().secure_client(sock, server_key)

    def registration(self, worker_id: str) -> tuple[curve.KeyPair, str, str]:
        """(the token's join key pair, this worker's public key, the proof that authorises it)."""
        proof = curve.registration_proof(self.token, worker_id, self.keys.public_key)
        return curve.join_keys(self.token), self.keys.public_key, proof

    def update(self, message: p.Members, own_address: str) -> tuple[list[str], bool]:
        members = {address: key for address, key in message.members if key}
        changed = [a for a in set(members) | set(self.member_keys) if members.get(a) != self.member_keys.get(a)]
        self.member_keys = members
        self.member_at = {key: address for address, key in members.items()}
        if self.gate is not None:
            self.gate.replace({self.scheduler_key, *members.values()})
        return [a for a in changed if a not in self.scheduler_addresses], members.get(own_address) == self.keys.public_key

    def sender_address(self, message: p.Message, sender_key: str | None) -> str | None:
        if not self.use_curve:
            return None
        if sender_key == self.scheduler_key:
            if not isinstance(message, CONTROL_MESSAGES):
                raise p.ProtocolError(f"{type(message).__name__} from the scheduler")
            return ""
        address = self.member_at.get(sender_key or "")
        if address is None or isinstance(message, CONTROL_MESSAGES):
            raise p.ProtocolError(f"{type(message).__name__} from {'a non-member' if address is None else address}, not the scheduler")
        return address


def source_address(start: p.RequestStart, data_address: str) -> str:
    """The stage before this one on the request's route, or for the first stage the last one
    (whose NextTokens close the ring)."""
    return start.route[start.route.index(data_address) - 1]
