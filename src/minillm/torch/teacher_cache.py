"""A cache of a distillation teacher's top-k log-probabilities (minillm.torch.distill), so that the
student's steps do not pay for the teacher's forward pass.

The teacher reads the training split once, in fixed non-overlapping windows of the student's
block_size (a grid: window r is x = tokens[r*T : (r+1)*T], y one token later, as
`minillm.data.loader.eval_batches` cuts them), and for every position keeps

    ids      (rows, T, k)  the k most likely next tokens under softmax(teacher / temperature)
    log_p    (rows, T, k)  their log-probabilities at that temperature (float16 or float32)
    log_tail (rows, T)     log of the probability left to the other V - k tokens (float32; -inf at k = V)

The student then trains on grid rows (`GridLoader`: random rows, seeded per step, so resuming
replays the same batches), never on other windows: the cache holds targets for those contexts only.

On disk: `teacher.safetensors` and `teacher_cache.json`, the record of what made it (the teacher
run and a SHA-256 of its config and weights, the data's meta.json and token count, split,
block_size, top_k, temperature, dtype, the teacher's precision). `open_cache` reuses a cache whose
record matches and rebuilds one that does not (saying why). The record is written last and removed
first, so a build cut short leaves no record and is redone. The whole cache is read into memory:
rows * T * (k * (2 + bytes of dtype) + 4) bytes (ids take 4 bytes past 65,536 tokens), 238 MB for
Shakespeare's 1.8M BPE tokens at k = 32 in float16; beyond RAM it would need memory-mapped shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.data.loader import BatchLoader, eval_batches, read_meta, read_tokens
from minillm.files import atomic_write_json, read_json
from minillm.torch.run_data import RunData

CACHE_FILE, RECORD_FILE = "teacher.safetensors", "teacher_cache.json"
FORMAT = "minillm-teacher-cache-1"
DTYPES = ("float16", "float32")
VOLATILE = ("teacher", "data_dir", "seconds")  # recorded for the reader, not part of the match


class CachedTargets(NamedTuple):
    """What a cached batch trains towards: y (b, T) next tokens; the teacher's ids (b, T, k),
    log_p (b, T, k) and log_tail (b, T) at the same positions."""

    y: torch.Tensor
    ids: torch.Tensor
    log_p: torch.Tensor
    log_tail: torch.Tensor


def teacher_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and weights (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def wanted_record(teacher_dir: str | Path, teacher: torch.nn.Module, data_dir: str | Path, block_size: int,
                  top_k: int, temperature: float, dtype: str, precision: torch.dtype) -> dict[str, Any]:
    """The record a cache of these settings carries (without the build time)."""
    if dtype not in DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {DTYPES}, got {dtype!r}")
    vocab = teacher.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise ValueError(f"distill top_k must be in [1, teacher vocab_size {vocab}], got {top_k}")
    tokens = len(read_tokens(Path(data_dir) / "train.bin"))
    return dict(format=FORMAT, teacher=str(teacher_dir), teacher_sha256=teacher_digest(teacher),
                data_dir=str(data_dir), data=read_meta(data_dir), split="train", tokens=tokens,
                rows=(tokens - 1) // block_size, block_size=block_size, top_k=top_k,
                temperature=float(temperature), dtype=dtype, precision=str(precision).removeprefix("torch."))


def mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first field in which a saved record differs from the wanted one (None if none does)."""
    for key in wanted:
        if key not in VOLATILE and saved.get(key) != wanted[key]:
            return f"{key}: {str(saved.get(key))[:60]}, now {str(wanted[key])[:60]}"
    return None


