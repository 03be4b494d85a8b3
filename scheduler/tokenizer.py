"""The model's tokenizer and chat template, without importing transformers at runtime.

Parts:
- `Tokenizer`: `from_model_dir(model_dir)` reads `tokenizer.json` (the `tokenizers` library),
  `tokenizer_config.json` (bos / eos / special tokens, `added_tokens_decoder`, `add_bos_token`
  when tokenizer.json has no post-processor,
  chat template), `chat_template.jinja`, and the eos ids of `generation_config.json` / `config.json`.
  `encode`, `decode`, `token_bytes`, `apply_chat_template`. `from_gguf(path)` (also reached
  through `from_model_dir` with a `.gguf` path) builds it from the file's metadata.
- `ChatTemplateError`: no chat template, or the template refused the conversation (HTTP 400).
- `render_chat_template`: renders a Jinja chat template the way transformers does (sandboxed,
  `trim_blocks` / `lstrip_blocks`, `raise_exception`, `strftime_now`, a non-escaping `tojson`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from scheduler.errors import InvalidRequestError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

LONG_TEXT_CHARS = 4096  # texts longer than this are encoded without holding the GIL


class ChatTemplateError(InvalidRequestError):
    """The model has no chat template, or its template rejected the messages."""

    code = "chat_template_error"


def _token_content(value: Any) -> str | None:
    """Special tokens are strings or serialised AddedTokens ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable unicode map, inverted (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)\b")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], **variables: Any) -> str:
    """Render `template` with `messages` and extra variables; template errors -> ChatTemplateError."""
    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None
    try:
        return compiled.render(messages=list(messages), **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


class Tokenizer:
    """A Hugging Face tokenizer read from a model directory, behaving like transformers' fast one."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        eos_ids = [self.eos_token_id] if self.eos_token_id is not None else []
        eos_ids += [i for i in extra_eos_token_ids if i not in eos_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        self._decoder_is_byte_level = type(backend.decoder).__name__ == "ByteLevel"

    # ----------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """A GGUF's tokenizer, chat template and eos / eot ids (scheduler/gguf_tokenizer.py)."""
        from scheduler.gguf_tokenizer import build_backend, gguf_special_tokens, read_gguf_tokenizer_fields

        fields = read_gguf_tokenizer_fields(path)
        eot = fields.get("tokenizer.ggml.eot_token_id")
        return cls(
            build_backend(fields),
            special_tokens=gguf_special_tokens(fields),
            chat_template=fields.get("tokenizer.chat_template"),
            extra_eos_token_ids=() if eot is None else (int(eot),),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        if str(model_dir).endswith(".gguf"):
            return cls.from_gguf(model_dir)
        root = Path(model_dir)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found (only fast tokenizers are supported)")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(root / "tokenizer_config.json")

        special: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                special[key] = content

        to_add: list[AddedToken] = []
        for entry in (config.get("added_tokens_decoder") or {}).values():
            content = _token_content(entry)
            if content is not None and isinstance(entry, Mapping) and entry.get("special"):
                to_add.append(AddedToken(
                    content, single_word=bool(entry.get("single_word", False)), lstrip=bool(entry.get("lstrip", False)),
                    rstrip=bool(entry.get("rstrip", False)), normalized=bool(entry.get("normalized", False)),
                    special=True))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra_values = extra.values() if isinstance(extra, Mapping) else extra
        for token in [*special.values(), *(_token_content(t) for t in extra_values)]:
            if token is not None and token not in {t.content for t in to_add}:
                to_add.append(AddedToken(token, special=True, normalized=False))
        if to_add:
            backend.add_special_tokens(to_add)

        # tokenizer.json's post-processor adds bos/eos (transformers 5 ignores add_bos_token then); an
        # older export without one relies on add_bos_token / add_eos_token (transformers 4 behaviour).
        add_bos, add_eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
        if backend.post_processor is None and (add_bos or add_eos):
            bos, eos = special.get("bos_token"), special.get("eos_token")
            add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
            add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
            single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
            pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
            pairs = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)

        chat_template: str | None = None
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        else:
            raw = config.get("chat_template") or _read_json(root / "chat_template.json").get("chat_template")
            if isinstance(raw, list):  # named templates: [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
                raw = named.get("default")
            chat_template = raw if isinstance(raw, str) else None

        generation = _read_json(root / "generation_config.json")
        eos_ids = _ids(generation.get("eos_token_id")) or _ids(_read_json(root / "config.json").get("eos_token_id"))
        return cls(
            backend,
            special_tokens=special,
            chat_template=chat_template,
            extra_eos_token_ids=eos_ids,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ----------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def backend(self) -> BackendTokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (valid ids are 0 .. vocab_size - 1)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def all_special_ids(self) -> frozenset[int]:
        decoder = self._backend.get_added_tokens_decoder()
        return frozenset(i for i, token in decoder.items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ----------------------------------------------------------------------------------------
    # Text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; InvalidRequestError for text that is not Unicode (a lone surrogate)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"the text is not valid Unicode: {exc.reason} at character {exc.start}"
            ) from None
        if len(text) > LONG_TEXT_CHARS:  # encode_batch releases the GIL: other threads (the event loop) run meanwhile
            return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a byte-level token may be part of a character)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self.all_special_ids:
            return token.encode("utf-8")
        if self._decoder_is_byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in token):
                return bytes(table[ch] for ch in token)
        match = _BYTE_FALLBACK.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """A readable string for one token (logprobs): its bytes as UTF-8, broken bytes as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ----------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render the conversation as the model's prompt text (encode it with add_special_tokens=False)."""
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer_config.json has no 'chat_template' and there is no "
                "chat_template.jinja); use /v1/completions with a raw prompt instead")
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        iterates_parts = bool(_ITERATES_CONTENT.search(self.chat_template))
        plain = [self._plain_message(m, iterates_parts) for m in messages]
        context: dict[str, Any] = {**self.special_tokens, **variables}
        return render_chat_template(self.chat_template, plain, add_generation_prompt=add_generation_prompt, **context)

    @staticmethod
    def _plain_message(message: Mapping[str, Any], keep_parts: bool) -> dict[str, Any]:
        """Drop None values (but `content`, as transformers passes it); content parts become one string unless the template iterates them."""
        out = {k: v for k, v in message.items() if v is not None or k == "content"}  # content: None stays (tool calls)
        content = out.get("content")
        if isinstance(content, list) and not keep_parts:
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatTemplateError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            out["content"] = "\n".join(texts)
        return out


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era spacing fixes)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
