"""Preference data (minillm.data.prefs): JSONL reading with file:line errors, the rendering against the
template's documented layout, masks position by position (prompt and padding excluded, chosen and
rejected distinct), the over-long counts, and batches as a function of (seed, step)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minillm.data.prefs import PrefBatches, pair_rows, read_pairs, tokenize_pairs, write_pairs
from minillm.tokenizer.char import CharTokenizer


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer().train("abcdefghijklmnopqrstuvwxyz ?!.")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))

    def word(longest: int) -> str:
        return "".join(rng.choice(letters, rng.integers(1, longest)))

    return [{"messages": user(word(10)), "chosen": word(6), "rejected": word(6)} for _ in range(n)]


# --- reading --------------------------------------------------------------------------------------------
def test_reads_both_shapes_and_writes_them_back(tmp_path) -> None:
    path = tmp_path / "prefs.jsonl"
    convo = [{"role": "system", "content": "be brief"}, *user("hi")]
    path.write_text(json.dumps({"prompt": "hi", "chosen": "ho", "rejected": "hu", "kind": "k"}) + "\n\n"
                    + json.dumps({"messages": convo, "chosen": "a", "rejected": "b"}) + "\n")
    expected = [{"messages": user("hi"), "chosen": "ho", "rejected": "hu", "kind": "k"},
                {"messages": convo, "chosen": "a", "rejected": "b"}]
    assert read_pairs(path) == expected
    write_pairs(expected, tmp_path / "again.jsonl")
    assert read_pairs(tmp_path / "again.jsonl") == expected


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"prompt": "x", "chosen": "y"}', "expected 'prompt' (or 'messages'), 'chosen' and 'rejected'"),
    ('{"prompt": "x", "messages": [], "chosen": "y", "rejected": "z"}', "expected 'prompt' (or 'messages')"),
    ('{"prompt": "x", "chosen": 3, "rejected": "z"}', "'chosen' must be a string"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}], "chosen": "y", "rejected": "z"}),
     "unknown role 'bot'"),
    (json.dumps({"messages": [*user("x"), {"role": "assistant", "content": "y"}], "chosen": "y",
                 "rejected": "z"}), "must end before the reply"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_an_empty_file_is_an_error(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no preference pairs"):
        read_pairs(tmp_path / "empty.jsonl")


# --- rendering and masks --------------------------------------------------------------------------------
def test_a_pair_renders_as_the_template_documents(tok) -> None:
    """prompt = <|bos|> <|user|> content <|eos|> <|assistant|>; completion = reply + <|eos|>."""
    ex = tokenize_pairs(tok, [{"messages": user("ab"), "chosen": "cd", "rejected": "e"}], block_size=32)
    s = tok.special_id
    assert ex.prompts[0].tolist() == [s("bos"), s("user"), *tok.encode("ab"), s("eos"), s("assistant")]
    assert ex.chosen[0].tolist() == [*tok.encode("cd"), s("eos")]
    assert ex.rejected[0].tolist() == [*tok.encode("e"), s("eos")]


def test_masks_position_by_position(tok) -> None:
    data = [{"messages": user("ab"), "chosen": "cd", "rejected": "e"},
            {"messages": user("abcdef"), "chosen": "g", "rejected": "hij"}]
    ex = tokenize_pairs(tok, data, block_size=32)
    x, y = pair_rows(ex, [0, 1], pad_id=tok.special_id("pad"), block_size=32, pad_multiple=8)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; prompts of 6 and 10 ids (bos user .. eos assistant)
    assert x.shape == y.shape == (4, 16)  # longest row: 10 + 4 = 14 ids -> 13 targets -> 16
    eos, pad = tok.special_id("eos"), tok.special_id("pad")
    for row, (prompt, completion) in enumerate([(6, tok.encode("cd")), (10, tok.encode("g")),
                                                (6, tok.encode("e")), (10, tok.encode("hij"))]):
        full = list(ex.prompts[row % 2]) + completion + [eos]
        assert x[row, :len(full)].tolist() == full and (x[row, len(full):] == pad).all()
        # y[t] is the target of position t: the id at t + 1, scored only when it is a completion id
        expected = [full[t + 1] if prompt <= t + 1 < len(full) else -100 for t in range(16)]
        assert y[row].tolist() == expected, row
    chosen_mask, rejected_mask = y[:2] != -100, y[2:] != -100
    assert not np.array_equal(chosen_mask, rejected_mask)


def test_overlong_pairs_are_cut_or_skipped_and_counted(tok) -> None:
    data = [{"messages": user("a" * 20), "chosen": "b", "rejected": "c"},  # prompt 24 ids: no room
            {"messages": user("a" * 6), "chosen": "b" * 12, "rejected": "c"},  # chosen cut
            {"messages": user("a"), "chosen": "b", "rejected": "c"}]
    said = []
    ex = tokenize_pairs(tok, data, block_size=15, log=said.append)  # rows of 16 ids
    assert (ex.n_skipped, ex.n_truncated, len(ex)) == (1, 1, 2)
    assert len(ex.prompts[0]) + len(ex.chosen[0]) == 16 and ex.chosen[0].tolist() == tok.encode("b" * 6)
    assert len(said) == 1 and "1 truncated" in said[0] and "1 skipped" in said[0]
    with pytest.raises(ValueError, match="no preference pair fits"):
        tokenize_pairs(tok, data[:1], block_size=15, log=said.append)


# --- batches -------------------------------------------------------------------------------------------
def test_batches_are_a_function_of_seed_and_step(tok) -> None:
    ex = tokenize_pairs(tok, pairs(10), block_size=32)
    a, b = PrefBatches(ex, 32, 3, tok.special_id("pad"), seed=5), PrefBatches(ex, 32, 3, 0, seed=5)
    b.pad_id = a.pad_id
    first = [a.next_batch() for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    b.load_state_dict({"seed": 5, "step": 4})
    assert all(np.array_equal(u, v) for u, v in zip(b.next_batch(), first[4]))
    seen = [i for step in range(3) for i in a.pairs_at(step)]
    assert len(set(seen)) == 9  # an epoch draws each pair at most once
    assert a.pairs_at(0) != PrefBatches(ex, 32, 3, 0, seed=6).pairs_at(0)


def test_ranks_split_each_batch(tok) -> None:
    ex = tokenize_pairs(tok, pairs(12), block_size=32)
    pad = tok.special_id("pad")
    whole = PrefBatches(ex, 32, 4, pad, seed=1).pairs_at(2)
    parts = [PrefBatches(ex, 32, 4, pad, seed=1, rank=r, world_size=2) for r in range(2)]
    for r, part in enumerate(parts):
        x, _ = part.batch(2)
        expected, _ = pair_rows(ex, whole[2 * r:2 * r + 2], pad, 32)
        assert x.shape[0] == 4 and np.array_equal(x[:, :expected.shape[1]], expected)
