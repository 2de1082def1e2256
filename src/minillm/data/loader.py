"""Batches of `(x, y)` token windows from the `.bin` files that `prepare` writes (numpy only).

`x` is a window of `block_size` tokens and `y` the same window shifted by one: the model reads
`x[:, t]` and learns to predict `y[:, t]`, the next token.

- Training (`BatchLoader`): windows at random offsets, as in nanoGPT. The file is opened as a
  fresh `np.memmap` for every batch, so the pages read are not kept referenced by us and resident
  memory stays flat even for files larger than RAM.
- Resuming: the offsets of step `s` come from `np.random.default_rng([seed, s])`, so the loader's
  whole state is `{"seed", "step"}` (JSON); a checkpoint that saves `state_dict()` resumes the
  exact batch sequence with `load_state_dict()`.
- Data parallelism (DESIGN principle 6): `batch_size` is the *global* batch. Every rank draws the
  same global offsets and keeps its own `batch_size // world_size` rows, so the data a step sees
  is the same whatever the number of ranks, and no two ranks get the same rows.
- Evaluation (`eval_batches`): consecutive windows from the start, the same ones every time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from minillm.files import read_json

Batch = tuple[np.ndarray, np.ndarray]  # (x, y), each (B, T) int64
TOKEN_DTYPES = ("uint16", "uint32")  # what `prepare` writes (see `minillm.data.prepare.token_dtype`)


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of a prepared data directory, `dtype` and `vocab_size` checked. Errors are one
    line naming the file: FileNotFoundError if never prepared, ValueError if not JSON or a field is bad."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run prepare() on a source into {data_dir} first")
    meta = read_json(path)
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"{path}: dtype must be one of {TOKEN_DTYPES}, got {meta.get('dtype')!r}")
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"{path}: vocab_size must be a positive integer, got {vocab_size!r}; re-run prepare")
    return meta


def read_tokens(path: str | os.PathLike) -> np.memmap:
    """A token file (`train.bin`, `val.bin`) as a read-only 1-D array, dtype from the meta.json next to it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    return np.memmap(path, dtype=np.dtype(read_meta(path.parent)["dtype"]), mode="r")


class BatchLoader:
    """Random training windows from `<data_dir>/<split>.bin`; seeded, resumable, rank-sharded.

    >>> loader = BatchLoader("data/shakespeare-char", block_size=256, batch_size=64)  # doctest: +SKIP
    >>> x, y = loader.next_batch()      # (64, 256) int64 each; y[:, t] == x[:, t + 1] in the file
    >>> state = loader.state_dict()     # {"seed": 0, "step": 1}; save it with the checkpoint
    """

    def __init__(self, data_dir: str | os.PathLike, block_size: int, batch_size: int, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} must be divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.path = Path(data_dir) / f"{split}.bin"
        self.dtype = np.dtype(read_meta(data_dir)["dtype"])
        self.n_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        if self.n_tokens < block_size + 1:
            raise ValueError(f"{self.path} has {self.n_tokens} tokens, "
                             f"fewer than block_size + 1 = {block_size + 1}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.step = seed, 0

    def draw(self, step: int, high: int) -> np.ndarray:
        """This rank's share of the step's batch_size integers in [0, high), seeded by (seed, step)
        alone, so a resumed run draws them again: (batch_size // world_size,)."""
        values = np.random.default_rng([self.seed, step]).integers(0, high, size=self.batch_size)
        per_rank = self.batch_size // self.world_size
        return values[self.rank * per_rank : (self.rank + 1) * per_rank]

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of this rank's windows at `step`: (batch_size // world_size,)."""
        # Windows start anywhere that leaves room for x and the one-token shift of y.
        return self.draw(step, self.n_tokens - self.block_size)

    def next_batch(self) -> Batch:
        """The next (x, y) batch for this rank, each (batch_size // world_size, block_size) int64."""
        data = np.memmap(self.path, dtype=self.dtype, mode="r")  # re-opened per batch: flat memory
        windows = np.stack([data[s : s + self.block_size + 1] for s in self.offsets(self.step)])
        windows = windows.astype(np.int64)  # (B, T + 1)
        self.step += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it replays exactly the same batches."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output."""
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, tail: bool = False) -> Iterator[Batch]:
    """Consecutive, non-overlapping (x, y) windows of a 1-D token array, always the same ones.

    Window i covers tokens [i*T, (i+1)*T] (T = block_size; y overlaps the next window's x by one
    token). Rank r takes windows r, r + world_size, ...; batches hold up to `batch_size` windows
    (the last may be smaller). `tail=True` adds the shorter window left at the end, as a batch of
    its own, so that every token after the first is predicted exactly once. `max_batches` bounds
    the number of batches per rank (e.g. for a quick estimate). `tokens` may be a `np.memmap`
    (`read_tokens`): only the windows of the current batch are read.
    """
    n_full = (len(tokens) - 1) // block_size
    starts = list(np.arange(rank, n_full, world_size) * block_size)
    groups = [starts[first : first + batch_size] for first in range(0, len(starts), batch_size)]
    if tail and (len(tokens) - 1) % block_size and n_full % world_size == rank:
        groups.append([n_full * block_size])  # the tail window, ending at the last token
    for group in groups[:max_batches]:
        windows = np.stack([tokens[s : s + block_size + 1] for s in group]).astype(np.int64)  # (B, T + 1)
        yield windows[:, :-1], windows[:, 1:]
