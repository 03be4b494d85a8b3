"""Cache-aware vs cache-blind routing in the simulator: two pipelines of unequal speed serve a
multi-turn chat trace (each turn = the whole history + a new user message).

    python -m benchmarks.prefix_sim [--load 0.8] [--conversations 300] [--turns 8] [--seed 0 1 2]

Parts:
- ``ChatRequest``: a ``SimRequest`` that is turn ``turn`` of conversation ``conversation``; its
  prompt is the conversation so far, so turn k's prompt starts with turn k-1's.
- ``chat_trace(rate, ...)``: conversations start as Poisson arrivals at ``rate`` per second; each
  next turn comes a think time after the previous one (the history grows by the answer and a new
  message; the first prompt is a long system prompt + documents).
- ``PrefixCaches``: per stage the blocks its prefix cache holds (an LRU of the prompts' blocks,
  trimmed to the KV not reserved by running requests: evicted only when memory is needed) and,
  when ``aware``, the scheduler's ``scheduler.prefix_index.PrefixIndex`` the router reads (the
  engine's own code; blind: the router sees no cache, the workers still cache). A request
  reuses what every stage of its route holds (a stage holding less makes the first stage prefill
  again: workers/prompt_start.py). ``hit_rate``: prompt tokens reused / prompt tokens.
- ``two_pipelines()``: a fast pipeline (2 x A100) and a slower one (2 x L40S: 0.44x the memory
  bandwidth, 0.9x the FLOP/s), one site.
- ``run(load, ...)``: the same trace for both policies at ``load`` x the saturation (all turns at
  once, cache-aware);
  ``main`` prints hit rate, p50/p99 TTFT and the aware/blind ratios.
"""
from __future__ import annotations

import argparse
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from benchmarks.sim_cluster import KINDS, SimCluster, SimDevice, SimModel, SimRequest
from benchmarks.simulator import placement_from_ranges, simulate
from placement.problem import Placement
from scheduler.prefix_index import BLOCK_SIZE_TOKENS, PrefixIndex


