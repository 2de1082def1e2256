"""On-policy preference pairs from a scored task set: chosen = the correct answer, rejected = a wrong
answer the model itself sampled (what DPO should then make less likely than the right one).

For each task example, K completions are sampled after its chat-template prompt (batched, KV-cached:
minillm.torch.generate), scored with the task set's exact match, and the first wrong one becomes the
rejected reply. Prompts where every sample was right give no pair (counted); prompts where every
sample was wrong still give one (also counted: the model cannot do them yet). Each row's sampling
is seeded from (seed, example, sample), so the pairs are the same for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.data import tasks
from minillm.tokenizer import chat
from minillm.tokenizer.stream import text_pieces
from minillm.torch.generate import generate


@dataclass
class PairStats:
    prompts: int = 0  # task examples sampled
    pairs: int = 0  # pairs made (prompts with at least one wrong sample)
    no_wrong: int = 0  # prompts whose K samples were all correct: no pair
    all_wrong: int = 0  # prompts whose K samples were all wrong


def sample_answers(model, tokenizer, examples: list[dict], samples: int, temperature: float, seed: int,
                   max_new_tokens: int = 48, batch_size: int = 64) -> list[list[str]]:
    """K sampled replies (text) to each example's prompt (its messages before the answer)."""
    room = model.config.max_seq_len - max_new_tokens
    prompts = [chat.render(tokenizer, e["messages"][:-1], add_generation_prompt=True)[-room:]
               for e in examples]  # a prompt longer than the context keeps its end
    stops = chat.stop_strings(tokenizer), chat.stop_token_ids(tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    rows = [(i, k) for i in order for k in range(samples)]  # (example, sample) of each decoded row
    replies = [[""] * samples for _ in examples]
    for start in range(0, len(rows), batch_size):  # similar prompt lengths together: little padding
        batch = rows[start:start + batch_size]
        seeds = [(seed * 1_000_003 + i) * samples + k for i, k in batch]  # one RNG per (example, sample)
        outs = generate(model, [prompts[i] for i, _ in batch], max_new_tokens, temperature=temperature,
                        stop_token_ids=stops[1], stop_strings=stops[0], tokenizer=tokenizer, seed=seeds)
        for (i, k), out in zip(batch, outs):
            replies[i][k] = "".join(text_pieces(out, tokenizer, *stops))
    return replies


def build_pairs(model, tokenizer, examples: list[dict], samples: int = 8, temperature: float = 1.0,
                seed: int = 0, max_new_tokens: int = 48,
                batch_size: int = 64) -> tuple[list[dict], PairStats]:
    """(pairs in minillm.data.prefs's JSONL shape, counts) from task examples (minillm.data.tasks)."""
    if samples < 1 or temperature < 0:
        raise ValueError(f"samples must be >= 1 and temperature >= 0, got {samples} and {temperature}")
    replies = sample_answers(model, tokenizer, examples, samples, temperature, seed, max_new_tokens,
                             batch_size)
    pairs, stats = [], PairStats(prompts=len(examples))
    for example, answers in zip(examples, replies):
        wrong = [a for a in answers if not tasks.exact_match(a, example["answer"])]
        stats.no_wrong += not wrong
        stats.all_wrong += len(wrong) == len(answers)
        if wrong:
            pairs.append({"messages": example["messages"][:-1], "chosen": example["answer"],
                          "rejected": wrong[0], "kind": example["kind"]})
    stats.pairs = len(pairs)
    return pairs, stats
