"""Three "boxes" on one machine: Linux network namespaces joined by a bridge, one behind a slow link.

Parts:
- `netns_available()`: whether this process may make namespaces (root with `ip netns`).
- `Boxes(slow_box, slow_delay_s, slow_rate_mbit)`: a context manager that builds

      root ns (the test: scheduler) --veth-- hub ns [bridge] --veth-- box a
                                                 |        \\--veth-- box b
                                                 \\--veth-- delay ns [delay line] --veth-- box c

  on a free 10.x.y.0/24 subnet. Box `slow_box` reaches the bridge through the delay namespace,
  where `tests/support/delay_line.py` holds every frame `slow_delay_s` each way (this kernel has
  no netem: see that module), and both directions of its link are shaped to `slow_rate_mbit`
  by `tbf` in the kernel. `ip_of(box)`, `root_ip`; `popen(box, argv)` starts a process inside a
  box (stopped on exit). Everything it made (processes, namespaces, hence veths) goes on exit,
  also when the test failed.

Interfaces get a jumbo MTU so that a 100 Mbit/s stream is a few hundred frames a second for the
delay line.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MTU_BYTES = 65000


def netns_available() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _in(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True, text=True)


# Frames the delay line copies must carry real checksums: a veth leaves TCP checksums for "the
# hardware" to fill in (checksum offload), which a frame re-sent from a packet socket never gets.
# `ethtool -K DEV tx off`, done with its ioctl (ethtool is not installed everywhere).
_TX_CHECKSUM_OFF = (
    "import array, fcntl, socket, struct, sys\n"
    "s = socket.socket()\n"
    "for name in sys.argv[1:]:\n"
    "    value = array.array('I', [0x17, 0])  # ETHTOOL_STXCSUM, off\n"
    "    fcntl.ioctl(s.fileno(), 0x8946, struct.pack('16sP', name.encode(), value.buffer_info()[0]))  # SIOCETHTOOL\n"
)


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for n in range(os.getpid() % 200, os.getpid() % 200 + 200):
        net = ipaddress.IPv4Network(f"10.{200 + n % 50}.{n}.0/24")
        if f"10.{200 + n % 50}.{n}." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test boxes")


class Boxes:
    def __init__(self, slow_box: str = "c", slow_delay_s: float = 0.020, slow_rate_mbit: float = 100.0,
                 boxes: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.boxes = boxes
        self.slow_box = slow_box
        self.slow_delay_s = slow_delay_s
        self.slow_rate_mbit = slow_rate_mbit
        tag = f"pl{os.getpid() % 100000}"
        self.tag = tag
        self.hub, self.delay_ns = f"{tag}hub", f"{tag}dly"
        self.ns = {box: f"{tag}{box}" for box in boxes}
        self.root_if = f"{tag}r"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.ips = {box: str(hosts[i]) for i, box in enumerate(boxes)}
        self.root_ip = str(hosts[-1])
        self.processes: list[subprocess.Popen] = []

    def ip_of(self, box: str) -> str:
        return self.ips[box]

    def __enter__(self) -> Boxes:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _veth(self, a: str, a_ns: str | None, b: str, b_ns: str) -> None:
        _ip("link", "add", a, "mtu", str(MTU_BYTES), "type", "veth", "peer", "name", b, "mtu", str(MTU_BYTES))
        if a_ns is not None:
            _ip("link", "set", a, "netns", a_ns)
        _ip("link", "set", b, "netns", b_ns)

    def _build(self) -> None:
        for ns in (self.hub, self.delay_ns, *self.ns.values()):
            _ip("netns", "add", ns)
            _in(ns, "ip", "link", "set", "lo", "up")
        _in(self.hub, "ip", "link", "add", "br0", "mtu", str(MTU_BYTES), "type", "bridge")
        _in(self.hub, "ip", "link", "set", "br0", "up")
        prefix = self.subnet.prefixlen
        t = self.tag
        # the test's own end: the root namespace joins the bridge
        self._veth(self.root_if, None, f"{t}hr", self.hub)
        _ip("addr", "add", f"{self.root_ip}/{prefix}", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")
        self._attach(f"{t}hr", "hr")
        for box, ns in self.ns.items():
            if box == self.slow_box:
                self._veth(f"{t}x{box}", ns, f"{t}d1", self.delay_ns)
                self._veth(f"{t}d0", self.delay_ns, f"{t}h{box}", self.hub)
                for name, new in ((f"{t}d0", "d0"), (f"{t}d1", "d1")):
                    _in(self.delay_ns, "ip", "link", "set", name, "name", new)
                    _in(self.delay_ns, "ip", "link", "set", new, "promisc", "on", "up")
            else:
                self._veth(f"{t}x{box}", ns, f"{t}h{box}", self.hub)
            self._attach(f"{t}h{box}", f"h{box}")
            _in(ns, "ip", "link", "set", f"{t}x{box}", "name", "eth0")
            _in(ns, "ip", "addr", "add", f"{self.ips[box]}/{prefix}", "dev", "eth0")
            _in(ns, "ip", "link", "set", "eth0", "up")
        for ns in self.ns.values():
            _in(ns, sys.executable, "-c", _TX_CHECKSUM_OFF, "eth0")
        subprocess.run([sys.executable, "-c", _TX_CHECKSUM_OFF, self.root_if], check=True, capture_output=True)
        if self.slow_box in self.ns:
            rate = f"{self.slow_rate_mbit}mbit"
            for ns, dev in ((self.ns[self.slow_box], "eth0"), (self.hub, f"h{self.slow_box}")):
                _in(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(2 * MTU_BYTES), "limit", str(8 << 20))
            line = self.popen_in(self.delay_ns, [sys.executable, "-m", "tests.support.delay_line", "d0", "d1",
                                                 repr(self.slow_delay_s)], stdout=subprocess.PIPE)
            assert line.stdout is not None
            if b"delay line up" not in line.stdout.readline():
                raise RuntimeError("the delay line did not start")

    def _attach(self, name: str, new: str) -> None:
        _in(self.hub, "ip", "link", "set", name, "name", new)
        _in(self.hub, "ip", "link", "set", new, "master", "br0")
        _in(self.hub, "ip", "link", "set", new, "up")

    def popen_in(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=Path.cwd(), **kwargs)
        self.processes.append(process)
        return process

    def popen(self, box: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside `box` (`ip netns exec` execs it: the pid is the process's own)."""
        return self.popen_in(self.ns[box], argv, **kwargs)

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        # deleting a namespace deletes its veths, and with them their peers (the root's end too)
        for ns in (*self.ns.values(), self.delay_ns, self.hub):
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.root_if, check=False)
