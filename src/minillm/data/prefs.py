"""Preference data for DPO / IPO: JSONL pairs -> token arrays -> (x, y) batches of chosen and rejected rows.

A line is `{"prompt": str, "chosen": str, "rejected": str}` (the prompt is one user turn) or
`{"messages": [...], "chosen": str, "rejected": str}` (the conversation so far, ending before the
reply). Lines are read one at a time and checked; a bad line stops with `file:line: what is wrong`.

A pair renders as prompt = `chat.render(messages, add_generation_prompt=True)` and two completions,
each the reply's ids and its end token: exactly what SFT trains on (`chat.render_for_training` of
the conversation with the reply appended), so DPO compares the probabilities SFT learned. Only the
completion is scored: in a row (prompt + completion, at most block_size + 1 ids), the targets of
the prompt and of the padding are -100 (`sft.IGNORE_INDEX`). Pairs whose prompt leaves no room for
a completion token are skipped; longer completions are cut at the row's end; both counted.

A batch of b pairs is one (2b, W) pair of int64 arrays (x, y): rows 0..b-1 the chosen completions,
rows b..2b-1 the rejected ones, in the same pair order (row i and row b + i share a prompt). W is
the longest row of the batch rounded up to `pad_multiple`. Batches are a pure function of (seed,
step): epoch e's order is a permutation drawn from (seed, e), so a run resumes from its step alone.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from minillm.data import sft
from minillm.data.sft import IGNORE_INDEX
from minillm.files import atomic_write_text
from minillm.tokenizer.chat import render, render_for_training, validate_messages


# --- reading ---------------------------------------------------------------------------------------------
def parse_pair(obj: Any) -> dict[str, Any]:
    """One JSONL value -> {"messages": prompt turns, "chosen": str, "rejected": str, **other fields}."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing or ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"expected 'prompt' (or 'messages'), 'chosen' and 'rejected', "
                         f"got keys {sorted(obj)}")
    for key in ("prompt", "chosen", "rejected"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    pair = {k: v for k, v in obj.items() if k != "prompt"}
    if "prompt" in obj:
        pair["messages"] = [{"role": "user", "content": obj["prompt"]}]
    validate_messages(pair["messages"])
    if pair["messages"][-1]["role"] == "assistant":
        raise ValueError("'messages' must end before the reply (its last turn is the assistant's)")
    return pair


def read_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All pairs of a preference JSONL file (blank lines skipped); errors name `file:line`."""
    return sft.read_jsonl(path, parse_pair, "preference pairs")


def write_pairs(pairs: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write pairs as JSONL (atomically); `read_pairs(path)` reads them back."""
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


# --- tokenizing -----------------------------------------------------------------------------------------
@dataclass
class PrefExamples:
    """Tokenized pairs: prompt ids and the two completions' ids (reply + end token) of each pair."""

    prompts: list[np.ndarray] = field(default_factory=list)
    chosen: list[np.ndarray] = field(default_factory=list)
    rejected: list[np.ndarray] = field(default_factory=list)
    n_truncated: int = 0
    n_skipped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def completion_ids(tokenizer, messages: list[dict], prompt: list[int], reply: str) -> list[int]:
    """The ids SFT trains for `reply` after `messages`: its content and its end token."""
    ids, _ = render_for_training(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    assert ids[:len(prompt)] == prompt, "the chat template renders a prompt as a prefix of its conversation"
    return ids[len(prompt):]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def tokenize_pairs(tokenizer, pairs: list[dict[str, Any]], block_size: int,
                   log: Callable[[str], None] = _stderr) -> PrefExamples:
    """Render each pair; fit prompt + completion into block_size + 1 ids (see the module docstring)."""
    limit = block_size + 1  # a row holds x and the one-token shift of y
    out = PrefExamples()
    for n, pair in enumerate(pairs):
        try:
            prompt = render(tokenizer, pair["messages"], add_generation_prompt=True)
            chosen, rejected = (completion_ids(tokenizer, pair["messages"], prompt, pair[k])
                                for k in ("chosen", "rejected"))
        except ValueError as e:  # e.g. a character a char-level tokenizer has never seen
            raise ValueError(f"pair {n}: {e}") from None
        room = limit - len(prompt)
        if room < 1:
            out.n_skipped += 1
            continue
        out.n_truncated += len(chosen) > room or len(rejected) > room
        out.prompts.append(np.asarray(prompt, dtype=np.int64))
        out.chosen.append(np.asarray(chosen[:room], dtype=np.int64))
        out.rejected.append(np.asarray(rejected[:room], dtype=np.int64))
    if out.n_truncated or out.n_skipped:
        log(f"prefs: of {len(pairs)} pairs longer than {limit} tokens, {out.n_truncated} truncated "
            f"(completion cut), {out.n_skipped} skipped (no room after the prompt)")
    if not len(out):
        raise ValueError(f"no preference pair fits in {limit} tokens (all {len(pairs)} skipped)")
    return out


# --- batching -------------------------------------------------------------------------------------------
def pair_rows(examples: PrefExamples, index: list[int], pad_id: int, block_size: int,
              pad_multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int64 (2b, W) of pairs `index`: chosen rows then rejected rows; y is -100 on the
    prompt and the padding. W = the longest row - 1 rounded up to pad_multiple, at most block_size."""
    rows = [(examples.prompts[i], examples.chosen[i]) for i in index] \
        + [(examples.prompts[i], examples.rejected[i]) for i in index]
    longest = max(len(p) + len(c) for p, c in rows) - 1
    width = min(-(-longest // pad_multiple) * pad_multiple, block_size)
    ids = np.full((len(rows), width + 1), pad_id, dtype=np.int64)  # (2b, W + 1)
    trained = np.zeros((len(rows), width + 1), dtype=bool)
    for r, (prompt, completion) in enumerate(rows):
        ids[r, :len(prompt)], ids[r, len(prompt):len(prompt) + len(completion)] = prompt, completion
        trained[r, len(prompt):len(prompt) + len(completion)] = True
    return ids[:, :-1], np.where(trained[:, 1:], ids[:, 1:], IGNORE_INDEX)


class PrefBatches:
    """(x, y) batches of `batch_size` pairs (2 x batch_size rows); `batch(step)` depends on (seed, step)
    alone. Rank r of `world_size` keeps pairs [r * B / world, (r + 1) * B / world) of each batch.
    Same loader interface as BatchLoader / SFTBatches: next_batch(), state_dict(), load_state_dict()."""

    def __init__(self, examples: PrefExamples, block_size: int, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_multiple: int = 8) -> None:
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split over world_size {world_size} (rank {rank})")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} preference pairs cannot fill one batch of {batch_size}")
        self.examples, self.block_size, self.batch_size = examples, block_size, batch_size
        self.pad_id, self.pad_multiple, self.rank, self.world_size = pad_id, pad_multiple, rank, world_size
        self.seed, self.step = seed, 0

    def pairs_at(self, step: int) -> list[int]:
        """The global batch of pair indices at `step`: whole batches of each epoch's permutation."""
        per_epoch = len(self.examples) // self.batch_size  # the remainder waits for another epoch's order
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return [int(i) for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (x, y) at `step`: int64 (2 x batch_size / world, W)."""
        index = self.pairs_at(step)
        share = self.batch_size // self.world_size
        return pair_rows(self.examples, index[self.rank * share:(self.rank + 1) * share], self.pad_id,
                         self.block_size, self.pad_multiple)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
