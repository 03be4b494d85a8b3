"""Cache-aware routing: the scheduler's prefix index (bounded, LRU), the routing score counting
the prefill a cached prefix saves, and the simulator's two unequal pipelines under a chat trace."""
from __future__ import annotations

import pytest

from scheduler.prefix_index import PrefixIndex, prompt_hashes
from scheduler.routing import LoadSnapshot, RouteRequest, StageLoad, choose_route


def stage(wid: str, s: int, e: int, queued: int = 0, prefill: float = 1e-3) -> StageLoad:
    return StageLoad(wid, s, e, queued, 0, 100_000, 0.01, prefill, True, 0.0005, 4096)


def test_index_finds_whole_blocks_of_a_prefix_and_stays_within_each_stages_kv() -> None:
    index = PrefixIndex(block_size=4)
    history = list(range(40))
    index.record({"a": 100, "b": 3}, prompt_hashes(history, 4))
    turn = history + [7, 7, 7]
    assert index.lookup(prompt_hashes(turn, 4), len(turn)) == {"a": 40}  # b kept only its last 3 blocks
    assert index.cached_tokens("a", prompt_hashes(history, 4), len(history)) == 36  # never the last block
    assert len(index) == 13
    index.forget("a")
    assert index.lookup(prompt_hashes(turn, 4), len(turn)) == {} and len(index) == 3


def test_a_conversation_stays_where_its_history_is_unless_load_says_otherwise() -> None:
    # two pipelines; P2 is a little faster, P1 holds 1,900 tokens of the 2,000-token prompt
    snap = LoadSnapshot((stage("A1", 0, 4), stage("B1", 4, 8), stage("A2", 0, 4, prefill=8e-4), stage("B2", 4, 8, prefill=8e-4)), 8)
    blind = RouteRequest(2000, 50)
    assert choose_route(snap, blind).worker_ids == ("A2", "B2")
    aware = RouteRequest(2000, 50, {"A1": 1900, "B1": 1900})
    assert choose_route(snap, aware).worker_ids == ("A1", "B1")
    # P1 queued with 6,000 prompt tokens: the saved prefill no longer pays for the wait
    busy = LoadSnapshot((stage("A1", 0, 4, queued=6000), stage("B1", 4, 8, queued=6000), *snap.stages[2:]), 8)
    assert choose_route(busy, aware).worker_ids == ("A2", "B2")


@pytest.mark.slow
def test_simulator_cache_aware_routing_halves_the_p50_ttft_of_a_chat_trace() -> None:
    from benchmarks.prefix_sim import run

    res = run(0.8, conversations=200, turns=5, seed=0)
    blind, aware = res["blind"], res["aware"]
    assert blind["completed"] == aware["completed"] == 1000 and blind["rejected"] == aware["rejected"] == 0
    assert aware["hit_rate"] > blind["hit_rate"] + 0.1
    assert aware["ttft_p50_s"] <= 0.5 * blind["ttft_p50_s"], (aware, blind)
