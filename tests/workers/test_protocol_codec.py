"""The wire codec: round trips, zero-copy tensor frames, and malformed input rejected cleanly."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from workers import codec
from workers.device_profile import ChipPrior, DeviceProfile, LayerTimings
from workers import protocol as p
from workers.tensor_frames import payload_to_tensor, tensor_to_payload


def _start() -> p.RequestStart:
    sampling = p.SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=3, eos_token_ids=(1, 2), num_top_logprobs=2)
    return p.RequestStart(route=("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"), scheduler_address="tcp://127.0.0.1:3", sampling=sampling, first_token_index=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activations_round_trip_keeps_dtype_and_values(dtype: torch.dtype) -> None:
    hidden = torch.randn(5, 8).to(dtype)
    message = p.Activations(
        entries=(p.ActivationEntry("a#0", 0, 3, _start()), p.ActivationEntry("b#1", 7, 2)),
        hidden=tensor_to_payload(hidden),
    )
    frames = codec.encode(message)
    assert len(frames) == 2  # header + one raw tensor frame, the tensor is not in the header
    assert len(frames[0]) < 700  # a first hop carries the sampling message (~600 bytes); the 160+ tensor bytes are not here
    decoded = codec.decode([bytes(memoryview(f)) for f in frames])
    assert decoded.entries == message.entries
    restored = payload_to_tensor(decoded.hidden)
    assert restored.dtype == dtype
    assert torch.equal(restored, hidden)


def test_tensor_frame_shares_memory_with_the_tensor() -> None:
    hidden = torch.zeros(4, 4)
    payload = tensor_to_payload(hidden)
    hidden[0, 0] = 42.0  # the payload is a view, not a copy
    assert torch.frombuffer(bytearray(payload.data), dtype=torch.float32)[0] == 42.0


def _profile() -> DeviceProfile:
    timings = LayerTimings("m", 1, 4096, "float32", ((1, 128, 0.001), (4, 128, 0.002)), ((128, 1e-5),))
    return DeviceProfile("cpu", "cpu", "cpu: x", 1 << 30, 1.5e9, "float32", 2e10, 0.0, 0.1, layer_timings=timings,
                         peer_rtt_s={"tcp://127.0.0.1:8": 0.001}, prior=ChipPrior("x", 1e12, 1e11, None))


def test_every_message_kind_round_trips_over_real_sockets() -> None:
    messages = [
        p.Register("w", "tcp://127.0.0.1:9", 1 << 30, "cpu", _profile(), 12),
        p.LayersReady("w", 3, 0, 4, 1024, 5000),
        p.Heartbeat("w", 3, 2, 1, 100, 200, 0.01, 77),
        p.TokenOutputs("w", (p.TokenOutput("a#0", 0, 5, None, -0.5, ((5, -0.5), (6, -1.25))),)),
        p.RequestFailed("w", "a#0", "boom"),
        p.AssignLayers(3, "/m", 0, 4, "float32", 1 << 20, 2),
        p.StartRequest("a#0", (1, 2, 3), _start()),
        p.ReleaseRequests(("a#0", "b#0")),
        p.Shutdown("bye"),
        p.NextTokens((p.NextToken("a#0", 9, 3),)),
    ]
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        for message in messages:
            push.send_multipart(codec.encode(message))
            assert pull.poll(2000)
            assert codec.decode(pull.recv_multipart(copy=False)) == message
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1not msgpack"],
        [msgpack.packb(["NoSuchKind", {}])],
        [msgpack.packb(["Shutdown", {"reason": 5}])],
        [msgpack.packb(["ReleaseRequests", {}])],
        [msgpack.packb(["ReleaseRequests", {"request_ids": ["a"], "extra": 1}])],
        [msgpack.packb(["Activations", {"entries": [], "hidden": {"__tensor__": 0, "dtype": "float32", "shape": [1]}}])],
        [msgpack.packb({"kind": "Shutdown"})],
    ],
)
def test_malformed_messages_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(p.ProtocolError):
        codec.decode(frames)


def test_tensor_size_mismatch_is_rejected() -> None:
    payload = p.TensorPayload("float32", (2, 4), b"\x00" * 12)
    with pytest.raises(p.ProtocolError):
        payload_to_tensor(payload)
    with pytest.raises(p.ProtocolError):
        payload_to_tensor(p.TensorPayload("not_a_dtype", (1,), b"\x00" * 4))


def test_encode_takes_only_protocol_messages_and_lists_for_tuples() -> None:
    with pytest.raises(p.ProtocolError):
        codec.encode(p.SamplingParams(max_new_tokens=1))  # a dataclass, but not a message
    as_tuple = p.ReleaseRequests(("a", "b"))
    as_list = p.ReleaseRequests(["a", "b"])  # type: ignore[arg-type]
    assert codec.encode(as_list) == codec.encode(as_tuple)
    nested = p.Register("w", "tcp://127.0.0.1:9", 1, "cpu", _profile())  # dataclasses, tuples, dicts inside
    assert codec.decode(codec.encode(nested)) == nested
