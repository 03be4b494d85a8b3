"""A served tiny checkpoint whose chat template renders tools the Qwen / Hermes way, for agent tests.

Parts:
- `TOOL_TEMPLATE`: a chat template (written here) with a tools block, `<tool_call>` history turns
  and tool results, as Qwen2.5's shows them.
- `make_tool_checkpoint(root)`: a 2-layer random-weight Llama with that template.
- `served_agents(root)`: a context manager: `potluck serve` (2 real worker processes) on it,
  CORS on for https://app.example; yields (ServedModel, model name, checkpoint path).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nCall one as <tool_call>\n{\"name\": NAME, \"arguments\": ARGS}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
)


def make_tool_checkpoint(root: Path) -> Path:
    path = make_checkpoint(root / "agents-llama", "llama", num_hidden_layers=2, seed=11, max_position_embeddings=2048)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def served_agents(root: Path) -> Iterator[tuple[ServedModel, str, Path]]:
    path = make_tool_checkpoint(root)
    served = ServedModel(path, 2, ["--allowed-origins", "https://app.example"], log_path=root / "serve.log")
    try:
        served.wait_ready(path.name)
        yield served, path.name, path
    finally:
        served.stop()
