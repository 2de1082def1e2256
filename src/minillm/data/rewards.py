"""Rewards for reinforcement learning on task sets (GRPO, minillm.torch.grpo): a number per answer.

A reward function maps (prediction, example) -> float, where `example` is a task-set example
(minillm.data.tasks: "messages", "answer", "kind"). Two come built in, by name:
    exact    1.0 when the prediction equals the answer (tasks.exact_match: surrounding whitespace
             stripped, case and punctuation count), else 0.0: the benchmark's own score.
    partial  1 - (Levenshtein distance / length of the longer string), on the stripped strings:
             in [0, 1], 1.0 exactly when `exact` is 1.0, and graded below it, so a group whose
             answers are all wrong still has a reward spread to learn from (character-level, like
             the char models trained here; word-level F1 would score every wrong one-word answer 0).
Any other Python callable (prediction, example) -> float works through the API (`reward_fn`).
"""

from __future__ import annotations

from typing import Any, Callable

from minillm.data.tasks import exact_match

RewardFn = Callable[[str, dict[str, Any]], float]


def exact(prediction: str, answer: str) -> float:
    """1.0 if the prediction is the answer (tasks.exact_match), else 0.0."""
    return 1.0 if exact_match(prediction, answer) else 0.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions
    turning a into b (the classic dynamic programme, one row at a time)."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def partial(prediction: str, answer: str) -> float:
    """1 - edit_distance / max(length) of the stripped strings, in [0, 1]; two empty strings: 1.0."""
    p, a = prediction.strip(), answer.strip()
    longest = max(len(p), len(a))
    return 1.0 - edit_distance(p, a) / longest if longest else 1.0


BUILTIN: dict[str, Callable[[str, str], float]] = {"exact": exact, "partial": partial}


def reward_fn(name_or_callable: str | RewardFn) -> RewardFn:
    """The reward function (prediction, example) -> float for a built-in name or a callable."""
    if callable(name_or_callable):
        return name_or_callable
    if name_or_callable not in BUILTIN:
        raise ValueError(f"unknown reward {name_or_callable!r}: expected one of {sorted(BUILTIN)} "
                         f"or a Python callable (prediction, example) -> float")
    score = BUILTIN[name_or_callable]
    return lambda prediction, example: score(prediction, example["answer"])
