"""`python -m workers --scheduler tcp://HOST:PORT`: one worker process (what `potluck join` and
`potluck serve --local-workers N` start).

Parts:
- `build_arg_parser`, `config_from_args`: command line -> `WorkerConfig`.
- `best_device`: cuda, else mps, else cpu (torch's view; another backend's default is its first
  device, workers/backend_plugins.py). `scheduler_address`: HOST:PORT -> tcp://HOST:PORT.
- `address_towards(address)`: the interface `potluck join` listens on by default (the one that
  reaches the scheduler, not 0.0.0.0). The cluster token comes from `--token` or `POTLUCK_TOKEN`.
- `bound_malloc()`: glibc's trim threshold and arena count, so worker memory levels off.
- `main`: SIGTERM stops the worker as Ctrl-C does (it leaves the cluster, workers/worker.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the worker load only when a worker runs (`potluck --help` stays fast)
    from workers.worker import WorkerConfig

log = logging.getLogger("potluck.worker")


def build_arg_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potluck-worker", description="Run one potluck worker.", add_help=add_help)
    parser.add_argument("--scheduler", required=True, help="scheduler control address, HOST:PORT or tcp://HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--advertise-host", default=None, help="host peers use to reach this worker")
    parser.add_argument("--backend", default="auto", help="installed backend that runs the layers (`potluck backends` lists them; auto: the preferred one with a device)")
    parser.add_argument("--device", default=None, help="a device the backend lists: torch cpu, cuda, cuda:N or mps; mlx cpu or gpu (default: the backend's best)")
    parser.add_argument("--memory-bytes", type=int, default=None, help="memory for weights + KV cache")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-pin-threads", dest="pin_threads", action="store_false",
        help="on CPU, leave thread placement to the OS (default: main thread on one core, OpenMP threads on the others)",
    )  # fmt: skip
    parser.add_argument("--layer-cache", default=None, metavar="DIR", help="where layers fetched from the cluster are kept, by digest (default: $POTLUCK_LAYER_CACHE or ~/.cache/potluck/layers)")
    parser.add_argument("--fetch-layers", action="store_true", help="fetch this worker's layers from the cluster even when the model path exists here (default: only when it does not)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--slowdown", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="measure the device before registering")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip measuring the device")
    parser.add_argument("--profile-model", "--model", dest="profile_model", default=None, help="time one layer of this (local) model directory when profiling")
    parser.add_argument("--profile-seconds", type=float, default=2.0, help="time budget of the profile")
    parser.add_argument("--token", default=None, help="the cluster token `potluck serve` printed (default: $POTLUCK_TOKEN)")
    parser.add_argument("--no-curve", dest="use_curve", action="store_false", help=argparse.SUPPRESS)  # benchmarks only
    return parser


def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def scheduler_address(value: str) -> str:
    value = value.strip()
    if value.startswith("tcp://"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"scheduler address must be HOST:PORT, got {value!r}")
    return f"tcp://{host}:{port}"


def address_towards(address: str) -> str:
    """The local interface address this machine reaches `address` (tcp://HOST:PORT) from: where a
    joining worker listens unless asked otherwise (never every interface by default)."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port)))  # UDP: no packet is sent, only a route chosen
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    scheduler = scheduler_address(args.scheduler)
    from workers.backend_plugins import resolve_backend
    from workers.curve import TOKEN_ENV, WORKER_KEY_ENV, check_token
    from workers.worker import WorkerConfig

    plugin = resolve_backend(getattr(args, "backend", None) or "auto")
    device = args.device or (best_device() if plugin.name == "torch" else plugin.default_device())
    return WorkerConfig(
        scheduler_address=scheduler,
        listen_host=args.host or address_towards(scheduler),
        listen_port=args.port,
        advertise_host=args.advertise_host,
        device=device,
        backend=plugin.name,
        memory_bytes=args.memory_bytes,
        worker_id=args.worker_id,
        num_threads=args.threads,
        parent_pid=args.parent_pid,
        step_delay_s=args.step_delay_s,
        slowdown=args.slowdown,
        profile=args.profile,
        profile_model_dir=args.profile_model,
        profile_seconds=args.profile_seconds,
        pin_threads=args.pin_threads,
        token=check_token(args.token or os.environ.get(TOKEN_ENV)),
        use_curve=args.use_curve,
        secret_key=os.environ.get(WORKER_KEY_ENV, ""),
        layer_cache_dir=getattr(args, "layer_cache", None) or "",
        fetch_layers=getattr(args, "fetch_layers", False),
    )


# glibc malloc: with its default dynamic mmap threshold, freed large tensors raise the threshold and
# later ones come from the heap, whose free space fragments across requests of varied sizes; a
# fixed trim threshold (which also fixes the mmap threshold) and two arenas keep a worker's RSS
# flat. 800 varied requests, 3 workers (demo model): 370 -> 382 MiB and climbing by default,
# flat at 364 MiB from the 100th request on with MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=1 MiB.
M_TRIM_THRESHOLD, M_ARENA_MAX = -1, -8


def bound_malloc(trim_threshold_bytes: int = 1 << 20, arenas: int = 2) -> bool:
    """Set glibc's trim threshold and arena count in this process; False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes)) and bool(mallopt(M_ARENA_MAX, arenas))


def main(argv: Sequence[str] | None = None) -> None:
    bound_malloc()
    logging.basicConfig(level=os.environ.get("POTLUCK_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    args = build_arg_parser().parse_args(argv)
    from workers.worker import run_worker

    try:
        config = config_from_args(args)
    except (LookupError, ValueError) as exc:
        raise SystemExit(f"potluck worker: {exc}") from None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM leaves the cluster as Ctrl-C does
    try:
        run_worker(config)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # one line (its last line is what `potluck serve` reports), traceback at debug
        log.debug("worker failed", exc_info=True)
        print(f"potluck worker {args.worker_id or ''}: {type(exc).__name__}: {exc}".replace("  ", " "), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
