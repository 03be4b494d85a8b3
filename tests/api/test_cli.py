"""`potluck` as a new user meets it: fast help, one-line start-up errors with their exit codes,
a worker that dies while starting, `potluck plan` from config.json alone.

Every command runs as a real process (`python -m api.cli`) from the worktree.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.startup import ExitCode
from tests.checkpoints import make_checkpoint
from tests.e2e.served import free_port

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B_CONFIG = {  # the shapes of Llama-3.3-70B-Instruct's config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def potluck(*args: str, timeout_s: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """The finished command and the CPU seconds it took. The shared 2-core machine runs at a load
    of 10+ at times (importing torch alone then takes 5 s of wall time), so the "within 10 s"
    bound is checked on the process's own CPU time, and the wall time only by `timeout_s`."""
    began = _children_cpu_s()
    done = subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    return done, _children_cpu_s() - began


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "llama", "llama", num_hidden_layers=2)


def test_help_imports_no_heavy_library() -> None:
    """`potluck --help` stays fast because it imports neither torch, OR-Tools nor FastAPI."""
    probe = ("import sys; from api.cli import build_parser\n"
             "for argv in ([], ['serve'], ['join'], ['plan'], ['status']):\n"
             "    try: build_parser().parse_args([*argv, '--help'])\n"
             "    except SystemExit: pass\n"
             "print(sorted(m for m in ('torch', 'ortools', 'fastapi', 'uvicorn', 'zmq', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_cli_defaults_are_the_schedulers() -> None:
    from api import cli
    from scheduler.planner import DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN, MIN_MIX_REQUESTS
    from scheduler.admission import DEFAULT_MAX_WAITING, DEFAULT_ROUTE_WAIT_S
    from scheduler.routing import MAX_QUEUE_WAIT_S
    from workers.curve import TOKEN_ENV

    assert (cli.MAX_QUEUE_WAIT_S, cli.DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN, cli.MIN_MIX_REQUESTS) == (
        MAX_QUEUE_WAIT_S, DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN, MIN_MIX_REQUESTS)
    assert (cli.DEFAULT_MAX_WAITING, cli.DEFAULT_ROUTE_WAIT_S) == (DEFAULT_MAX_WAITING, DEFAULT_ROUTE_WAIT_S)
    assert TOKEN_ENV == "POTLUCK_TOKEN"  # named in `--token`'s help without importing zmq
    from scheduler.engine_config import EngineConfig

    assert cli.DEFAULT_MAX_CONCURRENT_SEQUENCES == EngineConfig.max_concurrent_sequences


def _config_only(root: Path) -> Path:
    folder = root / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
    return folder


def _cases(model_dir: Path, tmp: Path) -> dict[str, tuple[list[str], ExitCode, str]]:
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    truncated = tmp / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((model_dir / name).read_bytes())
    weights = (model_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_config = tmp / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "llama",')
    unsupported = tmp / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({**LLAMA_70B_CONFIG, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp / "list.json").write_text("[]")
    (tmp / "broken.json").write_text("{")
    (tmp / "entry.json").write_text(json.dumps({"devices": [{"id": "x"}]}))
    config_only = _config_only(tmp)
    serve = ["serve", "--local-workers", "1", "--no-profile"]
    plan = ["plan", "--model", str(model_dir), "--time-limit", "1"]
    return {
        "config.json only": ([*serve, "--model", str(config_only)], ExitCode.MODEL_DIR, "holds no weights"),
        "no config.json": ([*serve, "--model", str(tmp)], ExitCode.MODEL_DIR, "no config.json"),
        "not a directory": ([*serve, "--model", str(tmp / "nowhere")], ExitCode.MODEL_DIR, "is not a directory"),
        "missing tokenizer.json": ([*serve, "--model", str(no_tokenizer)], ExitCode.MODEL_DIR, "no tokenizer.json"),
        "truncated model.safetensors": ([*serve, "--model", str(truncated)], ExitCode.MODEL_DIR, "is cut short"),
        "config.json not JSON": ([*serve, "--model", str(bad_config)], ExitCode.MODEL_DIR, "not valid JSON"),
        "unsupported family": (["plan", "--model", str(unsupported), "--devices", str(ROOT / "examples" / "devices.json")],
                               ExitCode.MODEL_DIR, "gpt2"),
        "--port 99999": ([*serve, "--model", str(model_dir), "--port", "99999"], ExitCode.USAGE, "99999 is not a port number"),
        "--port http": ([*serve, "--model", str(model_dir), "--port", "http"], ExitCode.USAGE, "'http' is not a port number"),
        "--scheduler-port -1": ([*serve, "--model", str(model_dir), "--scheduler-port", "-1"], ExitCode.USAGE, "not a port number"),
        "--log-level loud": (["--log-level", "loud", "status"], ExitCode.USAGE, "invalid choice"),
        "devices.json is a list": ([*plan, "--devices", str(tmp / "list.json")], ExitCode.DEVICES_FILE, "holds a JSON list"),
        "devices.json not JSON": ([*plan, "--devices", str(tmp / "broken.json")], ExitCode.DEVICES_FILE, "not valid JSON"),
        "devices.json missing": ([*plan, "--devices", str(tmp / "none.json")], ExitCode.DEVICES_FILE, "cannot read devices"),
        "device without memory": ([*plan, "--devices", str(tmp / "entry.json")], ExitCode.DEVICES_FILE, "has no memory_bytes"),
        "status of nobody": (["status", "--url", f"127.0.0.1:{free_port()}/v1"], ExitCode.UNREACHABLE, "cannot reach"),
    }


CASES = ["config.json only", "no config.json", "not a directory", "missing tokenizer.json", "truncated model.safetensors",
         "config.json not JSON", "unsupported family", "--port 99999", "--port http", "--scheduler-port -1",
         "--log-level loud", "devices.json is a list", "devices.json not JSON", "devices.json missing",
         "device without memory", "status of nobody"]


@pytest.mark.parametrize("case", CASES)
def test_a_start_up_mistake_is_one_line_and_its_exit_code(case: str, model_dir: Path, tmp_path: Path) -> None:
    args, code, message = _cases(model_dir, tmp_path)[case]
    done, took_s = potluck(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert took_s < 10, took_s


@pytest.mark.parametrize("what", ["HTTP", "scheduler"])
def test_a_port_in_use_is_one_line_and_exit_code_5(what: str, model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        option = ["--port", port] if what == "HTTP" else ["--port", str(free_port()), "--scheduler-port", port]
        done, took_s = potluck("serve", "--model", str(model_dir), "--local-workers", "1", "--no-profile", *option)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == ExitCode.ADDRESS_IN_USE, done.stderr
    assert len(lines) == 1 and f"127.0.0.1:{port} is already in use" in lines[0], done.stderr
    assert took_s < 10, took_s


def test_debug_log_level_shows_the_traceback_of_an_unexpected_error(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA_70B_CONFIG, "num_hidden_layers": 0}))
    (tmp_path / "d.json").write_text(json.dumps({"devices": [{"id": "a", "memory_bytes": "1TB", "flops_per_s": 1e12,
                                                              "memory_bandwidth_bytes_per_s": 1e11}]}))
    quiet, _ = potluck("plan", "--model", str(folder), "--devices", str(tmp_path / "d.json"))
    assert quiet.returncode in (ExitCode.FAILED, ExitCode.USAGE) and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    loud, _ = potluck("--log-level", "debug", "plan", "--model", str(folder), "--devices", str(tmp_path / "d.json"))
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.slow
def test_serve_exits_when_its_only_worker_dies_while_starting(model_dir: Path) -> None:
    """`--device cuda` on CPU-only torch: the worker dies; serve says why in one line and exits 6."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    done, took_s = potluck("serve", "--model", str(model_dir), "--local-workers", "1", "--no-profile",
                           "--device", "cuda", "--port", str(free_port()), timeout_s=120)
    assert done.returncode == ExitCode.WORKERS_FAILED, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("potluck: the local worker failed to start: local-0:") and "CUDA" in last, done.stderr
    assert "Traceback" not in done.stderr


def test_plan_answers_for_a_70b_config_alone_on_the_example_devices(tmp_path: Path) -> None:
    folder = _config_only(tmp_path)
    done, took_s = potluck("plan", "--model", str(folder), "--devices", str(ROOT / "examples" / "devices.json"), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["model_sizes_from"] == "config.json alone (bfloat16)"
    ranges = sorted(plan["ranges"].values())
    assert ranges[0][0] == 0 and ranges[-1][1] == 80
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # one pipeline, every layer once
    assert set(plan["ranges"]) == {"gaming-pc", "mac-studio", "old-server"}
    layer_bytes = 2 * (8192 * 8192 * 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 2 * 2 * 8192  # bf16 q,o,k,v,mlp + norms
    total = 0
    for device, memory in plan["memory"].items():
        start, end = plan["ranges"][device]
        assert memory["weight_bytes"] >= (end - start) * layer_bytes
        assert memory["weight_bytes"] + memory["kv_reserve_bytes"] <= memory["memory_bytes"]
        total += memory["weight_bytes"]
    assert total == 80 * layer_bytes + 2 * 128256 * 8192 * 2 + 2 * 8192
    assert plan["throughput_tokens_per_s"] > 0
    # the answer comes long before the default 10 s limit: the solver stops once its best meets its
    # bound, and 1 Gbit/s links that even the bound's flow cannot fill do not send it down the slow path
    assert plan["solve_time_s"] < 5 and took_s < 10, (plan["solve_time_s"], took_s)
    table, _ = potluck("plan", "--model", str(folder), "--devices", str(ROOT / "examples" / "devices.json"), "--quantization", "int4")
    assert table.returncode == 0 and "weights GB" in table.stdout and "int4 layers" in table.stdout, table.stderr


def test_config_sizes_match_the_safetensors_headers(tmp_path: Path) -> None:
    from workers.config_sizes import facts_from_config
    from workers.model_config import ModelConfig
    from workers.model_facts import read_model_facts

    for family in ("llama", "qwen2", "qwen3"):
        folder = make_checkpoint(tmp_path / family, family, num_hidden_layers=2)
        assert facts_from_config(ModelConfig.from_hf(folder)) == read_model_facts(folder), family


@pytest.mark.slow
def test_profile_json_is_a_devices_file_plan_takes(model_dir: Path, tmp_path: Path) -> None:
    done, _ = potluck("profile", "--json", "--device", "cpu", "--model", str(model_dir), "--id", "this-box")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "devices.json"
    path.write_text(done.stdout)
    entry = json.loads(done.stdout)["devices"][0]
    assert entry["id"] == "this-box" and entry["decode_layer_time_s"] and entry["memory_bytes"] > 0
    plan, _ = potluck("plan", "--model", str(model_dir), "--devices", str(path), "--json", "--time-limit", "1")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["ranges"] == {"this-box": [0, 2]}
