"""Beam search: keep the num_beams most likely partial continuations instead of one.

At each step every live hypothesis ("beam") is extended by every token; the candidates are
ranked by their summed log-probability and the best num_beams that did not end become the next
beams. A candidate that ends (an eos token, or the length limit) is scored
sum_logprob / length ** length_penalty and joins the finished list, which keeps the best
num_beams. The search stops when no live beam can beat the worst finished one, or (with
early_stopping=True) as soon as num_beams hypotheses have finished.

This follows the conventions of Hugging Face `transformers` (tested token for token):
- twice num_beams candidates (more with several eos ids) are ranked, so enough survive even if
  the best ones all end;
- only candidates among the top num_beams may finish;
- the "can a live beam still win" test uses the current length (early_stopping=False) or the
  maximum length when early_stopping="never" and length_penalty > 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
from minillm.torch.kv_cache import BatchCache, cache_length
from minillm.torch.packed import packed_copy
from minillm.torch.sampling import mask_padded_vocab

IMPOSSIBLE = -1.0e9  # the score of a hypothesis that must not be chosen


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


@torch.inference_mode()
def beam_search(model, prompt: Sequence[int], max_new_tokens: int, num_beams: int = 4, *,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                eos_token_ids: Sequence[int] = (), vocab_size: int | None = None) -> list[int]:
    """The best continuation of `prompt` (new tokens only, ending with eos if it ended there).

    length_penalty: exponent of the length that divides a finished hypothesis' log-probability
    (> 0 favours longer outputs, < 0 shorter). early_stopping: True stops once num_beams
    hypotheses are finished; False stops when the best live beam, at its current length, cannot
    beat the worst finished one; "never" uses the most favourable length for that test.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("num_beams and max_new_tokens must be >= 1")
    N, eos = num_beams, torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
    slots = cache_length(model.config.max_seq_len, [list(prompt)], max_new_tokens, "error")
    cache = BatchCache(packed_copy(model), slots, model.config.vocab_size)
    logits = cache.prefill([list(prompt)] * N)  # (N, V), every row the same prompt
    n_candidates = max(2, 1 + len(eos)) * N
    running = torch.full((N,), IMPOSSIBLE)
    running[0] = 0.0  # all beams start identical: extend only the first, or they would repeat it
    beams: list[list[int]] = [[] for _ in range(N)]
    finished, can_improve = Finished(N, length_penalty), True
    for step in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(mask_padded_vocab(logits, vocab_size).float(), dim=-1)  # (N, V)
        scores, flat = (logprobs + running[:, None]).view(-1).topk(n_candidates)  # best over all beams
        rows, tokens = flat // logprobs.size(-1), flat % logprobs.size(-1)
        ends = torch.isin(tokens, eos) | (step == max_new_tokens)  # (n_candidates,)
        if can_improve and not (finished.full and early_stopping is True):
            for i in torch.nonzero(ends[:N]).flatten().tolist():  # only the top N may finish
                finished.add(scores[i].item(), beams[rows[i]] + [tokens[i].item()])
        live = scores + ends.float() * IMPOSSIBLE  # an ended candidate does not continue
        keep = live.topk(N).indices
        running, rows, tokens = live[keep], rows[keep], tokens[keep]
        beams = [beams[r] + [t] for r, t in zip(rows.tolist(), tokens.tolist())]
        if finished.full:
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
            can_improve = can_improve and running[0].item() / best_length ** length_penalty > finished.worst()
        if not can_improve or (finished.full and early_stopping is True) or bool(ends.all()):
            break
        cache.reorder(rows)
        logits = cache.decode(tokens)
    return finished.items[0][1]