@torch.no_grad()
def build(cache_dir: str | Path, teacher: torch.nn.Module, wanted: dict[str, Any], batch_size: int = 16,
          autocast=None, quiet: bool = False) -> dict[str, Any]:
    """Run the teacher over the grid and write the cache; returns its record. `autocast`: a
    context-manager factory for the teacher's forward (the trainer's precision), default none."""
    cache_dir, T, k = Path(cache_dir), wanted["block_size"], wanted["top_k"]
    (cache_dir / RECORD_FILE).unlink(missing_ok=True)  # no record until the new tensors are whole
    tokens = read_tokens(Path(wanted["data_dir"]) / "train.bin")
    rows, device = wanted["rows"], next(teacher.parameters()).device
    ids = np.zeros((rows, T, k), np.uint16 if teacher.config.vocab_size <= 2 ** 16 else np.int32)
    log_p, log_tail = np.zeros((rows, T, k), wanted["dtype"]), np.zeros((rows, T), np.float32)
    start, first = time.perf_counter(), 0
    with tqdm(total=rows, desc="teacher cache", unit="window", disable=quiet) as bar:
        for x, _ in eval_batches(tokens, T, batch_size):  # the grid, in order: rows first .. first + b
            with autocast() if autocast else contextlib.nullcontext():
                logits = teacher(torch.from_numpy(x).to(device))  # (b, T, V)
            lp = F.log_softmax(logits.float() / wanted["temperature"], dim=-1)
            top = lp.topk(k, dim=-1)  # (b, T, k), most likely first
            tail = torch.logsumexp(lp.scatter(-1, top.indices, -torch.inf), dim=-1)  # (b, T); -inf at k = V
            b = len(x)
            ids[first : first + b] = top.indices.cpu().numpy()
            log_p[first : first + b] = top.values.cpu().numpy()
            log_tail[first : first + b] = tail.cpu().numpy()
            first += b
            bar.update(b)
    checkpoint.save_tensors(cache_dir / CACHE_FILE, dict(ids=ids, log_p=log_p, log_tail=log_tail))
    record = {**wanted, "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(cache_dir / RECORD_FILE, record)
    print(f"teacher cache {cache_dir}: {rows:,} windows x {T} positions x top {k}, built in "
          f"{record['seconds']:.1f} s", file=sys.stderr)
    return record


class TeacherCache:
    """A built cache, read into memory and checked against its record; `targets(rows)` gathers rows."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.record = read_json(self.dir / RECORD_FILE, checkpoint.CheckpointError)
        path = self.dir / CACHE_FILE
        t = checkpoint.load_tensors(path)  # one-line CheckpointError if missing or truncated
        rows, T, k = (self.record.get(key) for key in ("rows", "block_size", "top_k"))
        shapes = dict(ids=(rows, T, k), log_p=(rows, T, k), log_tail=(rows, T))
        for name, shape in shapes.items():
            if name not in t or t[name].shape != shape:
                got = t[name].shape if name in t else "missing"
                raise checkpoint.CheckpointError(f"{path}: {name} has shape {got}, its record "
                                                 f"{self.dir / RECORD_FILE} says {shape}; delete the cache")
        self.ids, self.log_p, self.log_tail = t["ids"], t["log_p"], t["log_tail"]

    def targets(self, rows: np.ndarray, y: torch.Tensor) -> CachedTargets:
        """The teacher's targets of grid rows `rows` (b,), on y's device."""
        ids = torch.from_numpy(self.ids[rows].astype(np.int64)).to(y.device)
        log_p = torch.from_numpy(self.log_p[rows]).to(y.device).float()
        return CachedTargets(y, ids, log_p, torch.from_numpy(self.log_tail[rows]).to(y.device))


def open_cache(cache_dir: str | Path, teacher: torch.nn.Module, wanted: dict[str, Any], batch_size: int = 16,
               autocast=None, quiet: bool = False) -> TeacherCache:
    """The cache in cache_dir if its record matches `wanted` (see wanted_record), else built anew."""
    record_path = Path(cache_dir) / RECORD_FILE
    if record_path.is_file():
        why = mismatch(read_json(record_path, checkpoint.CheckpointError), wanted)
        if why is None:
            return TeacherCache(cache_dir)
        print(f"teacher cache {cache_dir} was built with other settings ({why}): rebuilding", file=sys.stderr)
    build(cache_dir, teacher, wanted, batch_size, autocast, quiet)
    return TeacherCache(cache_dir)


class GridLoader(BatchLoader):
    """BatchLoader over the grid: window starts are multiples of block_size (random rows, seeded by
    (seed, step) like BatchLoader's offsets, the same rank sharding), so every window is a cache row."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_rows = (self.n_tokens - 1) // self.block_size

    def rows(self, step: int) -> np.ndarray:
        """Grid rows of this rank's windows at `step`: (batch_size // world_size,)."""
        return self.draw(step, self.n_rows)

    def offsets(self, step: int) -> np.ndarray:
        return self.rows(step) * self.block_size


class CachedRunData(RunData):
    """RunData whose training batches are grid windows with the teacher's cached targets:
    train_batch returns (x, CachedTargets), which DistillTrainer.loss reads."""

    def __init__(self, cfg: TrainConfig, cache: TeacherCache, rank: int = 0, world: int = 1):
        super().__init__(cfg, rank, world)
        self.cache = cache
        self.train = GridLoader(self.dir, cfg.block_size, self.train.batch_size, seed=cfg.seed, rank=rank,
                                world_size=world)

    def train_batch(self, device: torch.device) -> tuple[torch.Tensor, CachedTargets]:
        rows = self.train.rows(self.train.step)  # before next_batch moves to the next step
        x, y = (torch.from_numpy(a).to(device) for a in self.train.next_batch())  # (b, T) int64 each
        return x, self.cache.targets(rows, y)
