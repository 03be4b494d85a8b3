"""A worker's ZeroMQ sockets, made and secured (workers/peers.py holds the keys and the ZAP gate).

Parts:
- `bind_data_socket(context, members, config)`: the one PULL socket everything arrives on (no
  receive limit), bound to the configured or a free port; returns it and the address peers use.
- `peer_socket(context, members, address)`: a PUSH socket to a peer or the scheduler, CURVE to
  that member's key (a `ProtocolError` for an address that is not a member).
- `send_registration(context, config, members, join_keys, message)`: a `Register` over a one-off
  socket with the join key (the token's), since this worker's own key is not admitted yet.
"""

from __future__ import annotations

import socket

import zmq

from workers import codec, curve
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


def send_registration(context: zmq.Context, config: WorkerConfig, members: Peers, join_keys: curve.KeyPair,
                      message: p.Register) -> None:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    if config.use_curve:
        curve.make_client(sock, join_keys, members.scheduler_key)
    sock.connect(config.scheduler_address)
    sock.send_multipart(codec.encode(message))
    sock.close()
