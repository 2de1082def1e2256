"""Rewards for GRPO (minillm.data.rewards) on literal cases: exact match, the edit-distance partial
score (distances worked out by hand), and resolving names and callables."""

from __future__ import annotations

import pytest

from minillm.data.rewards import edit_distance, exact, partial, reward_fn


def test_exact_is_tasks_exact_match_as_a_float():
    assert exact("HAMLET", "HAMLET") == 1.0
    assert exact("  HAMLET\n", "HAMLET") == 1.0  # surrounding whitespace is stripped
    assert exact("Hamlet", "HAMLET") == 0.0  # case counts
    assert exact("HAMLET.", "HAMLET") == 0.0  # punctuation counts
    assert exact("", "HAMLET") == 0.0


@pytest.mark.parametrize("a,b,distance", [
    ("kitten", "sitting", 3),  # k->s, e->i, +g (the textbook example)
    ("flaw", "lawn", 2),  # -f, +n
    ("", "abc", 3), ("abc", "", 3), ("", "", 0),
    ("abc", "abc", 0),
    ("abc", "acb", 2),  # a transposition is two substitutions in Levenshtein's distance
    ("Ber", "BER", 2),  # case counts: e->E, r->R
])
def test_edit_distance_literal_cases(a, b, distance):
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance  # symmetric


@pytest.mark.parametrize("prediction,answer,expected", [
    ("HAMLET", "HAMLET", 1.0),
    (" HAMLET ", "HAMLET", 1.0),  # stripped, as exact match
    ("HAMLT", "HAMLET", 1 - 1 / 6),  # one deletion, the longer string has 6 characters
    ("HAMLETS", "HAMLET", 1 - 1 / 7),  # one insertion, the longer has 7
    ("kitten", "sitting", 1 - 3 / 7),
    ("xyz", "abc", 0.0),  # every character wrong
    ("", "abc", 0.0),
    ("", "", 1.0),  # nothing asked, nothing given
])
def test_partial_is_one_minus_normalised_edit_distance(prediction, answer, expected):
    assert partial(prediction, answer) == pytest.approx(expected, abs=1e-12)


def test_partial_is_one_exactly_when_exact_is():
    pairs = [("a", "a"), ("a", "b"), ("ab", "a"), (" x", "x"), ("X", "x"), ("", "")]
    for prediction, answer in pairs:
        assert (partial(prediction, answer) == 1.0) == (exact(prediction, answer) == 1.0)
        assert 0.0 <= partial(prediction, answer) <= 1.0


def test_reward_fn_resolves_names_and_callables():
    example = {"messages": [], "answer": "HAMLET", "kind": "speaker"}
    assert reward_fn("exact")("HAMLET", example) == 1.0
    assert reward_fn("exact")("HAMLT", example) == 0.0
    assert reward_fn("partial")("HAMLT", example) == pytest.approx(5 / 6)

    def by_length(prediction, example):
        return float(len(prediction) == len(example["answer"]))

    assert reward_fn(by_length) is by_length
    assert reward_fn(by_length)("ABCDEF", example) == 1.0


def test_unknown_reward_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown reward 'bleu': expected one of \['exact', 'partial'\]"):
        reward_fn("bleu")
