"""The worker's configuration, one frozen dataclass (workers/worker.py takes it).

Parts: `WorkerConfig` -- where the scheduler is, where to listen, which device and backend, how
much memory, profiling, thread pinning, fault injection for tests, the cluster token and CURVE.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerConfig:
    scheduler_address: str  # "tcp://HOST:PORT"
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: a free port
    advertise_host: str | None = None  # address peers use to reach us (default: listen_host)
    device: str = "cpu"
    backend: str = "torch"  # the installed backend that runs the layers (workers/backend_plugins.py)
    memory_bytes: int | None = None  # usable for weights + KV (default: measured)
    worker_id: str | None = None
    num_threads: int | None = None
    parent_pid: int | None = None  # exit when this process is gone (local workers)
    step_delay_s: float = 0.0  # fault injection for tests: extra time per step (off by default)
    slowdown: float = 1.0  # fault injection: every step (and the profile) takes this many times as long
    profile: bool = False  # measure the device at join (workers/profiler.py)
    profile_model_dir: str | None = None  # also time one layer of this model when profiling
    profile_seconds: float = 2.0
    pin_threads: bool = True  # CPU device: main thread on one core, OpenMP threads on the others
    token: str = field(default="", repr=False)  # the cluster token (workers/curve.py)
    use_curve: bool = True  # CurveZMQ on every socket (off only to measure what it costs)
    secret_key: str = field(default="", repr=False)  # own CURVE secret key (z85); default: a new one
    layer_cache_dir: str = ""  # fetched layers (workers/layer_cache.py); "": the user's cache dir
    fetch_layers: bool = False  # fetch layers from the cluster even when the model path exists here
    may_fetch_layers: bool = False  # `potluck join`: may lack the model, so a re-plan lets it prefetch


