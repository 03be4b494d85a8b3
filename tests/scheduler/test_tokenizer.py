"""Tokenizer tests against transformers' AutoTokenizer on a tokenizer trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from scheduler.tokenizer import ChatTemplateError, Tokenizer
from tests.support.tiny_tokenizer import CORPUS, write_tokenizer_dir

TEXTS = [
    *CORPUS,
    "héllo wörld 日本語 🙂",
    "",
    "  leading and trailing  ",
    "<|im_start|>user\nhi<|im_end|> and <|endoftext|> inline",
    "unseen: ☃ 🦀 𝄞 ok",
]

CONVERSATIONS = [
    [{"role": "user", "content": "héllo wörld 日本語 🙂"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  And 3+3?  "}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object, str]:
    path = write_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)
    return Tokenizer.from_model_dir(path), AutoTokenizer.from_pretrained(str(path)), request.param


def test_encode_decode_match_transformers(pair: tuple[Tokenizer, object, str]) -> None:
    ours, hf, _ = pair
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_round_trip_non_ascii(pair: tuple[Tokenizer, object, str]) -> None:
    ours, _, _ = pair
    text = "héllo wörld 日本語 🙂"
    assert ours.decode(ours.encode(text)) == text
    assert b"".join(ours.token_bytes(i) for i in ours.encode(text, add_special_tokens=False)) == text.encode()


def test_special_tokens_and_eos_ids(pair: tuple[Tokenizer, object, str]) -> None:
    ours, hf, flavour = pair
    assert ours.eos_token == hf.eos_token and ours.eos_token_id == hf.eos_token_id
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert set(hf.all_special_ids) <= ours.all_special_ids
    endoftext = ours.token_to_id("<|endoftext|>")
    if flavour == "chatml":  # generation_config.json: a list
        assert ours.eos_token_ids == (ours.token_to_id("<|im_end|>"), endoftext)
        assert ours.bos_token_id is None
        assert ours.encode("hi")[0] != ours.token_to_id("<|begin_of_text|>")
    else:  # config.json: an int; add_bos_token
        assert ours.eos_token_ids == (ours.token_to_id("<|eot_id|>"), endoftext)
        assert ours.encode("hi")[0] == ours.bos_token_id
        assert ours.encode("hi", add_special_tokens=False)[0] != ours.bos_token_id


def test_chat_template_matches_transformers(pair: tuple[Tokenizer, object, str]) -> None:
    ours, hf, _ = pair
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    prompt = ours.apply_chat_template(CONVERSATIONS[0])
    assert ours.encode(prompt, add_special_tokens=False) == hf.apply_chat_template(
        CONVERSATIONS[0], tokenize=True, add_generation_prompt=True, return_dict=False)


def test_content_parts_are_joined(pair: tuple[Tokenizer, object, str]) -> None:
    ours, _, _ = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "héllo"}, {"type": "text", "text": "wörld"}]}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template([{"role": "user", "content": "héllo\nwörld"}])
    with pytest.raises(ChatTemplateError, match="text content"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_template_exceptions_become_chat_template_errors(pair: tuple[Tokenizer, object, str]) -> None:
    ours, _, flavour = pair
    bad = [{"role": "tool", "content": "x"}] if flavour == "chatml" else [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template(bad)
    assert info.value.status_code == 400
    assert "alternate" in info.value.message or "roles" in info.value.message


def test_no_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_model_dir(write_tokenizer_dir(tmp_path, "plain"))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.eos_token_ids == (tok.token_to_id("<|endoftext|>"),)


def test_sandbox_blocks_unsafe_templates(tmp_path: Path) -> None:
    tok = Tokenizer.from_model_dir(write_tokenizer_dir(tmp_path, "plain"))
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ strftime_now('%Y') }}#{{ eos_token }}"
    year, eos = tok.apply_chat_template([{"role": "user", "content": "hi"}]).split("#")
    assert year.isdigit() and len(year) == 4 and eos == "<|endoftext|>"
