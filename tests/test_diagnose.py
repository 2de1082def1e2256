"""minillm.diagnose: entropy against the float64 formula, loop detection on literal token lists."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from minillm import diagnose as dg


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_entropy_equals_the_float64_formula():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(30, 0.3), size=5)  # (5, 30)
    probs[0, :10] = 0.0  # zeros count as 0 log 0 = 0
    probs[0] /= probs[0].sum()
    expected = [-sum(p * math.log(p) / math.log(2) for p in row if p > 0) for row in probs.tolist()]
    np.testing.assert_allclose(dg.entropy_bits(probs), expected, rtol=1e-12)
    assert dg.entropy_bits(np.eye(4)[1]) == 0.0  # certain
    assert dg.entropy_bits(np.full(8, 1 / 8)) == pytest.approx(3.0, abs=1e-12)  # 8 equal choices: 3 bits


def test_the_shortest_repeated_span_at_the_end_is_found_from_where_the_repetition_starts():
    loop = dg.find_loop([5, 1, 2, 1, 2, 1, 2, 1, 2, 1], min_repeats=3, min_tokens=6)
    assert (loop.span, loop.repeats, loop.start, loop.partial) == ((1, 2), 4, 1, True)
    loop = dg.find_loop(chars("ROMEO: I will the fair the fair the fair the fair the fa"))
    assert (decode(list(loop.span)), loop.repeats, loop.start, loop.partial) == (" the fair", 4, 13, True)
    loop = dg.find_loop(chars("xyz" + "ab" * 6))
    assert (decode(list(loop.span)), loop.repeats) == ("ab", 6)  # not "abab" three times
    assert decode(list(dg.find_loop(chars("hmm" + "a" * 9)).span)) == "a"


def test_outputs_that_do_not_loop_get_no_warning():
    rng = random.Random(1)
    assert dg.find_loop([rng.randrange(1000) for _ in range(200)]) is None
    assert dg.find_loop(chars("But soft, what light through yonder window breaks?")) is None
    assert dg.find_loop(chars("Wait...")) is None  # three dots: repeated, but too short to be a loop
    assert dg.find_loop(chars("the the")) is None  # two copies are not enough
    assert dg.find_loop([]) is None
    with pytest.raises(ValueError, match="min_repeats must be >= 2"):
        dg.find_loop([1, 1, 1], min_repeats=1)


def test_the_warning_names_the_repeated_span():
    loop = dg.find_loop(chars("I said:" + "the end. " * 3))
    line = dg.loop_warning(loop, decode, "sample 2")
    assert line == ("warning: sample 2 loops: 'the end. ' repeated 3 times from output token 7 to its end "
                    "(9 tokens each)")
    loop = dg.find_loop(chars("I say " + "the end. " * 3))  # the space before "the" repeats too
    assert "' the end.' repeated 3 times (and a part) from output token 5" in dg.loop_warning(loop, decode)


def test_diagnose_reports_entropy_per_token_and_the_loop():
    output = chars("go " * 5)
    probs = np.tile(np.array([0.5, 0.25, 0.25]), (len(output), 1))  # 1.5 bits at every token
    report = dg.diagnose(probs, output, decode, label="sample 1")
    assert report["tokens"] == output and report["pieces"] == list("go " * 5)
    assert report["entropy"] == [1.5] * 15
    assert report["loop"] == {"span": "go ", "span_tokens": chars("go "), "repeats": 5, "start": 0,
                              "partial": False}
    text = dg.diagnosis_text(report)
    assert text.splitlines()[0] == "entropy (bits; 0 = certain): mean 1.50, max 1.50 at output token 0 ('g')"
    assert "g:1.50 o:1.50 ␣:1.50" in text and text.splitlines()[-1] == report["warning"]
    assert "'go ' repeated 5 times" in report["warning"]
    calm = dg.diagnose(probs[:4], chars("abcd"), decode)
    assert calm["loop"] is None and calm["warning"] is None and "warning" not in dg.diagnosis_text(calm)


def test_entropy_report_wraps_and_labels_invisible_tokens():
    report = dg.entropy_report(["a", " ", "\n", ""] * 20, [0.0, 1.0, 2.0, 3.0] * 20, width=40)
    lines = report.splitlines()
    assert lines[0].endswith("max 3.00 at output token 3 ('∅')")
    assert all(len(line) <= 40 for line in lines[1:]) and len(lines) > 3
    assert lines[1].startswith("a:0.00 ␣:1.00 ↵:2.00 ∅:3.00")
    assert dg.token_label("a\tb\r") == "a\\tb\\r"
    assert dg.entropy_report([], []) == "entropy: no generated tokens"
