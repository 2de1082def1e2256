"""Continuous batching: one decode loop serving many requests over one batched KV cache.

The cache has max_batch rows of max_seq_len slots per layer. A generated sequence (one `n` choice
of a request) owns one row from admission to its end; its keys/values live in that row only and
its positions count from 0, so it computes exactly what it would compute alone (temperature 0:
the same tokens as minillm.torch.generate.generate, whatever else is in the batch).

Each turn of the loop, between two decode steps:
    admit     waiting sequences take the free rows (first come, first served);
    prefill   at most prefill_chunk prompt tokens, oldest sequence first (several short prompts
              share a step), so a long prompt delays the running streams by one chunk per step,
              never by its whole length;
    decode    one token for every row whose prompt is in: each row writes its key/value at its
              own slot (its own length) and attends to its own slots only;
    finish    a sequence that produced a stop token / stop string / its max_tokens frees its row
              at once, and so does one cancelled by its client (checked every turn).
The loop runs in a thread of its own; results go out through each sequence's `emit` callback.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from minillm.tokenizer.stream import TextDeltas
from minillm.torch.kv_cache import make_caches
from minillm.torch.packed import packed_copy
from minillm.torch.sampling import SamplingConfig, mask_padded_vocab, sample_next

_ORDER = itertools.count()  # admission order: the oldest prefilling sequence goes first


class QueueFull(Exception):
    """The engine's waiting queue is at its limit (the server answers 429)."""


