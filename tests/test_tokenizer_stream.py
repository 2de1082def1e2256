"""StreamDecoder: chunks of ids decode to the same text as one full decode, never a broken char."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.char import CharTokenizer
from tests.conftest import random_unicode, unicode_text

CJK_EMOJI = "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。🙂👨‍👩‍👧👍🏽🇫🇷 한국어 日本語のテキスト 😀😃😄"
# Trained on plain English only, so CJK and emoji stay (mostly) single bytes: every character spans
# several ids, the hard case for a streaming decoder.
bpe = BPETokenizer().train("the cat sat on the mat and the dog ate the hat " * 20, 300)
bpe_cjk = BPETokenizer().train([CJK_EMOJI * 5, random_unicode(1000, seed=4)], 400)


def stream(tok, ids: list[int], cuts: list[int]) -> tuple[str, list[str]]:
    decoder = tok.stream_decoder()
    bounds = sorted({0, len(ids), *[c % (len(ids) + 1) for c in cuts]})
    pieces = [decoder.push(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    pieces.append(decoder.flush())
    return "".join(pieces), pieces


def test_one_token_at_a_time_on_cjk_and_emoji() -> None:
    for tok in (bpe, bpe_cjk):
        ids = tok.encode(CJK_EMOJI)
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == CJK_EMOJI == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert len(bpe.encode(CJK_EMOJI)) > len(CJK_EMOJI)  # characters really were split


@settings(max_examples=300, deadline=None)
@given(text=unicode_text, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_chunking_equals_full_decode(text: str, cuts: list[int]) -> None:
    for tok in (bpe, bpe_cjk):
        ids = tok.encode(text)
        assert stream(tok, ids, cuts)[0] == tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, bpe.vocab_size - 1), max_size=30),
       cuts=st.lists(st.integers(0, 100), max_size=5))
def test_invalid_utf8_streams_like_full_decode(ids: list[int], cuts: list[int]) -> None:
    # Arbitrary ids can form invalid UTF-8; streaming must still agree with decode's U+FFFD.
    assert stream(bpe, ids, cuts)[0] == bpe.decode(ids)


def test_char_tokenizer_streams_too() -> None:
    tok = CharTokenizer().train(CJK_EMOJI)
    ids = tok.encode(CJK_EMOJI)
    assert stream(tok, ids, [3, 7, 11])[0] == CJK_EMOJI
