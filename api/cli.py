"""The `potluck` command.

Parts:
- `serve`: scheduler + OpenAI API in this process, plus `--local-workers N` worker processes and,
  with `--ray ADDRESS`, workers on every node of a Ray cluster (api/ray_launcher.py).
- `join`: a worker on this machine that registers with a scheduler elsewhere.
- `demo`: builds a small random-weight checkpoint, then serves it with 3 local workers.
- `plan`: solves layer placement for a model and a devices file, prints the placement.
- `profile`: measures this machine's device and prints the profile as JSON.
- `status`: prints a running cluster as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.planner import DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN, MIN_MIX_REQUESTS
from scheduler.routing import MAX_QUEUE_WAIT_S

if TYPE_CHECKING:  # Ray is optional: imported only with --ray
    from api.local_workers import LocalWorkers
    from api.ray_launcher import RayWorkers

log = logging.getLogger("potluck")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--local-workers", type=int, default=None, help="worker processes to start on this machine (default 1, or 0 with --ray; 0: wait for `potluck join`)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="also start workers on every node of a Ray cluster: auto (the cluster this machine joined with `ray start`), HOST:PORT, ray://HOST:PORT, or local (a one-machine Ray started here)")
    parser.add_argument("--ray-workers-per-node", type=int, default=None, help="workers per Ray node (default: one per GPU, else one)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory's name)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="device of the local workers (default: best available)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--scheduler-host", default="127.0.0.1", help="interface for workers to reach the scheduler (0.0.0.0 for `potluck join` from other machines)")
    parser.add_argument("--scheduler-port", type=int, default=0, help="scheduler control port (default: a free one)")
    parser.add_argument("--api-key", default=os.environ.get("POTLUCK_API_KEY"), help="require this bearer key (or POTLUCK_API_KEY)")
    parser.add_argument("--worker-threads", type=int, default=None, help="torch threads per local worker")
    parser.add_argument("--placement", choices=["auto", "solver", "pipeline"], default="auto", help="auto: one pipeline when all workers share a host, else the placement solver")
    parser.add_argument("--placement-objective", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--heartbeat-timeout-s", type=float, default=5.0, help="a worker silent this long is declared lost")
    parser.add_argument("--max-queue-wait-s", type=float, default=MAX_QUEUE_WAIT_S, help=f"a request whose best path would queue its prompt longer than this waits for a path to free up (default {MAX_QUEUE_WAIT_S:g}; inf: off)")
    parser.add_argument("--prompt-tokens-per-output-token", type=float, default=DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN,
                        help=f"workload mix placement balances prefill and decode for, until {MIN_MIX_REQUESTS} requests have "
                             f"finished and their own mix is used (default {DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN:g}; 0: decode only)")
    parser.add_argument("--no-profile", action="store_true", help="local workers skip measuring their device at join")
    parser.add_argument("--max-connections", type=int, default=1024, help="open HTTP connections at most; more are closed at once (default 1024)")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="largest HTTP request body; larger ones get 413 (default 8 MiB)")
    parser.add_argument("--http-header-timeout-s", type=float, default=10.0, help="close a connection that sends no whole request head in this time")
    parser.add_argument("--http-body-timeout-s", type=float, default=30.0, help="408 for a request body that stalls this long")
    parser.add_argument("--http-idle-timeout-s", type=float, default=5.0, help="close an idle keep-alive connection after this long")
    parser.add_argument("--token", default=os.environ.get("POTLUCK_TOKEN"), help="the cluster token workers join with (or POTLUCK_TOKEN; default: a new one, printed once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potluck", description="Pool mismatched machines into one LLM server.")
    parser.add_argument("--log-level", default=os.environ.get("POTLUCK_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the scheduler and the OpenAI API")
    serve.add_argument("--model", required=True, help="local Hugging Face model directory (safetensors)")
    _add_serve_arguments(serve)

    demo = commands.add_parser("demo", help="make a small checkpoint and serve it with 3 local workers")
    demo.add_argument("--dir", default="demo-model", help="where to write the checkpoint (default ./demo-model)")
    _add_serve_arguments(demo)
    demo.set_defaults(local_workers=3)

    from workers.__main__ import build_arg_parser as worker_arguments

    join = commands.add_parser("join", help="run a worker that joins a scheduler", parents=[worker_arguments(add_help=False)])
    join.set_defaults(host=None, profile=True)  # listen on the interface that reaches the scheduler

    plan = commands.add_parser("plan", help="solve layer placement for a model and devices")
    plan.add_argument("--model", required=True, help="local Hugging Face model directory")
    plan.add_argument("--devices", required=True, help="devices JSON file")
    plan.add_argument("--time-limit", type=float, default=10.0, help="solver time limit in seconds")
    plan.add_argument("--context-tokens", type=int, default=4096, help="KV reserve: context length")
    plan.add_argument("--concurrency", type=int, default=4, help="KV reserve: concurrent sequences")
    plan.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    profile = commands.add_parser("profile", help="measure this machine and print its profile as JSON")
    profile.add_argument("--device", default=None)
    profile.add_argument("--model", default=None, help="also time one layer of this model")

    status = commands.add_parser("status", help="print a running cluster as a table")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    status.add_argument("--api-key", default=os.environ.get("POTLUCK_API_KEY"))
    return parser


async def serve(model_dir: Path, args: argparse.Namespace) -> None:
    import uvicorn

    from api.cluster_routes import PUBLIC_PATHS, extra_routers
    from api.http_limits import BodyLimitMiddleware, HttpLimits, uvicorn_options
    from api.local_workers import LocalWorkers
    from api.server import create_app
    from scheduler.engine import Engine, EngineConfig
    from scheduler.tokenizer import Tokenizer
    from workers.model_facts import read_model_facts
    from workers.__main__ import best_device

    from workers.curve import check_token, new_token

    dtype = args.dtype
    token = check_token(args.token) if args.token else new_token()
    facts = read_model_facts(model_dir, dtype)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    local_count = args.local_workers if args.local_workers is not None else (0 if args.ray else 1)
    if local_count < 0:
        raise ValueError(f"--local-workers must be >= 0, got {local_count}")
    if not args.max_queue_wait_s >= 0:
        raise ValueError(f"--max-queue-wait-s must be >= 0 (inf: off), got {args.max_queue_wait_s}")
    if not 0 <= args.prompt_tokens_per_output_token < float("inf"):
        raise ValueError(f"--prompt-tokens-per-output-token must be finite and >= 0, got {args.prompt_tokens_per_output_token}")
    profile_dir = None if args.no_profile else str(model_dir)
    workers = LocalWorkers("", local_count, args.device or best_device(), args.worker_threads, profile_model_dir=profile_dir, token=token)
    ray_workers = _connect_ray(args, profile_dir) if args.ray else None
    if ray_workers is not None:
        print(f"potluck: Ray cluster at {ray_workers.gcs_address}; more machines join it with `ray start --address={ray_workers.gcs_address}`", flush=True)
    try:  # nothing may leave a Ray instance behind
        control_host = args.scheduler_host
        if ray_workers is not None and control_host == "127.0.0.1":  # workers on other nodes must reach it
            from api.ray_launcher import scheduler_host

            control_host = scheduler_host(args.ray)
        expected = local_count + (ray_workers.planned_workers() if ray_workers else 0)
        engine = Engine(
            EngineConfig(
                model_dir=str(model_dir),
                model=facts,
                served_model_name=args.served_model_name or model_dir.name,
                control_host=control_host,
                control_port=args.scheduler_port,
                dtype=dtype,
                min_workers=max(1, expected),
                local_workers=expected,
                max_model_len=args.max_model_len,
                placement=args.placement,
                placement_objective=args.placement_objective,
                heartbeat_timeout_s=args.heartbeat_timeout_s,
                max_queue_wait_s=args.max_queue_wait_s,
                prompt_tokens_per_output_token=args.prompt_tokens_per_output_token,
                token=token,
            ),
            tokenizer,
        )
    except BaseException:
        if ray_workers is not None:
            ray_workers.stop()
        raise
    limits = HttpLimits(args.max_connections, args.max_request_bytes, args.http_header_timeout_s, args.http_body_timeout_s, args.http_idle_timeout_s)
    app = create_app(engine, api_key=args.api_key, routers=extra_routers(engine), public_paths=PUBLIC_PATHS)
    app.add_middleware(BodyLimitMiddleware, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", **uvicorn_options(limits)))

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        url = f"http://{args.host}:{args.port}/v1"
        print(f"potluck: serving {engine.model_id!r} at {url} (scheduler {engine.control_address})", flush=True)
        if not args.token:  # printed once; pass it back with --token / POTLUCK_TOKEN to reuse it
            join_host = engine.control_address.removeprefix("tcp://")
            print(f"potluck: cluster token (keep it secret): {token}\n  join with: POTLUCK_TOKEN={token} potluck join --scheduler {join_host}", flush=True)
        try:
            await engine.wait_ready(timeout_s=600)
        except TimeoutError as exc:
            print(f"potluck: {exc}", flush=True)
            return
        auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
        body = json.dumps({"model": engine.model_id, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
        print(f"potluck: ready with {len(engine.cluster.workers)} worker(s). Try:\n  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'", flush=True)

    try:
        await engine.start()
        workers.scheduler_address = engine.control_address
        workers.start()
        if ray_workers is not None:
            ray_workers.scheduler_address = engine.control_address
            ray_workers.token = token
            ray_workers.start()
        announcer = asyncio.create_task(announce())
        reviver = asyncio.create_task(_revive_local_workers(workers))
        try:
            await server.serve()
        finally:
            announcer.cancel()
            reviver.cancel()
    finally:
        workers.stop()
        if ray_workers is not None:
            ray_workers.stop()
        await engine.stop(shutdown_workers=True)


async def _revive_local_workers(workers: LocalWorkers, period_s: float = 1.0) -> None:
    """A local worker process that ended (crashed, killed) starts again and re-joins."""
    while True:
        await asyncio.sleep(period_s)
        for index in workers.restart_exited():
            log.warning("local worker %d had exited; started it again", index)


def _connect_ray(args: argparse.Namespace, profile_dir: str | None) -> RayWorkers:
    from api.ray_launcher import RayWorkers

    ray_workers = RayWorkers(
        args.ray,
        workers_per_node=args.ray_workers_per_node,
        device=args.device,
        threads_per_worker=args.worker_threads,
        profile_model_dir=profile_dir,
    )
    try:
        ray_workers.connect()
    except BaseException:
        ray_workers.stop()
        raise
    return ray_workers


def run_join(args: argparse.Namespace) -> None:
    from workers.__main__ import config_from_args
    from workers.worker import run_worker

    run_worker(config_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM stops like Ctrl-C: the same clean-up (workers told, processes stopped)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("serve", "demo"):
            if args.command == "demo":
                from api.demo_model import build_demo_model

                model_dir = Path(args.dir).resolve()
                if not (model_dir / "config.json").exists():
                    print(f"potluck: building a small random-weight Llama checkpoint in {model_dir}", flush=True)
                    build_demo_model(model_dir)
            else:
                model_dir = Path(args.model).resolve()
            if not (model_dir / "config.json").is_file():
                print(f"potluck: {model_dir} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
                return 2
            asyncio.run(serve(model_dir, args))
        elif args.command == "join":
            run_join(args)
        elif args.command == "plan":
            from api.plan_command import run_plan

            return run_plan(args)
        elif args.command == "profile":
            from workers.profiler import main as profile_main

            return profile_main(args)
        elif args.command == "status":
            from api.status_command import run_status

            return run_status(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"potluck: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
