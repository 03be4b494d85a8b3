"""A worker's link prober against a real echo responder and a real PULL socket for its reports."""
from __future__ import annotations

import zmq

from workers import codec, curve
from workers import protocol as p
from workers.link_prober import LinkProber
from workers.peer_probe import EchoResponder


def test_prober_reports_measured_links_and_notices_drift() -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    keys = curve.KeyPair.generate()
    prober = LinkProber(context, keys, "w0", "127.0.0.1", "127.0.0.1", f"tcp://127.0.0.1:{port}", "", use_curve=False,
                         timeout_s=1.0)
    peer = EchoResponder("127.0.0.1", context=context)
    try:
        assert prober.echo_address.startswith("tcp://127.0.0.1:")
        prober.ask((("w1", peer.address, ""), ("w0", prober.echo_address, ""), ("gone", "tcp://127.0.0.1:1", "")))
        assert pull.poll(60_000)
        report = codec.decode(pull.recv_multipart(copy=False))
        assert isinstance(report, p.LinkReport) and report.worker_id == "w0"
        (peer_id, rtt_s, bandwidth), = report.links  # itself skipped, the unreachable one left out
        assert peer_id == "w1" and 0 < rtt_s < 0.5 and bandwidth > 1e6
        assert prober._drifted() == ()  # same link, same round trip
        prober.measured["w1"] = (prober.measured["w1"][0], 1.0)  # as if it had been reported at 1 s
        assert [peer[0] for peer in prober._drifted()] == ["w1"]
    finally:
        prober.close()
        peer.close()
        pull.close(linger=0)
        context.term()
