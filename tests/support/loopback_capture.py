"""A tcpdump capture of loopback traffic, and the ZMTP greetings in it (tests only).

Parts:
- `LoopbackCapture`: `tcpdump -i lo` writing a pcap file while a test runs; `start()` raises
  `CaptureUnavailable` with the reason when capture is impossible (no tcpdump, not allowed).
- `tcp_streams(pcap)`: each one-way TCP byte stream on loopback, {(src port, dst port): bytes}
  (payloads in sequence order; loopback carries IPv4 over Ethernet framing).
- `zmtp_mechanism(stream)`: the security mechanism a ZMTP 3 greeting announces ("CURVE", "NULL"),
  or None when the stream does not start with a ZMTP greeting.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path


class CaptureUnavailable(RuntimeError):
    pass


class LoopbackCapture:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if shutil.which("tcpdump") is None:
            raise CaptureUnavailable("tcpdump is not installed")
        self.process = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-n", "-s", "0", "-w", str(self.path), "tcp"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # "listening on lo, ..." once it captures
        if "listening" not in line:
            self.process.wait(timeout=5)
            raise CaptureUnavailable(f"tcpdump could not capture on lo: {line.strip()}")

    def stop(self) -> bytes:
        if self.process is not None and self.process.poll() is None:
            time.sleep(0.5)
            self.process.terminate()
            self.process.wait(timeout=10)
        return self.path.read_bytes() if self.path.exists() else b""


def tcp_streams(pcap: bytes) -> dict[tuple[int, int], bytes]:
    if len(pcap) < 24:
        return {}
    endian = "<" if pcap[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    link_type = struct.unpack(endian + "I", pcap[20:24])[0]
    link_bytes = {1: 14, 113: 16, 0: 4, 276: 20}.get(link_type, 14)  # Ethernet, Linux SLL, BSD loopback, SLL2
    segments: dict[tuple[int, int], dict[int, bytes]] = {}
    offset = 24
    while offset + 16 <= len(pcap):
        captured = struct.unpack(endian + "I", pcap[offset + 8 : offset + 12])[0]
        packet = pcap[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        ip = packet[link_bytes:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ip_header = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ip_header:total]
        if len(tcp) < 20:
            continue
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            segments.setdefault((sport, dport), {})[seq] = payload
    return {key: b"".join(parts[seq] for seq in sorted(parts)) for key, parts in segments.items()}


def zmtp_mechanism(stream: bytes) -> str | None:
    if len(stream) < 32 or stream[0] != 0xFF or stream[9] != 0x7F or stream[10] != 3:
        return None
    return stream[12:32].rstrip(b"\0").decode("ascii", "replace")
