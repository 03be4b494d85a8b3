"""A worker's ZeroMQ sockets, made and secured (workers/peers.py holds the keys and the ZAP gate).

Parts:
- `bind_data_socket(context, members, config)`: the one PULL socket everything arrives on (no
  receive limit), bound to the configured or a free port; returns it and the address peers use.
- `peer_socket(context, members, address)`: a PUSH socket to a peer or the scheduler, CURVE to
  that member's key (a `ProtocolError` for an address that is not a member).
(The one-off socket a `Register` goes over, with the token's join key: workers/join_attempts.py.)
"""

from __future__ import annotations

import socket

import zmq

from workers import protocol as p
from workers.peers import Peers
from workers.worker_config import WorkerConfig


def bind_data_socket(context: zmq.Context, members: Peers, config: WorkerConfig) -> tuple[zmq.Socket, str]:
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    members.secure_server(pull)
    if config.listen_port:
        pull.bind(f"tcp://{config.listen_host}:{config.listen_port}")
        port = config.listen_port
    else:
        port = pull.bind_to_random_port(f"tcp://{config.listen_host}")
    host = config.advertise_host or config.listen_host
    if host in ("0.0.0.0", "*"):
        host = socket.gethostbyname(socket.gethostname())
    return pull, f"tcp://{host}:{port}"


def peer_socket(context: zmq.Context, members: Peers, address: str) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    try:
        members.secure_client(sock, address)
    except p.ProtocolError:
        sock.close(linger=0)
        raise
    sock.connect(address)
    return sock

