"""The engine's configuration, one frozen dataclass (scheduler/engine.py takes it).

Parts: `EngineConfig` (the model, the control socket, timeouts, admission limits, placement, the
cluster token, CURVE and prefix caching switches).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.admission import DEFAULT_MAX_WAITING, DEFAULT_ROUTE_WAIT_S
from scheduler.planner import DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN
from scheduler.routing import MAX_QUEUE_WAIT_S
from workers import protocol as p


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    model: p.ModelFacts
    served_model_name: str
    control_host: str = "127.0.0.1"
    control_port: int = 0  # 0: a free port
    dtype: str = "auto"
    quantization: str = "none"  # none | int8 | int4 (safetensors only; a GGUF is quantized already)
    min_workers: int = 1  # plan once this many workers have registered
    local_workers: int = 0  # workers started with this scheduler: requests wait for them to join
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_concurrent_sequences: int = 16  # KV reserve is sized for this many full-length sequences
    heartbeat_timeout_s: float = 5.0
    token_timeout_s: float = 120.0  # no token for this long: the request fails
    route_wait_s: float = DEFAULT_ROUTE_WAIT_S  # how long a request waits for layers being loaded or a path with room
    max_restarts: int = 8
    max_waiting: int = DEFAULT_MAX_WAITING  # admission queue bound: beyond it, HTTP 429
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S  # late binding (scheduler/routing.py); inf: off
    retry_after_s: float = 2.0
    placement: str = "auto"  # auto | solver | pipeline (scheduler/planner.py)
    placement_objective: str = "throughput"  # or "latency"
    # what placement plans for until MIN_MIX_REQUESTS have finished (scheduler/planner.py)
    prompt_tokens_per_output_token: float = DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN
    token: str | None = None  # the cluster token (None: a new one, `Engine.token`); scheduler/membership.py
    curve: bool = True  # CurveZMQ on every socket (off only to measure what it costs)
    prefix_caching: bool = True  # workers reuse the KV of cached prompt prefixes (workers/kv_cache.py)
    kv_tokens: int | None = None  # KV tokens per stage (None: max_model_len x max_concurrent_sequences)
