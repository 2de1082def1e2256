"""Autoregressive generation with a KV cache: prefill the prompt once, then decode token by token.

    prefill:  the whole (left-padded) prompt in one forward pass (or in chunks) fills the caches
              and gives the logits of the first new token.
    decode:   one token per row per step; its keys/values join the caches, its logits pick the
              next token (minillm.torch.sampling: greedy, temperature, top-k, top-p, min-p, ...).

Batched prompts of different lengths are left-padded: row b's pad slots are masked out of every
attention and its positions start at 0 at its first real token, so each row computes what it
would compute alone. `generate` returns ids; `generate_stream` yields them one by one and
`stream_text` yields text through the tokenizer's streaming decoder.
"""

from __future__ import annotations

import weakref
from typing import Iterator, Sequence

import torch
from minillm.tokenizer.stream import StopChecker, text_pieces
from minillm.torch.decode import PackedModel
from minillm.torch.kv_cache import make_caches
from minillm.torch.sampling import SamplingConfig, mask_padded_vocab, sample_next

_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {compile: (fingerprint, Decoder)}


# --- the packed model, built once per set of weights ------------------------------------------------
class Decoder:
    """A model's PackedModel, and with compile=True its torch.compile'd decode step.

    The weight layout differs between the two (minillm.torch.decode), so each mode packs its own."""

    def __init__(self, model, compile: bool = False):
        self.packed = PackedModel(model, out_in=compile).eval()
        self.compile = compile
        self.compiled = None

    def __call__(self, *args, decode_step: bool = False) -> torch.Tensor:
        """PackedModel.forward(*args); the compiled version for decode steps when compiling."""
        if not (self.compile and decode_step):
            return self.packed(*args)
        if self.compiled is None:
            self.compiled = compile_decoder(self.packed)
        return self.compiled(*args)


def compile_decoder(packed: PackedModel):
    """torch.compile a decode step: one full graph, written-out attention (it fuses), and
    matrix-vector products as row-wise reductions (minillm.torch.decode). For batched decoding
    (several rows per product) max-autotune picks C++ micro-GEMMs over frozen, prepacked
    weights. Compiles on the first call, and again for each new batch size / cache length."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(packed, fullgraph=True, options={"max_autotune": True, "coordinate_descent_tuning": True})

    def step(*args) -> torch.Tensor:
        # Freezing is on for these calls only (it is not honoured as a compile option); left on
        # globally it would also freeze any other graph compiled later without gradients.
        before, inductor_config.freezing = inductor_config.freezing, True
        try:
            return compiled(*args, last_only=True, manual_attention=True)
        finally:
            inductor_config.freezing = before

    return step


def get_decoder(model, compile: bool = False) -> Decoder:
    """The Decoder of `model` for this mode, rebuilt only when its weights changed (training,
    load_state_dict)."""
    tensors = list(model.parameters()) + list(model.buffers())
    fingerprint = tuple((t.data_ptr(), t._version) for t in tensors)
    cached = _PACKED.setdefault(model, {}).get(compile)
    if cached is None or cached[0] != fingerprint:
        with torch.inference_mode(False), torch.no_grad():
            cached = (fingerprint, Decoder(model, compile))
        _PACKED[model][compile] = cached
    return cached[1]


# --- one batch of sequences being generated -------------------------------------------------------
class Sequences:
    """B rows sharing preallocated caches: which slots hold real tokens, each slot's position.

    Row b is left-padded by pad[b] slots, which no query ever attends to, and its positions
    count from its first real token, so it computes exactly what it would compute alone.
    """

    def __init__(self, decoder: Decoder, max_len: int, vocab_size: int, track_seen: bool = False):
        self.decoder, self.max_len, self.vocab_size = decoder, max_len, vocab_size
        self.track_seen = track_seen
        self.slots = torch.arange(max_len)  # (S,)

    def prefill(self, prompts: list[list[int]], chunk_size: int | None = None) -> torch.Tensor:
        """(Re)start the caches with these prompts, left-padded. Returns next logits (B, V)."""
        B, L = len(prompts), max(len(p) for p in prompts)
        caches = make_caches(self.decoder.packed.config, B, self.max_len)
        self.k_caches, self.v_caches = [c.k for c in caches], [c.v for c in caches]
        pad = torch.tensor([L - len(p) for p in prompts])  # (B,)
        tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts])  # (B, L)
        self.valid = self.slots[None, :] >= pad[:, None]  # (B, S): not a pad slot
        self.positions = (self.slots[None, :] - pad[:, None]).clamp(min=0)  # (B, S) position per slot
        if self.track_seen:  # tokens of each row's context, for the repetition penalty
            self.seen = torch.zeros(B, self.vocab_size, dtype=torch.bool)
            for b, p in enumerate(prompts):
                self.seen[b, p] = True
        step = chunk_size or L
        for start in range(0, L, step):
            end = min(start + step, L)
            causal = self.slots[None, :] <= self.slots[start:end, None]  # (T, S), bottom-right aligned
            mask = (self.valid[:, None, :] & causal).unsqueeze(1)  # (B, 1, T, S)
            logits = self.decoder(tokens[:, start:end], self.positions[:, start:end], self.slots[start:end],
                                  mask, self.k_caches, self.v_caches)
        self.length = L
        # (B, 1, 1, S) attention bias of a decode step: 0 on real tokens so far, -inf elsewhere
        self.bias = torch.zeros(B, 1, 1, self.max_len).masked_fill_(~(self.valid & (self.slots < L))[:, None, None], float("-inf"))
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row, tokens (B,). Returns next logits (B, V)."""
        s = self.length
        if self.track_seen:
            self.seen[torch.arange(len(tokens)), tokens] = True
        self.bias[..., s] = 0.0  # slot s now holds a real token of every row
        logits = self.decoder(tokens[:, None], self.positions[:, s:s + 1], self.slots[s:s + 1], self.bias,
                              self.k_caches, self.v_caches, decode_step=True)
        self.length = s + 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B',) in that order (beam search: the hypotheses that survive a step)."""
        self.k_caches = [k.index_select(0, rows) for k in self.k_caches]
        self.v_caches = [v.index_select(0, rows) for v in self.v_caches]
        self.valid, self.positions, self.bias = self.valid[rows], self.positions[rows], self.bias[rows]
        if self.track_seen:
            self.seen = self.seen[rows]

    @property
    def full(self) -> bool:
        return self.length >= self.max_len


