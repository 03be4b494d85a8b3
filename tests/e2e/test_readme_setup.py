"""README.md's two set-up commands, run as written in a fresh clone (slow: each installs torch and
potluck into a new virtual environment).

Parts:
- `readme_commands()`: the ```bash blocks of the README's "## Set-up" section: the demo command
  (ends in `potluck demo`) and the test command (ends in `pytest`). Read from the file, never
  copied here, so the README cannot drift from what works.
- `clean_clone(tmp)`: `git clone` of this checkout's HEAD.
- `externally_managed_python(tmp)`: a Python whose stdlib directory carries an
  `EXTERNALLY-MANAGED` marker, as Debian 12 / Ubuntu 24.04 ship it: a prefix of its own whose
  `lib/python3.X` links to this interpreter's stdlib file by file, with the marker beside them.

How torch's index is handled here: this machine cannot reach download.pytorch.org (the README's
default for a CPU box); its pip configuration offers the same CPU build, `torch-2.13.0+cpu`, as a
local wheel (find-links). The tests set `TORCH_INDEX_URL=https://pypi.org/simple`, the value the
README gives Macs and CUDA boxes, which the command honours; pip then takes the local `+cpu` wheel
(a local version sorts above PyPI's plain 2.13.0) and the command runs unchanged otherwise.
`POTLUCK_PORT` gives the demo a free port. The test command runs with `PYTEST_ADDOPTS` naming one
quick test, so it does not run the whole suite inside the suite.

One fresh install, not two: both commands run in one clone with the `EXTERNALLY-MANAGED` Python
first on the PATH (the demo command makes .venv and installs into it; the test command then adds
the test extra, the example backend and pytest to that .venv and runs pytest). An unmarked Python
is the easier case of the same commands, and it is what CI itself runs: `.ci/run` runs the README's
test command with the system `python3` in a fresh clone before this test can run at all. A second
install of torch with an unmarked Python proved nothing more and cost ~320 s. `PIP_NO_COMPILE`
spares byte-compiling torch's ~10k modules at install (Python compiles what it imports, when it
imports it); every package is still installed by the commands as written, nothing from outside
the venv is visible to it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.served import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCH_INDEX_HERE = "https://pypi.org/simple"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a fresh install of torch and potluck


def readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]
    demo = [b for b in blocks if b.rstrip().endswith("potluck demo")]
    test = [b for b in blocks if "pip install" in b and "pytest" in b.splitlines()[-1]]  # not the fast lane alone
    assert len(demo) == 1 and len(test) == 1, blocks
    return {"demo": demo[0], "test": test[0]}


def clean_clone(tmp: Path) -> Path:
    clone = tmp / "potluck"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    return clone


def externally_managed_python(tmp: Path) -> Path:
    """bin/python3 of a prefix whose stdlib holds EXTERNALLY-MANAGED (and pip, to show it bites)."""
    prefix = tmp / "managed-python"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_path("stdlib"))
    (prefix / "bin").mkdir(parents=True)
    lib = prefix / "lib" / version
    (lib / "site-packages").mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    for shared in Path(sys.base_prefix, "lib").glob("libpython*"):
        (prefix / "lib" / shared.name).symlink_to(shared)
    import pip

    (lib / "site-packages" / "pip").symlink_to(Path(pip.__file__).parent)
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=This Python is managed by the system (test).\n")
    binary = prefix / "bin" / version
    shutil.copy2(Path(sys.base_prefix, "bin", version).resolve(), binary)
    (prefix / "bin" / "python3").symlink_to(version)
    return prefix / "bin" / "python3"


def environment(python_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PYENV_VERSION"))}
    env["TORCH_INDEX_URL"] = TORCH_INDEX_HERE
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_NO_COMPILE"] = "1"   # .pyc files are written on first import instead
    if python_dir is not None:
        env["PATH"] = f"{python_dir}{os.pathsep}{env['PATH']}"
    return env


def run_demo_command(command: str, clone: Path, env: dict[str, str], log_path: Path) -> None:
    """Runs the demo command until it prints its curl line, asks the server once, then stops it."""
    port = free_port()
    env = {**env, "POTLUCK_PORT": str(port)}
    with open(log_path, "w+") as log:
        process = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 1500  # installing torch and potluck into a fresh venv
            while "curl" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(1)
            output = log_path.read_text()
            assert "SmolLM2" in output and f"http://127.0.0.1:{port}/v1" in output  # what it serves and why
            assert (clone / ".venv" / "bin" / "potluck").exists()
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()["data"][0]["id"]
            body = {"model": model, "prompt": "Hello", "max_tokens": 4}
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
        finally:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_readme_commands_work_in_a_fresh_clone_with_an_externally_managed_python(tmp_path: Path) -> None:
    python = externally_managed_python(tmp_path)
    refused = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-deps", "six"], capture_output=True,
                             text=True, timeout=120, env=environment())
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, refused.stderr[-2000:]
    commands = readme_commands()
    clone = clean_clone(tmp_path)
    env = environment(python.parent)
    run_demo_command(commands["demo"], clone, env, tmp_path / "demo.log")
    venv_home = (clone / ".venv" / "pyvenv.cfg").read_text()
    assert str(python.parent) in venv_home  # the venv was made by the marked Python
    quick = "tests/api/test_cli.py::test_help_imports_no_heavy_library"
    done = subprocess.run(["bash", "-c", commands["test"]], cwd=clone, env={**env, "PYTEST_ADDOPTS": quick},
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "1 passed" in done.stdout
    frozen = subprocess.run([str(clone / ".venv/bin/python"), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    assert "torch==2.13.0+cpu" in frozen
    assert "pytest==" in frozen and "potluck-numpy-backend" in frozen.lower().replace("_", "-")  # the test command's own
