"""Test support: train a tiny byte-level BPE tokenizer and write it as a Hugging Face model dir.

Parts:
- `CORPUS`: a few paragraphs, non-ASCII included.
- `CHATML_TEMPLATE`, `LLAMA3_TEMPLATE`: realistic chat templates (system branch, bos, helpers).
- `write_tokenizer_dir(path, flavour)`: tokenizer.json + tokenizer_config.json (+ generation or
  model config) for flavour "chatml" (no bos, eos ids from generation_config.json as a list) or
  "llama3" (bos added by tokenizer.json's post-processor, eos id from config.json as an int) or "plain" (no template).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "héllo wörld 日本語 🙂 — naïve café, Straße, смешанный текст, ελληνικά, 中文字符测试。",
    "Pools of mismatched machines serve one model: each worker runs a range of layers and "
    "streams hidden states to the next one over ZeroMQ, while the scheduler tokenises prompts.",
    "Once upon a time, in a land far away, a small robot learned to count: one, two, three, "
    "four, five. It said \"hello\" to everyone it met, and 'goodbye' when they left.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n{\"json\": [1, 2, 3], \"ok\": true}",
    "Emoji and symbols: 🚀🔥✨ ≤ ≥ ≠ ∑ ∫ € £ ¥ — tabs\tand\nnewlines.",
]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported after the system message') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n" }}
{{- "Meta: " + {"tools": none, "lang": "日本語"}|tojson + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


@lru_cache(maxsize=1)
def trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok.to_str()


def write_tokenizer_dir(path: Path, flavour: str = "chatml") -> Path:
    """Write a model dir holding the trained tokenizer; returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(trained_tokenizer_json())
    if flavour == "llama3":  # like Meta's tokenizer.json: the post-processor prepends bos
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)])
    (path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                    "clean_up_tokenization_spaces": False, "model_max_length": 256}
    if flavour == "chatml":
        config |= {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}
        gen = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
        (path / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    elif flavour == "llama3":
        config |= {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}
        (path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
        (path / "config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|endoftext|>")}))
    elif flavour == "plain":
        config |= {"eos_token": "<|endoftext|>"}
    else:
        raise ValueError(flavour)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path