# --- the decoding loop ---------------------------------------------------------------------------
def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """A prompt (list of ids / 1-D tensor) or a batch of them -> (list of lists, was_single)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) and not isinstance(prompt_ids[0], (list, tuple)):
        return [list(map(int, prompt_ids))], True
    return [list(map(int, p)) for p in prompt_ids], False


def _cache_length(model, prompts: list[list[int]], max_new_tokens: int, context_overflow: str) -> int:
    """Cache slots needed; a clear error (or a sliding window when asked) past max_seq_len."""
    if context_overflow not in ("error", "slide"):
        raise ValueError(f"context_overflow must be 'error' or 'slide', got {context_overflow!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    longest, limit = max(len(p) for p in prompts), model.config.max_seq_len
    if longest + max_new_tokens <= limit:
        return longest + max_new_tokens
    if context_overflow == "error":
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"max_seq_len={limit}; shorten the prompt, ask for fewer tokens, or use a sliding window "
            f"(context_overflow='slide' / --sliding-window)"
        )
    return limit


def _generators(seed, batch: int) -> list[torch.Generator] | None:
    """One RNG per row: seed int -> every row seeded alike (as if generated alone); list -> per row."""
    if seed is None:
        return None
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.inference_mode()
def token_steps(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                stop_token_ids: Sequence[int] = (), seed=None, vocab_size: int | None = None,
                context_overflow: str = "error", prefill_chunk_size: int | None = None,
                compile: bool = False) -> Iterator[list[int]]:
    """The core loop: yields the next token of every row (B ints) once per step. Stops after
    max_new_tokens steps or when every row has produced a stop token. (Finished rows keep
    running in the batch; callers drop what follows their stop token.)"""
    window = _cache_length(model, prompts, max_new_tokens, context_overflow)
    seqs = Sequences(get_decoder(model, compile), window, model.config.vocab_size,
                     track_seen=sampling.repetition_penalty not in (None, 1.0))
    generators = _generators(seed, len(prompts))
    stop, done = set(stop_token_ids), [False] * len(prompts)
    history = [p[-window:] for p in prompts]  # kept only for the sliding window
    logits = seqs.prefill(history, prefill_chunk_size)
    for step in range(max_new_tokens):
        logits = mask_padded_vocab(logits, vocab_size)
        tokens = sample_next(logits, sampling, seqs.seen if seqs.track_seen else None, generators)  # (B,)
        ids = tokens.tolist()
        yield ids
        done = [d or t in stop for d, t in zip(done, ids)]
        if all(done) or step == max_new_tokens - 1:
            return
        if context_overflow == "slide":
            history = [(h + [t])[-window:] for h, t in zip(history, ids)]
        if seqs.full:  # sliding window: re-encode the last max_seq_len tokens of every row
            logits = seqs.prefill(history, prefill_chunk_size)
        else:
            logits = seqs.decode(tokens)


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: int | Sequence[int] | None = None, vocab_size: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, context_overflow: str = "error",
             prefill_chunk_size: int | None = None, compile: bool = False):
    """Generate up to max_new_tokens after a prompt, or after each prompt of a batch.

    prompt_ids: list[int] / 1-D tensor -> returns list[int]; a list of prompts -> list[list[int]]
    (only the new tokens; a row ends with the stop token or the token that completed a stop
    string, when one came). temperature 0 is greedy; top_k / top_p / min_p / repetition_penalty
    filter as in minillm.torch.sampling. stop_strings need `tokenizer`. seed: an int seeds every
    row alike (row b equals generating that prompt alone), a list seeds row by row. vocab_size:
    the tokenizer's vocabulary when the model's is padded (default: the tokenizer's, when one
    is given); ids from vocab_size on are never generated. num_beams > 1: beam search
    (minillm.torch.beam). context_overflow: "error" past max_seq_len, or "slide" to keep
    conditioning on the last max_seq_len tokens. compile: torch.compile the decode step.
    """
    prompts, single = _as_batch(prompt_ids)
    if vocab_size is None and getattr(tokenizer, "vocab_size", model.config.vocab_size) < model.config.vocab_size:
        vocab_size = tokenizer.vocab_size  # the model's table is padded: never emit the padding ids
    if num_beams > 1:
        from minillm.torch.beam import beam_search

        out = [beam_search(model, p, max_new_tokens, num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_ids=stop_token_ids, vocab_size=vocab_size)
               for p in prompts]
        return out[0] if single else out
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    checkers = [StopChecker(tokenizer, stop_strings) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens in token_steps(model, prompts, max_new_tokens, sampling, stop_token_ids, seed, vocab_size,
                              context_overflow, prefill_chunk_size, compile):
        for b, t in enumerate(tokens):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_token_ids or checkers[b].push(t)
        if all(done):
            break
    return out[0] if single else out


def generate_stream(model, prompt_ids, max_new_tokens: int, **kwargs) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (same options as generate)."""
    stop_ids = kwargs.pop("stop_token_ids", ())
    checker = StopChecker(kwargs.pop("tokenizer", None), kwargs.pop("stop_strings", ()))
    sampling = SamplingConfig(*(kwargs.pop(k, d) for k, d in (("temperature", 1.0), ("top_k", None), ("top_p", None),
                                                                ("min_p", None), ("repetition_penalty", None))))
    prompts, _ = _as_batch(prompt_ids)
    for tokens in token_steps(model, prompts[:1], max_new_tokens, sampling, stop_ids, **kwargs):
        t = tokens[0]
        yield t
        if t in stop_ids or checker.push(t):
            return


def stream_text(model, tokenizer, prompt_ids, max_new_tokens: int, **kwargs) -> Iterator[str]:
    """Yield text pieces of one prompt's continuation as they are produced (see text_pieces)."""
    stop_strings = list(kwargs.pop("stop_strings", ()))
    tokens = generate_stream(model, prompt_ids, max_new_tokens, tokenizer=tokenizer, stop_strings=stop_strings, **kwargs)
    return text_pieces(tokens, tokenizer, stop_strings, kwargs.get("stop_token_ids", ()))
