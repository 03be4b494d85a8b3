"""Socket security for every ZeroMQ socket of a cluster: the cluster token, CurveZMQ keys, the ZAP gate.

Parts:
- `new_token()`, `check_token(token)`, `TOKEN_ENV`, `WORKER_KEY_ENV`: the cluster token (`serve` makes one; `--token` /
  `POTLUCK_TOKEN` set or reuse it).
- `KeyPair`: a CurveZMQ key pair (z85 text); `KeyPair.generate()` (each worker, at join) and
  `scheduler_keys(token)` / `join_keys(token)` (derived from the token: HMAC-SHA256 of a purpose).
- `registration_proof(token, worker_id, public_key)`, `proof_is_valid(...)`: the HMAC a worker sends
  with its public key so the token authorises exactly that key for exactly that worker id.
- `Gate`: a ZAP authenticator thread (pyzmq's `ThreadAuthenticator`) on a context, admitting a live set
  of public keys; a refused key is logged once per peer address.
- `make_server(sock, keys)`, `make_client(sock, keys, server_public_key)`: turn CURVE on for a socket.
- `Endpoint`: one side's CURVE state (key pair, CURVE on or off, the gate of its context), shared
  by the scheduler's `Membership` and a worker's `Peers`: `open_gate(context, name, *admitted)`,
  `stop()`, `secure_server(sock)`, `secure_client(sock, server_public_key)` (no-ops with CURVE off).
- `peer_key(frame)`: the public key ZeroMQ authenticated for the connection a message came on.

How a worker joins (the design):
1. The scheduler's key pair is derived from the token, so whoever holds the token knows the
   cluster's public key and can check it is talking to the scheduler (CURVE authenticates the
   server to the client). The scheduler's control socket is a CURVE server whose ZAP gate admits
   only the *join key* (also derived from the token) and the keys of admitted workers: a NULL
   connection, or a key the gate does not know, is refused by ZeroMQ during the handshake, before
   any frame reaches potluck.
2. A worker makes its own key pair, connects with the join key and sends `Register` carrying its
   public key and `HMAC-SHA256(token, "register" | worker id | public key)`. The scheduler checks the
   proof (constant time), binds the worker id to that key (another key for a registered id is
   refused), admits the key in its gate, and tells every worker the members (`Members`: data address
   and public key of each).
3. From then on the worker speaks with its own key only; every worker's data socket is a CURVE
   server whose gate admits the scheduler and the current members. Each message's sender is the
   `User-Id` ZeroMQ attaches (the z85 public key), which the receivers check against who may send it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("potluck.security")

TOKEN_ENV = "POTLUCK_TOKEN"
WORKER_KEY_ENV = "POTLUCK_WORKER_KEY"  # a worker's own secret key (z85): one identity across restarts
ZAP_DOMAIN = "potluck"
MIN_TOKEN_CHARS = 16


def new_token() -> str:
    """A fresh cluster token: 256 random bits."""
    return "ptk-" + secrets.token_urlsafe(32)


def check_token(token: str | None) -> str:
    """The token, stripped; ValueError with a one-line reason when it is missing or too short."""
    token = (token or "").strip()
    if not token:
        raise ValueError(f"no cluster token: pass --token or set {TOKEN_ENV} (serve prints it at start)")
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable():
        raise ValueError(f"the cluster token must be at least {MIN_TOKEN_CHARS} printable characters")
    return token


@dataclass(frozen=True)
class KeyPair:
    public_key: str  # z85, 40 characters
    secret_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    @classmethod
    def from_secret(cls, secret_key: str) -> KeyPair:
        """The key pair of a z85 secret key (ValueError if it is not one)."""
        try:
            public = zmq.curve_public(secret_key.encode("ascii"))
        except (zmq.ZMQError, ValueError, UnicodeEncodeError) as exc:
            raise ValueError(f"{WORKER_KEY_ENV} is not a z85 CURVE secret key: {exc}") from None
        return cls(public.decode("ascii"), secret_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """The key pair whose secret key is these 32 bytes."""
        secret = z85.encode(seed[:32])
        return cls(zmq.curve_public(secret).decode("ascii"), secret.decode("ascii"))


def _derive(token: str, purpose: str) -> bytes:
    return hmac.new(token.encode(), f"potluck/{purpose}".encode(), hashlib.sha256).digest()


def scheduler_keys(token: str) -> KeyPair:
    """The cluster's identity: the scheduler's key pair, derived from the token."""
    return KeyPair.from_seed(_derive(token, "scheduler-key"))


def join_keys(token: str) -> KeyPair:
    """The key pair a worker registers with (admitted by the scheduler for `Register` only)."""
    return KeyPair.from_seed(_derive(token, "join-key"))


def registration_proof(token: str, worker_id: str, public_key: str) -> str:
    message = f"register\0{worker_id}\0{public_key}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def proof_is_valid(token: str, worker_id: str, public_key: str, proof: str) -> bool:
    return hmac.compare_digest(registration_proof(token, worker_id, public_key), proof)


class Gate(ThreadAuthenticator):
    """ZAP handler of one context: CURVE clients whose public key is admitted get in, others are
    refused during the handshake (logged once per peer address)."""

    def __init__(self, context: zmq.Context, name: str) -> None:
        super().__init__(context, log=logging.getLogger("potluck.security.zap"))
        self.name = name
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._address = ""
        self._refused: dict[str, float] = {}  # peer address -> when it was logged
        self.refused_count = 0

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def admit(self, *public_keys: str) -> None:
        with self._lock:
            self._keys.update(public_keys)

    def revoke(self, *public_keys: str) -> None:
        with self._lock:
            self._keys.difference_update(public_keys)

    def replace(self, public_keys: set[str]) -> None:
        with self._lock:
            self._keys = set(public_keys)

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq's credentials-provider hook
        text = key.decode("ascii") if isinstance(key, bytes) else str(key)
        with self._lock:
            allowed = text in self._keys
        if not allowed:
            self._log_refused(f"a CURVE key that is not a member of the cluster ({text[:8]}...)")
        return allowed

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6:
            self._address = msg[3].decode("utf-8", "replace")
            if msg[5] != b"CURVE":
                self._log_refused(f"the {msg[5].decode('ascii', 'replace')} mechanism")
                self._send_zap_reply(msg[1], b"400", b"CURVE required")
                return
        await super().handle_zap_message(msg)

    def _log_refused(self, what: str) -> None:
        self.refused_count += 1
        address = self._address or "?"
        if address not in self._refused:
            self._refused[address] = time.monotonic()
            log.warning("%s refused a connection from %s: %s (logged once per peer)", self.name, address, what)


def make_server(sock: zmq.Socket, keys: KeyPair) -> None:
    """CURVE server: only clients the context's `Gate` admits get through the handshake (with no
    gate on the context, the ZAP domain makes every handshake fail rather than let anyone in)."""
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit everyone
    except zmq.ZMQError:  # a libzmq without the (draft) option: the Gate is always started first
        pass
    sock.curve_secretkey = keys.secret_key.encode("ascii")
    sock.curve_publickey = keys.public_key.encode("ascii")
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: KeyPair, server_public_key: str) -> None:
    sock.curve_secretkey = keys.secret_key.encode("ascii")
    sock.curve_publickey = keys.public_key.encode("ascii")
    sock.curve_serverkey = server_public_key.encode("ascii")


class Endpoint:
    """One side of the cluster's sockets: its key pair and, with CURVE on, the gate of its context."""

    def __init__(self, keys: KeyPair, use_curve: bool) -> None:
        self.keys = keys
        self.use_curve = use_curve
        self.gate: Gate | None = None

    def open_gate(self, context: zmq.Context, name: str, *admitted: str) -> None:
        """Start the context's ZAP gate admitting ``admitted`` (CURVE on only)."""
        if self.use_curve:
            self.gate = Gate(context, name)
            self.gate.start()
            self.gate.admit(*admitted)

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.stop()
            self.gate = None

    def secure_server(self, sock: zmq.Socket) -> None:
        if self.use_curve:
            make_server(sock, self.keys)

    def secure_client(self, sock: zmq.Socket, server_public_key: str) -> None:
        if self.use_curve:
            make_client(sock, self.keys, server_public_key)


def peer_key(frame: zmq.Frame) -> str | None:
    """The z85 public key of the connection `frame` came on (None: not a CURVE connection)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
