"""Start-up mistakes as one line and a distinct exit code, found before anything starts.

Parts:
- `ExitCode`: the exit status of each kind of mistake (also listed in README.md).
- `StartupError(message, exit_code)`: what the CLI prints as `potluck: <message>` and exits with.
- `port_number(text)` / `port_or_zero(text)`: argparse types for TCP ports (1..65535, 0 allowed).
- `check_model_dir(model_dir, serving)`: config.json there, readable and of a supported family;
  when serving also tokenizer.json and weights whose files are complete (a download that stopped
  half-way leaves a safetensors file shorter than its header says).
- `check_port_free(host, port, what)`: nothing listens on the port already.
- `OneLineParser`: an argparse parser whose usage errors are one line (`potluck: ...`).

Nothing here imports torch: the checks read JSON and file sizes only.
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import socket
import struct
import sys
from pathlib import Path
from typing import NoReturn


class ExitCode(enum.IntEnum):
    FAILED = 1  # the command ran and could not do it (a model that does not fit, a server error)
    USAGE = 2  # a bad option or option value
    MODEL_DIR = 3  # the model directory cannot be served or planned
    DEVICES_FILE = 4  # the devices file cannot be read
    ADDRESS_IN_USE = 5  # a port is taken or an address cannot be bound
    WORKERS_FAILED = 6  # every local worker died while starting
    UNREACHABLE = 7  # `potluck status`: no potluck server answers at the URL
    INTERRUPTED = 130


class StartupError(Exception):
    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _port(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number ({lowest}..65535)")
    return value


def port_number(text: str) -> int:
    return _port(text, 1)


def port_or_zero(text: str) -> int:
    """A port, or 0 for a free one."""
    return _port(text, 0)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as `potluck <command>: <message> (see --help)` on one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(ExitCode.USAGE)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded (missing, header unreadable, shorter than its
    header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is empty or cut short (re-download it)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path} is cut short: its header alone needs {length} bytes (re-download it)"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return f"{path} is missing (re-download the model)"
    except (OSError, ValueError) as exc:
        return f"{path} is not a readable safetensors file ({exc})"
    header.pop("__metadata__", None)
    try:
        end = max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path} has a malformed safetensors header"
    if 8 + length + end > size:
        return f"{path} is cut short: {size} of {8 + length + end} bytes (an interrupted download? re-download it)"
    return None


def _weights_problem(model_dir: Path) -> str | None:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index} is not a safetensors index ({exc})"
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(model_dir.glob("*.gguf")):
        return None  # GGUF checkpoints are checked by their loader (branch `gguf`)
    else:
        return (f"{model_dir} holds no weights (no model.safetensors or model.safetensors.index.json); "
                "`potluck plan` works from config.json alone, serving needs the weights")
    for name in files:
        problem = _safetensors_problem(model_dir / name)
        if problem:
            return problem
    return None


def check_model_dir(model_dir: Path, *, serving: bool) -> None:
    """Raise `StartupError` (exit code MODEL_DIR) when `model_dir` cannot be planned, or with
    `serving`, cannot be served. File checks first (JSON and sizes only), the config's family
    last (it loads torch)."""
    config_file = model_dir / "config.json"
    if not model_dir.is_dir():
        raise StartupError(f"{model_dir} is not a directory (--model takes a Hugging Face model directory with config.json)", ExitCode.MODEL_DIR)
    if not config_file.is_file():
        raise StartupError(f"{model_dir} is not a Hugging Face model directory (no config.json)", ExitCode.MODEL_DIR)
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"{config_file} is not valid JSON ({exc})", ExitCode.MODEL_DIR) from None
    if not isinstance(raw, dict):
        raise StartupError(f"{config_file} holds a JSON {type(raw).__name__}, not a model config", ExitCode.MODEL_DIR)
    if serving:
        problem = _weights_problem(model_dir)
        if problem:
            raise StartupError(problem, ExitCode.MODEL_DIR)
        if not (model_dir / "tokenizer.json").is_file():
            raise StartupError(f"{model_dir} has no tokenizer.json (download it with the model; only fast tokenizers are supported)",
                               ExitCode.MODEL_DIR)
    from workers.model_config import ModelConfig  # torch: only once the files are there

    try:
        ModelConfig.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise StartupError(f"{config_file} lacks a field potluck needs ({exc})", ExitCode.MODEL_DIR) from None
    except ValueError as exc:  # UnsupportedModelError and bad values
        raise StartupError(f"{config_file}: {exc}", ExitCode.MODEL_DIR) from None


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise `StartupError` (ADDRESS_IN_USE) when `host:port` cannot be bound now (port 0: free)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and ZeroMQ bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"{what} {host}:{port} is already in use (another potluck? pick another with {'--port' if what == 'HTTP port' else '--scheduler-port'})",
                                   ExitCode.ADDRESS_IN_USE) from None
            raise StartupError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror or exc}", ExitCode.ADDRESS_IN_USE) from None
