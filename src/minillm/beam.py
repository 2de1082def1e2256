"""Beam search, framework-free: keep the num_beams most likely partial continuations instead of one.

At each step every live hypothesis ("beam") is extended by every token; the candidates are
ranked by their summed log-probability and the best num_beams that did not end become the next
beams. A candidate that ends (an eos token, or the length limit) is scored
sum_logprob / length ** length_penalty and joins the finished list, which keeps the best
num_beams. The search stops when no live beam can beat the worst finished one, or (with
early_stopping=True) as soon as num_beams hypotheses have finished.

This follows the conventions of Hugging Face `transformers` (tested token for token): twice
num_beams candidates (more with several eos ids) are ranked, so enough survive even if the best
ones all end; only candidates among the top num_beams may finish; the "can a live beam still
win" test uses the current length (early_stopping=False) or the maximum length when
early_stopping="never" and length_penalty > 0.

The search runs on numpy float32 log-probabilities; the model behind it is a callback, so the
PyTorch and JAX twins (minillm/torch/beam.py, minillm/jax/beam.py) only run their model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

IMPOSSIBLE = np.float32(-1.0e9)  # the score of a hypothesis that must not be chosen

# extend(rows, tokens) -> log-probabilities (N, V) of the next token: beam b continues the
# hypothesis in row rows[b] with tokens[b] (the model reorders its cache rows, then decodes).
Extend = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Finished:
    """The best num_beams finished hypotheses, as (score, tokens), best first."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    @property
    def full(self) -> bool:
        return len(self.items) >= self.num_beams

    def worst(self) -> float:
        return self.items[-1][0]

    def add(self, logprob: float, tokens: list[int]) -> None:
        score = logprob / (len(tokens) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: earlier entries win ties
        del self.items[self.num_beams:]


def check_beam_args(num_beams: int, max_new_tokens: int) -> None:
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("num_beams and max_new_tokens must be >= 1")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: the lower index first)."""
    return np.argsort(-scores, kind="stable")[:k]


def search(logprobs: np.ndarray, extend: Extend, max_new_tokens: int, *, length_penalty: float = 1.0,
           early_stopping: bool | str = False, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """The best continuation (new tokens only, ending with eos if it ended there).

    logprobs (N, V): the next token's log-probabilities after the prompt, in each of the N =
    num_beams rows. length_penalty > 0 favours longer outputs, < 0 shorter. early_stopping: True,
    False or "never", as the module docstring says.
    """
    N, eos = len(logprobs), np.array(sorted(set(eos_token_ids)), dtype=np.int64)
    n_candidates = max(2, 1 + len(eos)) * N
    running = np.full(N, IMPOSSIBLE, np.float32)
    running[0] = 0.0  # all beams start identical: extend only the first, or they would repeat it
    beams: list[list[int]] = [[] for _ in range(N)]
    finished, can_improve = Finished(N, length_penalty), True
    for step in range(1, max_new_tokens + 1):
        flat_scores = (np.asarray(logprobs, np.float32) + running[:, None]).reshape(-1)
        flat = _top(flat_scores, n_candidates)  # best over all beams
        scores, rows, tokens = flat_scores[flat], flat // logprobs.shape[-1], flat % logprobs.shape[-1]
        ends = np.isin(tokens, eos) | (step == max_new_tokens)  # (n_candidates,)
        if can_improve and not (finished.full and early_stopping is True):
            for i in np.flatnonzero(ends[:N]).tolist():  # only the top N may finish
                finished.add(float(scores[i]), beams[rows[i]] + [int(tokens[i])])
        live = scores + ends.astype(np.float32) * IMPOSSIBLE  # an ended candidate does not continue
        keep = _top(live, N)
        running, rows, tokens = live[keep], rows[keep], tokens[keep]
        beams = [beams[r] + [t] for r, t in zip(rows.tolist(), tokens.tolist())]
        if finished.full:
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
            can_improve = can_improve and float(running[0]) / best_length ** length_penalty > finished.worst()
        if not can_improve or (finished.full and early_stopping is True) or bool(ends.all()):
            break
        logprobs = extend(rows, tokens)
    return finished.items[0][1]
