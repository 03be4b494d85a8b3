"""A userspace Ethernet delay line: what stands in for `tc netem delay` on kernels without netem.

The Firecracker 6.18 kernel the tests run on has no netem qdisc (`tc qdisc add ... netem` answers
"Specified qdisc kind is unknown"); `tbf` and `htb` work, so bandwidth is shaped in the kernel and
only the delay is done here. Run inside a namespace that holds two interfaces (no addresses):

    python -m tests.support.delay_line IFACE_A IFACE_B DELAY_S

Every frame read on one interface (a raw `AF_PACKET` socket) is written to the other
`DELAY_S` seconds later, in order: an L2 bridge whose wire is `DELAY_S` long each way. One thread
polls both sockets and sends what is due. Frames can be as large as the interfaces' MTU (the
harness sets jumbo MTUs, so a 100 Mbit/s stream is a few hundred frames a second, well within
Python's reach on a loaded machine). It runs at real-time priority (SCHED_FIFO) where allowed:
at a load average of 17 on the 2-core test machine an ordinary process woke late enough to add
tens of milliseconds to a 40 ms round trip. Stops on SIGTERM.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
MAX_FRAME_BYTES = 1 << 17


def open_raw(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((interface, 0))
    sock.setblocking(False)
    return sock


def run(interface_a: str, interface_b: str, delay_s: float) -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
    except (AttributeError, PermissionError, OSError):
        pass  # ordinary priority: the delay is as good as the machine is idle
    a, b = open_raw(interface_a), open_raw(interface_b)
    other = {a.fileno(): b, b.fileno(): a}
    sockets = {a.fileno(): a, b.fileno(): b}
    due: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    poller = select.poll()
    for fd in sockets:
        poller.register(fd, select.POLLIN)
    print("delay line up", flush=True)
    while not stop:
        wait_s = 0.05 if not due else max(0.0, due[0][0] - time.monotonic())
        for fd, _ in poller.poll(wait_s * 1000):
            while True:
                try:
                    frame, address = sockets[fd].recvfrom(MAX_FRAME_BYTES)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING:  # our own sends, seen again: not to forward
                    continue
                due.append((time.monotonic() + delay_s, other[fd], frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, out, frame = due.popleft()
            try:
                out.send(frame)
            except BlockingIOError:
                due.appendleft((now, out, frame))
                time.sleep(0.0005)
                break
            except OSError:
                pass  # a frame the other side cannot take (too large): dropped, like a wire would


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], float(sys.argv[3]))