@dataclass(eq=False)
class GenSequence:
    """One generated sequence and its row state. emit(kind, payload) is called from the loop's
    thread: ("delta", (text, token_id, logprobs)) per token, then ("finish", reason) once, reason one
    of "stop" (stop token or string), "length" (max_tokens), "error: ..." (the step failed).
    logprobs: None, or k >= 0 for (the token's log-probability, [(id, logprob)] of the k most
    likely) in each delta: the model's distribution, before temperature and top-p."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[str, object], None]
    stop_token_ids: Sequence[int] = ()
    text: TextDeltas | None = None
    seed: int | None = None
    logprobs: int | None = None
    row: int = -1
    length: int = 0  # cache slots filled: prompt tokens prefilled, then generated tokens fed back
    pending: int = -1  # the last sampled token, fed to the next decode step
    generated: int = 0
    order: int = 0
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)


class Engine:
    """The decode loop of one model. submit() and cancel() may be called from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 64):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = self.config.max_seq_len
        vocab = getattr(tokenizer, "vocab_size", self.config.vocab_size)
        self.vocab_size = vocab if vocab < self.config.vocab_size else None  # a padded table's ids
        self.packed = packed_copy(model)
        caches = make_caches(self.config, max_batch, self.max_len)  # (max_batch, K, S, hd) per layer
        self.k_caches, self.v_caches = [c.k for c in caches], [c.v for c in caches]
        self.rows: list[GenSequence | None] = [None] * max_batch
        self.waiting: deque[GenSequence] = deque()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.generated = self.cancelled = 0  # totals since start: tokens, sequences cut short by clients

    # --- the API of the HTTP side (any thread) ----------------------------------------------------
    def submit(self, seqs: list[GenSequence]) -> None:
        """Queue sequences (all or none): QueueFull when the queue would exceed max_queue."""
        for s in seqs:
            if not 0 < len(s.prompt) < self.max_len or s.max_tokens < 1:
                raise ValueError(f"a sequence needs 1 to {self.max_len - 1} prompt tokens and "
                                 f"max_tokens >= 1, got {len(s.prompt)} and {s.max_tokens}")
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (limit {self.max_queue})")
            for s in seqs:
                if s.seed is not None:
                    s.generator = torch.Generator().manual_seed(s.seed)
                self.waiting.append(s)
            self.lock.notify()

    def cancel(self, seqs: list[GenSequence]) -> None:
        """The client is gone: the loop frees these sequences' rows before its next step."""
        with self.lock:
            for s in seqs:
                s.cancelled = True
            self.lock.notify()

    def stats(self) -> dict:
        with self.lock:
            return {"max_batch": self.max_batch, "free_slots": self.rows.count(None),
                    "waiting": len(self.waiting), "max_queue": self.max_queue,
                    "generated_tokens": self.generated, "cancelled": self.cancelled}

    @property
    def free_slots(self) -> int:
        return self.stats()["free_slots"]

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.closed = False
            self.thread = threading.Thread(target=self._loop, name="minillm-engine", daemon=True)
            self.thread.start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        for s in [*self.waiting, *filter(None, self.rows)]:
            self._finish(s, "error: the server is shutting down")
        self.waiting.clear()

    # --- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                self._schedule()
                while not self.closed and not any(self.rows):
                    self.lock.wait()
                    self._schedule()
                if self.closed:
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a failed step ends its sequences, never the server
                for s in filter(None, self.rows):
                    self._finish(s, f"error: {type(e).__name__}: {e}")

    def _schedule(self) -> None:
        """(Under the lock) drop cancelled sequences, then give free rows to waiting ones."""
        for s in [s for s in self.rows if s is not None and s.cancelled]:
            self.rows[s.row] = None
            self.cancelled += 1
        self.cancelled += sum(s.cancelled for s in self.waiting)
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for r in range(self.max_batch):
            if self.rows[r] is None and self.waiting:
                s = self.rows[r] = self.waiting.popleft()
                s.row, s.length, s.order = r, 0, next(_ORDER)

    def _step(self) -> None:
        """Prefill chunks (prefill_chunk prompt tokens in all, oldest first), then one decode step."""
        budget = self.prefill_chunk
        for s in sorted((s for s in self.rows if s is not None and s.prefilling), key=lambda s: s.order):
            budget -= self._prefill_chunk(s, budget)
            if budget == 0:
                break
        decoding = [s for s in self.rows if s is not None and not s.prefilling and s.pending >= 0]
        if decoding:
            self._decode(decoding)

    def _prefill_chunk(self, s: GenSequence, budget: int) -> int:
        """The next prompt tokens of s (at most budget) into its row; after the last, its first
        token. Returns how many tokens it prefilled."""
        start, end = s.length, min(s.length + budget, len(s.prompt))
        new = torch.arange(start, end)  # (T,) slots = positions
        causal = torch.arange(end)[None, :] <= new[:, None]  # (T, end)
        r = s.row
        logits = self.packed(torch.tensor([s.prompt[start:end]]), new[None], new, causal[None, None],
                             [k[r:r + 1, :, :end] for k in self.k_caches],
                             [v[r:r + 1, :, :end] for v in self.v_caches])  # (1, V)
        s.length = end
        if not s.prefilling:
            self._sample([s], logits)
        return end - start

    def _decode(self, decoding: list[GenSequence]) -> None:
        """One token for each decoding sequence. Rows 0..hi-1 run as one batch; rows not decoding
        (free or mid-prefill) write a dummy key/value at their own length, a slot their next real
        write overwrites before anything reads it, and attend to slot 0 only."""
        occupied = [s for s in self.rows if s is not None]
        hi = max(s.row for s in occupied) + 1
        S = max(s.length for s in occupied) + 1  # the slots any row of this step can touch
        lengths = torch.zeros(hi, 1, dtype=torch.long)  # (hi, 1) each row's next slot = its position
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        is_decoding = torch.zeros(hi, 1, dtype=torch.bool)
        for s in occupied:
            lengths[s.row] = s.length
        for s in decoding:
            tokens[s.row], is_decoding[s.row] = s.pending, True
        slots = torch.arange(S)  # (S,)
        attend = torch.where(is_decoding, slots <= lengths, slots == 0)  # (hi, S): own tokens so far
        bias = torch.zeros(hi, 1, 1, S).masked_fill_(~attend[:, None, None], float("-inf"))
        logits = self.packed(tokens, lengths, lengths, bias, [k[:hi, :, :S] for k in self.k_caches],
                             [v[:hi, :, :S] for v in self.v_caches])  # (hi, V)
        for s in decoding:
            s.length += 1
        self._sample(decoding, logits[[s.row for s in decoding]])

    def _sample(self, seqs: list[GenSequence], logits: torch.Tensor) -> None:
        """Each sequence's next token from its logits row (B, V), with its own sampling settings."""
        logits = mask_padded_vocab(logits, self.vocab_size)
        wanted = any(s.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits.float(), dim=-1) if wanted else None  # (B, V)
        for i, (s, row_logits) in enumerate(zip(seqs, logits)):
            generators = None if s.generator is None else [s.generator]
            token = int(sample_next(row_logits[None], s.sampling, None, generators)[0])
            info = None
            if s.logprobs is not None:
                top = torch.topk(logprobs[i], s.logprobs)
                info = (float(logprobs[i, token]), list(zip(top.indices.tolist(), top.values.tolist())))
            self._accept(s, token, info)

    def _accept(self, s: GenSequence, token: int, logprobs=None) -> None:
        s.generated += 1
        self.generated += 1
        if token in s.stop_token_ids:  # not part of the text: no logprobs either
            s.emit("delta", ("", token, None))
            return self._finish(s, "stop")
        delta, stopped = s.text.push(token) if s.text is not None else ("", False)
        s.emit("delta", (delta, token, logprobs))
        if stopped:
            return self._finish(s, "stop")
        if s.generated >= s.max_tokens or s.length >= self.max_len:
            return self._finish(s, "length")
        s.pending = token

    def _finish(self, s: GenSequence, reason: str) -> None:
        if s.text is not None:  # the held-back end of the text (nothing after a stop string)
            rest = s.text.finish()
            if rest:
                s.emit("delta", (rest, -1, None))
        with self.lock:
            if 0 <= s.row < self.max_batch and self.rows[s.row] is s:
                self.rows[s.row] = None
        s.emit("finish", reason)
