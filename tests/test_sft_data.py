"""SFT data: JSONL reading with file:line errors, the over-long policy and its count, label masks
position by position, packing and length-bucketed padding, and batches as a function of (seed, step)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minillm.data.sft import IGNORE_INDEX, SFTBatches, read_records, tokenize
from minillm.tokenizer.char import CharTokenizer


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer().train("abcdefghijklmnopqrstuvwxyz ?!.")


def chat(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))
    def word(longest: int) -> str:
        return "".join(rng.choice(letters, rng.integers(1, longest)))

    return [chat(word(12), word(6)) for _ in range(n)]


# --- reading --------------------------------------------------------------------------------------------
def test_reads_both_shapes(tmp_path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": chat("hi", "ho"), "kind": "greet"}) + "\n\n"
                    + json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    assert read_records(path) == [{"messages": chat("hi", "ho"), "kind": "greet"},
                                  {"messages": chat("a", "b")}]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "x"}', "expected a 'messages' list or 'prompt' and 'completion'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "assistant", "content": ["x"]}]}), "content must be a string"),
    (json.dumps({"prompt": "x", "completion": 5}), "'completion' must be a string"),
    (json.dumps({"messages": []}), "non-empty"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "fine", "completion": "yes"})
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_file(tmp_path) -> None:
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        read_records(tmp_path / "e.jsonl")


# --- tokenizing -----------------------------------------------------------------------------------------
def test_overlong_examples_are_counted(tok) -> None:
    convs = [chat("ab", "cd"), chat("abcdefgh", "ijklmn"), chat("abcdefghijklmnopq", "r")]
    # Lengths: bos + (user, content, eos) + (assistant, content, eos) = 9, 19, 23 ids.
    logged: list[str] = []
    ex = tokenize(tok, convs, block_size=15, overlong="truncate", log=logged.append)
    # The second keeps its first 16 ids; the third would keep no trained id, so it is skipped.
    assert (ex.n_truncated, ex.n_skipped, list(ex.lengths)) == (1, 1, [9, 16])
    assert logged == ["sft: 1 of 3 examples longer than 16 tokens truncated, 1 skipped"]
    ids, trained = ex.example(1)
    assert tok.decode(ids[:12]).endswith("abcdefgh<|eos|><|assistant|>")
    assert trained.tolist() == [False] * 12 + [True] * 4
    ex = tokenize(tok, convs, block_size=15, overlong="skip", log=logged.append)
    assert (ex.n_truncated, ex.n_skipped, list(ex.lengths)) == (0, 2, [9])
    with pytest.raises(ValueError, match="overlong"):
        tokenize(tok, convs, block_size=15, overlong="cut")
    with pytest.raises(ValueError, match="^example 1: character 'Z'"):
        tokenize(tok, [chat("a", "b"), chat("Zebra", "b")], block_size=15)


def test_labels_position_by_position(tok) -> None:
    ex = tokenize(tok, [chat("ab", "cd")], block_size=16)
    x, y = SFTBatches(ex, block_size=16, batch_size=1, pad_id=tok.special_id("pad"), mode="pad").batch(0)
    s = tok.special_id
    c, d = tok.encode("cd")
    ids = [s("bos"), s("user"), *tok.encode("ab"), s("eos"), s("assistant"), c, d, s("eos")]
    pad = s("pad")
    assert x.shape == y.shape == (1, 8) and x.dtype == y.dtype == np.int64
    assert x[0].tolist() == ids[:-1]
    # Targets: user, a, b, eos, assistant (prompt) -> ignored; c, d and the closing eos are learned.
    assert y[0].tolist() == [IGNORE_INDEX] * 5 + [c, d, s("eos")]
    ex2 = tokenize(tok, [chat("ab", "cd"), chat("abcdefghijk", "x")], block_size=24)
    x, y = SFTBatches(ex2, block_size=24, batch_size=2, pad_id=pad, mode="pad", pad_multiple=4).batch(0)
    # The longer example has 17 ids: x is 16 wide (a multiple of 4); the 9-id one is padded.
    short = 0 if x[0, 9] == pad else 1
    assert x.shape == (2, 16) and x[short].tolist() == ids + [pad] * 7
    assert y[short].tolist() == [IGNORE_INDEX] * 5 + [c, d, s("eos")] + [IGNORE_INDEX] * 8


# --- batching -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples(tok):
    return tokenize(tok, conversations(200), block_size=32)


def test_packing_places_every_example_once_per_epoch(examples) -> None:
    batches = SFTBatches(examples, block_size=32, batch_size=4, pad_id=0, mode="pack", seed=3)
    for epoch in range(3):
        rows = batches.epoch_rows(epoch)
        assert sorted(i for row in rows for i in row) == list(range(len(examples)))
        sizes = [int(examples.lengths[row].sum()) for row in rows]
        assert max(sizes) <= 33
        # Greedy: the first example of the next row did not fit in this one.
        assert all(sizes[r] + examples.lengths[rows[r + 1][0]] > 33 for r in range(len(rows) - 1))
    assert batches.epoch_rows(0) != batches.epoch_rows(1)


def test_packed_rows_mask_boundaries(examples, tok) -> None:
    pad = tok.special_id("pad")
    loader = SFTBatches(examples, block_size=32, batch_size=8, pad_id=pad, mode="pack", seed=1)
    x, y = loader.batch(2)
    assert x.shape == (8, 32)
    bos = tok.special_id("bos")
    # Where x holds a token followed by a bos (the next example), nothing is learned.
    nxt = np.concatenate([x[:, 1:], np.full((8, 1), -1)], axis=1)
    assert (y[nxt == bos] == IGNORE_INDEX).all() and (y[x == pad] == IGNORE_INDEX).all()
    # Every learned target is the next input id.
    learned = y[:, :-1] != IGNORE_INDEX
    assert (y[:, :-1][learned] == x[:, 1:][learned]).all()
    # Whole examples are packed, so the learned targets are all trained ids of the rows' examples.
    rows = loader.epoch_rows(0)[16:24]
    assert (y != IGNORE_INDEX).sum() == sum(int(examples.example(i)[1].sum()) for row in rows for i in row)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_batches_are_a_function_of_seed_and_step(examples, mode) -> None:
    def loader(seed=0):
        return SFTBatches(examples, block_size=32, batch_size=6, pad_id=0, mode=mode, seed=seed)

    run = loader()
    straight = [run.next_batch() for _ in range(120)]  # several epochs
    resumed = loader(seed=5)
    resumed.load_state_dict({"seed": 0, "step": 77})
    for step in range(77, 120):
        x, y = resumed.next_batch()
        assert np.array_equal(x, straight[step][0]) and np.array_equal(y, straight[step][1])
    assert run.state_dict() == {"seed": 0, "step": 120}
    fresh = loader()
    assert all(np.array_equal(fresh.batch(s)[1], straight[s][1]) for s in (119, 3, 64))  # any order
    other = loader(seed=1).batch(0)[0]
    assert other.shape != straight[0][0].shape or not np.array_equal(other, straight[0][0])


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_ranks_split_the_global_batch(examples, mode) -> None:
    whole = SFTBatches(examples, block_size=32, batch_size=6, pad_id=0, mode=mode, seed=2)
    parts = [SFTBatches(examples, block_size=32, batch_size=6, pad_id=0, mode=mode, seed=2, rank=r,
                        world_size=3) for r in range(3)]
    for step in (0, 40):
        x, y = whole.batch(step)
        assert np.array_equal(np.concatenate([p.batch(step)[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p.batch(step)[1] for p in parts]), y)


def test_padding_buckets_lengths(examples) -> None:
    batches = SFTBatches(examples, block_size=32, batch_size=8, pad_id=0, mode="pad", pad_multiple=8)
    rows = batches.epoch_rows(0)
    assert len(rows) == len(examples) // 8 * 8 and len({r[0] for r in rows}) == len(rows)
    waste_bucketed, waste_random = 0, 0
    rng = np.random.default_rng(0)
    lengths = examples.lengths
    for b in range(len(rows) // 8):
        group = [r[0] for r in rows[b * 8:(b + 1) * 8]]
        waste_bucketed += int((lengths[group].max() - lengths[group]).sum())
        random_group = rng.choice(len(examples), 8, replace=False)
        waste_random += int((lengths[random_group].max() - lengths[random_group]).sum())
        x, _ = batches.batch(b)
        assert x.shape[1] % 8 == 0 and x.shape[1] >= lengths[group].max() - 1
    assert waste_bucketed < waste_random / 3


def test_padding_drops_random_examples_not_the_longest(tok) -> None:
    """24 examples in batches of 16: 8 are left out each epoch. They must be random ones, so over a
    few epochs every example trains, the longest included (they were never seen before the fix)."""
    few = tokenize(tok, conversations(24, seed=1), block_size=32)
    batches = SFTBatches(few, block_size=32, batch_size=16, pad_id=0, mode="pad")
    seen = {r[0] for epoch in range(8) for r in batches.epoch_rows(epoch)}
    assert seen == set(range(24))
    longest = set(np.argsort(few.lengths, kind="stable")[-8:].tolist())
    assert all(len(longest & {r[0] for r in batches.epoch_rows(e)}) < 8 for e in range(8))


def test_rejects_what_cannot_batch(examples) -> None:
    with pytest.raises(ValueError, match="block_size"):
        SFTBatches(examples, block_size=8, batch_size=2, pad_id=0)
    with pytest.raises(ValueError, match="cannot fill"):
        SFTBatches(examples, block_size=32, batch_size=1000, pad_id=0, mode="pad")
    with pytest.raises(ValueError, match="world_size"):
        SFTBatches(examples, block_size=32, batch_size=5, pad_id=0, world_size=2)
