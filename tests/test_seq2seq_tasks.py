"""The built-in seq2seq task (reverse the words of a line) and its batches (minillm.data.seq2seq_tasks)."""

import json
from collections import Counter

import numpy as np
import pytest

from minillm.data import seq2seq_tasks as s2s
from minillm.data.tasks import TEST_PLAYS, score


def test_reverse_words_literal():
    assert s2s.reverse_words("Hark, what noise is this?") == "this? is noise what Hark,"
    assert s2s.reverse_words("To be, or not to be") == "be to not or be, To"
    assert s2s.example("A b c")["messages"] == [{"role": "user", "content": "A b c"},
                                                 {"role": "assistant", "content": "c b A"}]


@pytest.fixture(scope="module")
def builtin():
    return {split: s2s.load(s2s.BUILTIN, split) for split in ("train", "test")}


def test_builtin_split_by_play(builtin):
    train_plays = {e["play"] for e in builtin["train"]}
    test_plays = {e["play"] for e in builtin["test"]}
    assert test_plays == set(TEST_PLAYS) and not train_plays & test_plays
    assert len(builtin["train"]) > 5000 and len(builtin["test"]) == 40 * len(TEST_PLAYS)
    sources = [s2s.source_of(e) for split in builtin.values() for e in split]
    assert len(set(sources)) == len(sources)  # each line once: one answer per source


def test_builtin_examples_are_exact(builtin):
    for e in builtin["train"][:500] + builtin["test"]:
        source, answer = s2s.source_of(e), e["answer"]
        assert e["kind"] == "reverse_words" and e["messages"][-1]["content"] == answer
        assert s2s.MIN_LINE <= len(source) <= s2s.MAX_LINE and len(answer) == len(source)
        assert Counter(answer.split()) == Counter(source.split()) and answer.split()[0] == source.split()[-1]
        assert set(source) <= set(s2s.ALPHABET)
    assert score([e["answer"] for e in builtin["test"]], builtin["test"])["exact_match"] == 1.0


def test_builtin_is_deterministic(builtin):
    again = s2s.shakespeare_reverse()  # built anew, not the cached copy
    assert again["test"] == builtin["test"] and again["train"][:50] == builtin["train"][:50]


def test_load_errors_and_jsonl(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        s2s.load(s2s.BUILTIN, "val")
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"messages": s2s.example("one two three")["messages"]}) + "\n")
    [loaded] = s2s.load(str(tmp_path), "test")
    assert s2s.source_of(loaded) == "one two three" and loaded["answer"] == "three two one"


def test_task_tokenizer():
    tok = s2s.task_tokenizer()
    assert tok.vocab_size == len(s2s.ALPHABET) + len(tok.special_tokens)
    assert tok.decode(tok.encode("Hark, what noise?")) == "Hark, what noise?"
    bigger = s2s.task_tokenizer([s2s.example("caf\u00e9 au lait")])  # a JSONL task with another character
    assert bigger.vocab_size == tok.vocab_size + 1
    with pytest.raises(ValueError, match="max_seq_len=5"):
        s2s.encode_pairs(tok, [s2s.example("one two three")], 5)


def test_batches():
    tok = s2s.task_tokenizer()
    specials = {name: tok.special_id(name) for name in ("bos", "eos", "pad")}
    pairs = s2s.encode_pairs(tok, [s2s.example(line) for line in ("ab cd", "e f g h", "xyz w")], 16)
    batches = s2s.Seq2SeqBatches(pairs, 4, specials, seed=7)
    source, mask, target_in, target_out = batches.next_batch()
    for row in range(4):
        n = int(mask[row].sum())
        (s, a), = [p for p in pairs if p[0] == source[row, :n].tolist()]
        assert (source[row, n:] == specials["pad"]).all() and mask[row, :n].all()
        assert target_in[row, : len(a) + 1].tolist() == [specials["bos"], *a]
        assert target_out[row, : len(a) + 1].tolist() == [*a, specials["eos"]]
        assert (target_out[row, len(a) + 1:] == s2s.IGNORE_INDEX).all()
    state = batches.state_dict()
    following = batches.next_batch()
    resumed = s2s.Seq2SeqBatches(pairs, 4, specials, seed=0)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.next_batch(), following))
    # two ranks take the two halves of the one global batch
    whole = s2s.Seq2SeqBatches(pairs, 4, specials, seed=3).next_batch()[0]
    halves = [s2s.Seq2SeqBatches(pairs, 2, specials, seed=3, rank=r, world=2).next_batch()[0] for r in (0, 1)]
    assert sorted(map(tuple, whole.tolist())) == sorted(
        tuple(row) + (specials["pad"],) * (whole.shape[1] - len(row)) for h in halves for row in h.tolist())
