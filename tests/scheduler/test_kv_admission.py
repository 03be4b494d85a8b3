"""Admission by KV in whole blocks, and limits that queue a burst instead of refusing it."""
from __future__ import annotations

from api.cli import build_parser
from scheduler.admission import DEFAULT_MAX_WAITING, DEFAULT_ROUTE_WAIT_S, AdmissionQueue
from scheduler.engine import EngineConfig
from scheduler.routing import LoadSnapshot, RouteRequest, StageLoad, choose_route, kv_block_tokens


def test_a_request_reserves_whole_kv_blocks() -> None:
    assert [kv_block_tokens(n) for n in (1, 16, 17, 250)] == [16, 16, 32, 256]
    request = RouteRequest(20, 4, kv_block_tokens=16)  # 24 tokens: two blocks on a worker
    assert request.kv_tokens == 32
    stages = lambda kv: LoadSnapshot((StageLoad("a", 0, 2, 0, 0, kv, 0.01, 1e-4),), 2)  # noqa: E731
    assert choose_route(stages(31), request) is None  # 24 tokens free would not hold its 2 blocks
    assert choose_route(stages(32), request) is not None


def test_defaults_queue_a_burst_of_256_and_the_limits_are_settable() -> None:
    assert DEFAULT_MAX_WAITING >= 256 and DEFAULT_ROUTE_WAIT_S >= 60
    queue: AdmissionQueue[int] = AdmissionQueue(DEFAULT_MAX_WAITING, 1.0)
    assert all(queue.offer(i, 0.0, has_route=False).outcome == "queued" for i in range(256))
    fields = EngineConfig.__dataclass_fields__
    assert fields["max_waiting"].default == DEFAULT_MAX_WAITING and fields["route_wait_s"].default == DEFAULT_ROUTE_WAIT_S
    args = build_parser().parse_args(["serve", "--model", "m", "--max-waiting-requests", "5", "--max-queue-wait-s", "7",
                                      "--late-binding-s", "2", "--no-prefix-caching"])
    assert (args.max_waiting_requests, args.max_queue_wait_s, args.late_binding_s, args.prefix_caching) == (5, 7.0, 2.0, False)
    defaults = build_parser().parse_args(["serve", "--model", "m"])
    assert (defaults.max_waiting_requests, defaults.max_queue_wait_s, defaults.prefix_caching) == (DEFAULT_MAX_WAITING, DEFAULT_ROUTE_WAIT_S, True)
