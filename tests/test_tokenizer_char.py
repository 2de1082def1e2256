"""CharTokenizer: vocabulary from the corpus, roundtrip over its alphabet, unknown characters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.tokenizer import load_tokenizer
from minillm.tokenizer.char import CharTokenizer
from tests.conftest import TRICKY

CORPUS = "First Citizen:\r\nBefore we proceed any further, hear me speak.\n\t" + "".join(TRICKY) + "<|>"
tok = CharTokenizer().train(iter([CORPUS, "中文 🙂 e\u0301"]))


@settings(max_examples=1000, deadline=None)
@given(text=st.text(st.sampled_from(sorted(set(CORPUS + "中文 🙂 e\u0301")))))
def test_roundtrip_over_its_alphabet(text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_ids_are_sorted_characters_then_specials() -> None:
    assert tok.chars == sorted(set(CORPUS + "中文 🙂 e\u0301"))
    assert tok.encode(tok.chars[0] + tok.chars[-1]) == [0, len(tok.chars) - 1]
    assert sorted(tok.special_tokens.values()) == list(range(len(tok.chars), tok.vocab_size))


def test_special_tokens_are_text_unless_allowed() -> None:
    text = "hear<|eos|>"
    assert tok.eos_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode(text, allowed_special="all") == tok.encode("hear") + [tok.eos_id]


def test_unknown_character_is_a_clear_error_or_unk() -> None:
    with pytest.raises(ValueError, match=r"'Z' \(U\+005A\) at position 1"):
        tok.encode("hZ")
    with_unk = CharTokenizer(unk=True).train("ab")
    assert with_unk.encode("aZb") == [0, with_unk.unk_id, 1]
    assert with_unk.decode(with_unk.encode("aZb")) == "a\ufffdb"


def test_save_load_roundtrip(tmp_path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, CharTokenizer) and loaded.to_dict() == tok.to_dict()
    assert CharTokenizer.load(tmp_path / "tokenizer.json").encode(CORPUS) == tok.encode(CORPUS)


def test_vocab_size_too_small_is_an_error() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        CharTokenizer().train("abc", vocab_size=5)