@dataclass(frozen=True)
class ChatRequest(SimRequest):
    conversation: int = 0
    turn: int = 0

    @property
    def block_hashes(self) -> tuple[tuple[int, int], ...]:
        """Block i of a conversation holds the same tokens in every turn: (conversation, i)."""
        return tuple((self.conversation, i) for i in range(self.prompt_tokens // BLOCK_SIZE_TOKENS))


def chat_trace(rate_per_s: float, conversations: int, turns: int, seed: int, first_prompt_tokens: int = 1200,
               message_tokens: int = 150, answer_tokens: int = 100, think_s: float = 8.0) -> tuple[ChatRequest, ...]:
    """``conversations`` x ``turns`` requests; turn k's prompt = first prompt + (k - 1) x (answer + message)."""
    rng = random.Random(seed)
    out: list[ChatRequest] = []
    t = 0.0
    for c in range(conversations):
        t += rng.expovariate(rate_per_s)
        arrival, prompt = t, first_prompt_tokens + rng.randint(0, 200)
        for k in range(turns):
            answer = max(8, int(rng.gauss(answer_tokens, answer_tokens / 4)))
            out.append(ChatRequest(0, arrival, prompt, answer, c, k))
            prompt += answer + max(8, int(rng.gauss(message_tokens, message_tokens / 2)))
            arrival += think_s * (0.5 + rng.random())
    out.sort(key=lambda r: r.arrival_s)
    return tuple(ChatRequest(x, r.arrival_s, r.prompt_tokens, r.new_tokens, r.conversation, r.turn) for x, r in enumerate(out))


class PrefixCaches:
    def __init__(self, aware: bool, kv_capacity_tokens: Mapping[str, int]) -> None:
        self.aware = aware
        self.capacity_blocks = {s: kv // BLOCK_SIZE_TOKENS for s, kv in kv_capacity_tokens.items()}
        self.router = PrefixIndex()  # the scheduler's belief (what it routed where)
        self.stages = PrefixIndex()  # what the workers hold
        self.queried_tokens = self.hit_tokens = 0

    def lookup(self, r: SimRequest) -> dict[str, int]:
        if not self.aware or not isinstance(r, ChatRequest):
            return {}
        return self.router.lookup(r.block_hashes, r.prompt_tokens)

    def start(self, r: SimRequest, free_kv_tokens: Mapping[str, int]) -> int:
        """Route taken (stage -> KV tokens left unreserved): the tokens reused; publishes its blocks."""
        if not isinstance(r, ChatRequest):
            return 0
        hashes = r.block_hashes
        hit = min(self.stages.cached_tokens(s, hashes, r.prompt_tokens) for s in free_kv_tokens)
        self.stages.record({s: max(0, kv) // BLOCK_SIZE_TOKENS for s, kv in free_kv_tokens.items()}, hashes)
        self.router.record({s: self.capacity_blocks[s] for s in free_kv_tokens}, hashes)
        self.queried_tokens += r.prompt_tokens
        self.hit_tokens += hit
        return hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else math.nan


def two_pipelines(model: SimModel | None = None) -> tuple[SimCluster, Placement]:
    kinds = {k.name: k for k in KINDS}
    devices = (SimDevice("fast-0", kinds["A100-80G"], 0), SimDevice("fast-1", kinds["A100-80G"], 0),
               SimDevice("slow-0", kinds["L40S-48G"], 0), SimDevice("slow-1", kinds["L40S-48G"], 0))
    cluster = SimCluster(model or SimModel(), devices)
    half = cluster.model.num_layers // 2
    ranges = {"fast-0": (0, half), "fast-1": (half, cluster.model.num_layers),
              "slow-0": (0, half), "slow-1": (half, cluster.model.num_layers)}
    return cluster, placement_from_ranges(cluster, ranges)


def _caches(cluster: SimCluster, placement: Placement, aware: bool) -> PrefixCaches:
    from benchmarks.sim_cluster import kv_capacity_tokens
    return PrefixCaches(aware, {d: kv_capacity_tokens(cluster, cluster.device(d), s, e) for d, (s, e) in placement.ranges.items()})


def run(load: float, conversations: int, turns: int, seed: int) -> dict:
    cluster, placement = two_pipelines()
    pipes = (("fast-0", "fast-1"), ("slow-0", "slow-1"))
    # saturation: every conversation's turns at once (output tokens/s once full), cache-aware: a
    # turn reuses the earlier turns' prompts as it would in time
    burst = tuple(ChatRequest(r.request_id, 0.0, r.prompt_tokens, r.new_tokens, r.conversation, r.turn)
                  for r in chat_trace(1.0, conversations, turns, seed + 1))
    sat = simulate(cluster, placement, burst, "potluck", pipes, _caches(cluster, placement, True)).saturated_tokens_per_s
    mean_new = sum(r.new_tokens for r in burst) / len(burst)
    rate = load * sat / mean_new / turns  # conversations per second
    trace = chat_trace(rate, conversations, turns, seed)
    out = {"seed": seed, "saturation_tokens_per_s": sat, "conversations_per_s": rate}
    for name, aware in (("blind", False), ("aware", True)):
        caches = _caches(cluster, placement, aware)
        res = simulate(cluster, placement, trace, "potluck", pipes, caches)
        out[name] = {**asdict(res), "hit_rate": caches.hit_rate}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    print(f"two pipelines (2 x A100, 2 x L40S), {args.conversations} conversations x {args.turns} turns, "
          f"load {args.load:.0%} of the saturation\n")
    print("| seed | routing | prefix hit rate | p50 TTFT s | p99 TTFT s | p50 e2e s | output tok/s |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for seed in args.seed:
        res = run(args.load, args.conversations, args.turns, seed)
        for name in ("blind", "aware"):
            r = res[name]
            print(f"| {seed} | {name} | {r['hit_rate']:.1%} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                  f"{r['e2e_p50_s']:.2f} | {r['output_tokens_per_s']:.0f} |")
        ratios.append((res["aware"]["ttft_p50_s"] / res["blind"]["ttft_p50_s"],
                       res["aware"]["ttft_p99_s"] / res["blind"]["ttft_p99_s"]))
    for seed, (p50, p99) in zip(args.seed, ratios):
        print(f"\nseed {seed}: cache-aware / cache-blind p50 TTFT {p50:.3f}x, p99 TTFT {p99:.3f}x", end="")
    geo = [math.exp(sum(math.log(r[i]) for r in ratios) / len(ratios)) for i in (0, 1)]
    print(f"\n\ngeometric mean over seeds: p50 TTFT {geo[0]:.3f}x, p99 TTFT {geo[1]:.3f}x")


if __name__ == "__main__":
    main()
