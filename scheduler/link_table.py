"""The links between workers, as the workers measured them (workers/link_prober.py).

Parts:
- `MeasuredLink`: one worker pair's round trip and bandwidth (the best of the samples its
  worker took, workers/link_prober.py), and when it was measured.
- `LinkTable`: the scheduler's table, undirected (a pair is measured from one end).
  - `record(worker_id, report_links, known) -> bool`: take a `LinkReport`'s links (to `known`
    workers, with finite positive figures; others are dropped); whether some link is new or
    changed by more than `CHANGE_FRACTION` (worth a re-plan).
  - `forget(worker_id)`: a worker left.
  - `link_specs(worker_ids)`: placement's `LinkSpec`s over those workers (one-way latency = half
    the round trip); pairs not measured get placement's default link, so they stay connected;
    `()` when nothing among them was measured (placement then assumes a complete default graph).
  - `slow_pairs(worker_ids)`: measured pairs that are slow next to the best one measured
    (`SLOW_FACTOR` x its per-hop time or worse): what the planner tries to keep stages off.
  - `hop_latency_s()`, `hop_bandwidth_bytes_per_s()`: the router's hop maps, both directions.
  - `rows()`: the table as JSON rows for `/cluster`.
- `probe_peers(workers, new_id, public_keys)`: whom a worker should probe: the other workers that
  run an echo responder on another host (co-located workers share the machine, not a link).
- `probe_requests(workers, public_keys, worker_ids)`: the `ProbeLinks` to send: each of
  `worker_ids` probes every other worker; with none given, every pair is probed once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from placement.problem import DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_LATENCY_S, LinkSpec
from scheduler.cluster import WorkerState
from workers import protocol as p

CHANGE_FRACTION = 0.25
SLOW_FACTOR = 4.0
# the per-hop time slow_pairs compares: latency + this many bytes / bandwidth (a prompt chunk's
# hidden states of a small model: bandwidth matters where it is low, latency everywhere)
SLOW_PROBE_BYTES = 1 << 20


@dataclass(frozen=True)
class MeasuredLink:
    rtt_s: float
    bandwidth_bytes_per_s: float
    measured_at_unix_s: float

    @property
    def latency_s(self) -> float:
        return self.rtt_s / 2

    def hop_time_s(self) -> float:
        return self.latency_s + SLOW_PROBE_BYTES / self.bandwidth_bytes_per_s


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class LinkTable:
    def __init__(self) -> None:
        self.links: dict[tuple[str, str], MeasuredLink] = {}

    def record(self, worker_id: str, report_links: Iterable[tuple[str, float, float]],
               known: Container[str] | None = None) -> bool:
        changed = False
        for peer_id, rtt_s, bandwidth in report_links:
            if peer_id == worker_id or (known is not None and peer_id not in known) \
                    or not (0 < rtt_s < math.inf and 0 < bandwidth < math.inf):
                continue
            key = _pair(worker_id, peer_id)
            old = self.links.get(key)
            if old is None or abs(rtt_s - old.rtt_s) > CHANGE_FRACTION * old.rtt_s \
                    or abs(bandwidth - old.bandwidth_bytes_per_s) > CHANGE_FRACTION * old.bandwidth_bytes_per_s:
                changed = True
            self.links[key] = MeasuredLink(float(rtt_s), float(bandwidth), time.time())
        return changed

    def forget(self, worker_id: str) -> None:
        self.links = {k: v for k, v in self.links.items() if worker_id not in k}

    def link_specs(self, worker_ids: Iterable[str]) -> tuple[LinkSpec, ...]:
        ids = sorted(set(worker_ids))
        if not any(a in ids and b in ids for a, b in self.links):
            return ()
        specs = []
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                link = self.links.get((a, b))
                if link is None:
                    specs.append(LinkSpec(a, b, DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_LATENCY_S))
                else:
                    specs.append(LinkSpec(a, b, link.bandwidth_bytes_per_s, link.latency_s))
        return tuple(specs)

    def slow_pairs(self, worker_ids: Iterable[str]) -> set[tuple[str, str]]:
        ids = set(worker_ids)
        measured = {k: v for k, v in self.links.items() if k[0] in ids and k[1] in ids}
        if len(measured) < 2:
            return set()
        best_s = min(link.hop_time_s() for link in measured.values())
        return {k for k, link in measured.items() if link.hop_time_s() >= SLOW_FACTOR * best_s}

    def hop_latency_s(self) -> dict[tuple[str, str], float]:
        out = {}
        for (a, b), link in self.links.items():
            out[(a, b)] = out[(b, a)] = link.latency_s
        return out

    def hop_bandwidth_bytes_per_s(self) -> dict[tuple[str, str], float]:
        out = {}
        for (a, b), link in self.links.items():
            out[(a, b)] = out[(b, a)] = link.bandwidth_bytes_per_s
        return out

    def rows(self) -> list[dict]:
        return [{"workers": [a, b], "rtt_s": link.rtt_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                 "measured_at_unix_s": link.measured_at_unix_s} for (a, b), link in sorted(self.links.items())]


def _host(address: str) -> str:
    return address.removeprefix("tcp://").rpartition(":")[0]


def probe_peers(workers: Mapping[str, WorkerState], new_id: str, public_keys: Mapping[str, str]) -> tuple[tuple[str, str, str], ...]:
    """(worker id, echo address, public key) of the workers `new_id` should probe."""
    new = workers[new_id]
    return tuple((wid, w.echo_address, public_keys.get(wid, "")) for wid, w in sorted(workers.items())
                 if wid != new_id and w.echo_address and _host(w.echo_address) != _host(new.echo_address))


def probe_requests(workers: Mapping[str, WorkerState], public_keys: Mapping[str, str],
                   worker_ids: tuple[str, ...] = ()) -> dict[str, p.ProbeLinks]:
    asks = {}
    for worker_id in worker_ids or tuple(sorted(workers)):
        peers = probe_peers(workers, worker_id, public_keys)
        peers = peers if worker_ids else tuple(peer for peer in peers if peer[0] > worker_id)
        if peers:
            asks[worker_id] = p.ProbeLinks(peers)
    return asks
