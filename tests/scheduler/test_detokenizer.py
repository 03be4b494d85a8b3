"""IncrementalDetokenizer: UTF-8 safety, concatenation invariant, stop strings."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.tokenizer import Tokenizer
from tests.support.tiny_tokenizer import write_tokenizer_dir

_BYTE_CHARS = pre_tokenizers.ByteLevel.alphabet()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_model_dir(write_tokenizer_dir(tmp_path_factory.mktemp("tok"), "chatml"))


def byte_tokens(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet is in every byte-level BPE vocab)."""
    table = {b: c for c, b in __import__("scheduler.tokenizer", fromlist=["_byte_decoder"])._byte_decoder().items()}
    return [tok.token_to_id(table[b]) for b in text.encode("utf-8")]


def run(det: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    deltas, stopped = [], False
    for i in ids:
        step = det.add(i)
        deltas.append(step.text)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(det.flush())
    return deltas, stopped


def test_multibyte_characters_split_across_tokens(tok: Tokenizer) -> None:
    ids = byte_tokens(tok, "a🙂日")
    det = IncrementalDetokenizer(tok, tok.encode("hi"), (), True)
    texts = [det.add(i).text for i in ids]
    assert texts == ["a", "", "", "", "🙂", "", "", "日"]
    assert det.flush() == ""
    assert all("\ufffd" not in t for t in texts)


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, [], (), True)
    ids = byte_tokens(tok, "é")[:1]
    assert det.add(ids[0]).text == ""
    assert det.flush() == tok.decode(ids) == "\ufffd"


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = byte_tokens(tok, "x日本")
    det = IncrementalDetokenizer(tok, ids[:2], (), True)  # prompt: "x" + first byte of 日
    deltas, _ = run(det, ids[2:])
    assert "".join(deltas) == tok.decode(ids[2:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab cé日本🙂\n.")) | st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=40),
       byte_level=st.booleans(), prompt=st.text(max_size=10))
def test_concatenated_deltas_equal_decode(tok: Tokenizer, text: str, byte_level: bool, prompt: str) -> None:
    ids = byte_tokens(tok, text) if byte_level else tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode(prompt), (), True)
    deltas, stopped = run(det, ids)
    assert not stopped
    assert "".join(deltas) == tok.decode(ids) == text
    assert all(not d.endswith("\ufffd") for d in deltas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("abcST é🙂")), max_size=30),
       stops=st.lists(st.text(alphabet=st.sampled_from(list("abcST é🙂")), min_size=1, max_size=4), max_size=3),
       byte_level=st.booleans())
def test_stop_strings_match_reference(tok: Tokenizer, text: str, stops: list[str], byte_level: bool) -> None:
    ids = byte_tokens(tok, text) if byte_level else tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], tuple(stops), True)
    deltas, stopped = run(det, ids)
    expected, hits, k = text, [], len(ids)  # generation ends at the first token after which a stop is in the text
    for k in range(1, len(ids) + 1):
        so_far = tok.decode(ids[:k])
        hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if hits:
            expected = so_far[: min(hits)]
            break
    assert "".join(deltas) == expected == det.output_text
    assert stopped == bool(hits)
    assert det.num_generated_tokens == k


def test_stop_string_spanning_tokens_is_held_back(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, [], ("world!",), True)
    steps = [det.add(i) for i in byte_tokens(tok, "hello wor")]
    assert "".join(s.text for s in steps) == "hello "  # "wor" could start "world!"
    assert [det.add(i).text for i in byte_tokens(tok, "ld")] == ["", ""]
    step = det.add(byte_tokens(tok, "?")[0])
    assert step == type(step)("world?", False)
    for i in byte_tokens(tok, " world!"):
        step = det.add(i)
    assert step.stopped and det.output_text == "hello world? "
    assert det.add(byte_tokens(tok, "x")[0]).stopped and det.flush() == ""


def test_held_back_text_is_released_by_flush(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, [], ("STOP",), True)
    texts = [det.add(i).text for i in byte_tokens(tok, "go ST")]
    assert "".join(texts) == "go "
    assert det.flush() == "ST"
    assert det.output_text == "go ST"


def test_stop_at_the_very_first_token(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    first = tok.decode(ids[:1])
    det = IncrementalDetokenizer(tok, tok.encode("prompt"), (first,), True)
    step = det.add(ids[0])
    assert step.text == "" and step.stopped
    assert det.output_text == ""


def test_earliest_stop_wins_and_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], ("four", "two"), True)
    deltas, stopped = run(det, ids)
    assert stopped and "".join(deltas) == "one "
    eos = tok.token_to_id("<|im_end|>")
    for skip, expected in ((True, "hi"), (False, "hi<|im_end|>")):
        det = IncrementalDetokenizer(tok, [], (), skip)
        deltas, _ = run(det, [*tok.encode("hi", add_special_tokens=False), eos])
        assert "".join(deltas) == expected
