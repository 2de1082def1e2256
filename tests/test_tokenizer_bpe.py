"""BPETokenizer: merges equal a naive reference trainer (the test's own, independent of bpe.py);
the library's naive trainer equals its fast one; roundtrip; special tokens; save/load."""

from __future__ import annotations

import random

import pytest
import regex
from hypothesis import given, settings

from minillm.data.sources import shakespeare_files
from minillm.tokenizer import load_tokenizer
from minillm.tokenizer.bpe import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    BPETokenizer,
    count_chunks,
    learn_merges,
    learn_merges_naive,
)
from tests.conftest import random_unicode, unicode_text


def naive_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_train(texts: list[str], pattern: str, n_merges: int) -> list[tuple[int, int]]:
    """The textbook trainer: every chunk kept (no dedup), all pairs recounted after each merge."""
    chunks = [list(c.encode("utf-8")) for t in texts for c in regex.findall(pattern, t)]
    merges = []
    for k in range(n_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent, then smallest pair
        chunks = [naive_merge(ids, best, 256 + k) for ids in chunks]
        merges.append(best)
    return merges


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in shakespeare_files()[:3])


def n_merges_for(vocab_size: int) -> int:
    return vocab_size - 256 - 6  # 6 special tokens


@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN])
def test_merges_match_naive_on_english(shakespeare_text: str, pattern: str) -> None:
    text = shakespeare_text[:12000]
    tok = BPETokenizer(pattern).train(text, 400)
    assert tok.merges == naive_train([text], pattern, n_merges_for(400))


def test_merges_match_naive_on_random_unicode() -> None:
    text = random_unicode(2500, seed=1)
    tok = BPETokenizer().train(text, 350)
    assert tok.merges == naive_train([text], GPT4_SPLIT_PATTERN, n_merges_for(350))


def test_merges_match_naive_on_repetitive_text_and_ties() -> None:
    # Runs of one byte (overlapping pairs), digits, code, and many equal counts (tie rule).
    text = "aaaaaaa bbbb aaa ab ba abab 1234567890 12 123 def f(x): return x**2\n\n\tzz zz zy yz " * 7
    docs = [text, "cd dc", "xyzzy", "q"]
    tok = BPETokenizer().train(iter(docs), 300)  # an iterator: input is streamed
    assert tok.merges == naive_train(docs, GPT4_SPLIT_PATTERN, n_merges_for(300))


@pytest.mark.parametrize(
    "texts, pattern, n_merges",
    [
        (["aaaaaaa bbbb aaa ab ba abab 12345 zz zz zy yz\n\n\t" * 5, "cd dc", "xyzzy", "q"],
         GPT4_SPLIT_PATTERN, 60),
        ([random_unicode(1500, seed=2)], GPT4_SPLIT_PATTERN, 80),
        (["dcba", "abcd abcd"], GPT2_SPLIT_PATTERN, 10),  # runs out of pairs before 10 merges
    ],
)
def test_library_naive_trainer_equals_the_fast_one(texts: list[str], pattern: str, n_merges: int) -> None:
    counts = count_chunks(texts, pattern)
    naive = learn_merges_naive(counts, n_merges)
    assert naive == learn_merges(counts, n_merges)
    assert naive == naive_train(texts, pattern, n_merges)  # and both equal the test's own oracle


def test_shakespeare_naive_trainer_equals_the_fast_one(shakespeare_text: str) -> None:
    counts = count_chunks([shakespeare_text[:20000]], GPT4_SPLIT_PATTERN)
    assert learn_merges_naive(counts, 120) == learn_merges(counts, 120)


def test_tie_breaks_on_smallest_pair() -> None:
    tok = BPETokenizer().train("dcba", 256 + 6 + 1)  # pairs (d,c), (c,b), (b,a) all count 1
    assert tok.merges == [(ord("b"), ord("a"))]


def test_merges_do_not_depend_on_document_order(shakespeare_text: str) -> None:
    docs = shakespeare_text[:20000].split("\n\n")
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert BPETokenizer().train(docs, 500).merges == BPETokenizer().train(shuffled, 500).merges


def test_training_stops_when_no_pairs_are_left() -> None:
    tok = BPETokenizer().train("ab", 1000)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 256 + 1 + 6


def test_vocab_size_counts_bytes_merges_and_specials(shakespeare_text: str) -> None:
    tok = BPETokenizer().train(shakespeare_text, 512)
    assert tok.vocab_size == 512 and len(tok.merges) == 512 - 256 - 6
    assert max(tok.encode(shakespeare_text[:5000], allowed_special="all") + [tok.eos_id]) < 512


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    texts = [random_unicode(3000, seed=2), "Hello world, hello tokenizer! 😀😀 中文中文"]
    return BPETokenizer().train(texts, 600)


@settings(max_examples=1000, deadline=None)
@given(text=unicode_text)
def test_roundtrip_any_text(tok: BPETokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_text_unless_allowed(tok: BPETokenizer) -> None:
    text = "<|user|>hi<|eos|>"
    plain = tok.encode(text)
    assert tok.special_id("user") not in plain and tok.eos_id not in plain
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allowed_special="all")
    assert allowed[0] == tok.special_id("<|user|>") and allowed[-1] == tok.eos_id
    assert allowed.count(tok.eos_id) == 1 and tok.decode(allowed) == text
    only_eos = tok.encode(text, allowed_special={"eos"})
    assert only_eos[-1] == tok.eos_id and tok.special_id("user") not in only_eos
    assert only_eos[:-1] == tok.encode("<|user|>hi")


def test_special_ids_follow_the_merges(tok: BPETokenizer) -> None:
    ids = sorted(tok.special_tokens.values())
    assert ids == list(range(256 + len(tok.merges), tok.vocab_size))
    assert {tok.special_id("bos"), tok.eos_id, tok.special_id("pad")} <= set(ids)


def test_save_load_roundtrip(tok: BPETokenizer, tmp_path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    for loaded in (BPETokenizer.load(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path)):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
        text = random_unicode(500, seed=3) + "<|eos|>"
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_gpt2_pattern_by_name() -> None:
    assert BPETokenizer("gpt2").pattern == GPT2_SPLIT_PATTERN
    assert BPETokenizer().pattern == GPT4_SPLIT_PATTERN


def test_bad_inputs_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        BPETokenizer().train("abc", 100)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path / "x.json")
