"""Speculative decoding (Leviathan et al. 2023, Algorithm 1): a small draft model proposes k
tokens, the target checks all of them in one forward pass, and a modified rejection sampling
keeps exactly the target's distribution. Decoding at batch 1 is bound by reading the weights;
one target forward over k+1 tokens costs about as much as over one, and yields 1 .. k+1 tokens.

One round, after the context x (prompt + tokens so far):
    draft:   x_1 ~ q_1, x_2 ~ q_2(. | x_1), ... x_k              k cheap forwards of the draft
    target:  p_1 .. p_{k+1} from ONE forward over [last token of x, x_1 .. x_k]
    verify:  accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order; at the first
             rejection draw from the residual norm(max(0, p_i - q_i)) and end the round; if all k
             pass, draw one more token from p_{k+1}.
Why the target's distribution survives: P(reject) = 1 - sum min(q, p) = sum max(0, p - q), so
    P(token = x) = q(x) min(1, p(x)/q(x)) + P(reject) norm(max(0, p - q))(x) = min(q, p)(x) + max(0, p - q)(x)
                 = p(x).

p and q are the plain sampler's distributions (minillm.torch.sampling: temperature, then top-k,
top-p, min-p), so speculation changes the speed, never what is sampled. Greedy decoding
(temperature 0) is the same rule on one-hot distributions: accept while the draft's token is the
target's argmax; at the first mismatch the residual is the target's argmax. So the greedy output
is the target's own, token for token.

Caches: each model keeps its own keys/values and `length`, how many leading context tokens they
hold. Rolling back after a rejection only shrinks `length`: the slots past it (the rejected
drafts') are hidden by the causal mask (slot = position at batch 1) and overwritten next round.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from minillm.config import cache_length
from minillm.tokenizer.stream import StopChecker
from minillm.torch import packed
from minillm.torch.kv_cache import make_caches
from minillm.torch.packed import PackedCopy, packed_copy
from minillm.torch.sampling import SamplingConfig, mask_padded_vocab, process_logits


class SpeculativeOutput(NamedTuple):
    """tokens: the new ids (as generate returns them); accept_counts[n]: rounds in which n drafted
    tokens were accepted (each round also adds one token of the target's)."""

    tokens: list[int]
    accept_counts: list[int]


class CachedDecoder:
    """One model's side at batch 1: its packed copy, K/V caches of max_len slots, and `length`.
    verify_length: with compile=True, feeds of exactly that many tokens (the target's k + 1) run
    as one compiled multi-token forward; any other feed runs as compiled one-token steps (the
    draft's catch-up, a short last round), so no new shape is ever compiled mid-generation."""

    def __init__(self, model, max_len: int, compile: bool = False, verify_length: int | None = None):
        self.packed = packed_copy(model, compile)
        self.compile, self.verify_length = compile, verify_length
        caches = make_caches(model.config, 1, max_len)
        self.k_caches, self.v_caches = [c.k for c in caches], [c.v for c in caches]
        self.slots = torch.arange(max_len)  # (S,)
        self.length = 0

    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` at slots length .. length+T-1 -> logits (T, V) of the token after each."""
        if len(tokens) == 1 or (self.compile and len(tokens) != self.verify_length):
            return torch.cat([self.step(t) for t in tokens])
        return self.prefill(tokens, compiled=self.compile)

    def step(self, token: int) -> torch.Tensor:
        """One decode step (compiled with compile=True) -> logits (1, V)."""
        s = self.length
        # float bias (1, 1, 1, S): 0 on slots <= s, -inf past them
        bias = torch.zeros(1, 1, 1, len(self.slots)).masked_fill_(self.slots > s, float("-inf"))
        # positions = slots (one row, no padding), sliced from a (1, S) row as BatchCache slices them,
        # so that the compiled step of minillm.torch.generate is reused, not recompiled for new strides
        positions = self.slots[None, s:s + 1]  # (1, 1) of strides (S, 1)
        logits = self.packed(torch.tensor([[token]]), positions, positions[0], bias, self.k_caches,
                             self.v_caches, decode_step=True)
        self.length = s + 1
        return logits

    def prefill(self, tokens: list[int], compiled: bool = False) -> torch.Tensor:
        """Feed T tokens in one forward pass, each query seeing the slots up to its own -> logits (T, V).
        compiled: the compiled multi-token forward (the target's verify pass), else eager."""
        T, s = len(tokens), self.length
        slots = self.slots[s:s + T]  # (T,), also the positions
        mask = (self.slots[None, :] <= slots[:, None])[None, None]  # (1, 1, T, S)
        args = (torch.tensor([tokens]), slots[None], slots, mask, self.k_caches, self.v_caches)
        if compiled:  # all T logits, as the verify graph is compiled (last_only=False)
            logits = verify_step(self.packed)(*args)[0]  # (T, V)
        else:
            logits = self.packed.model(*args, last_only=False)[0]  # (T, V)
        self.length = s + T
        return logits

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens (a no-op when the cache holds fewer)."""
        self.length = min(self.length, length)


def verify_step(copy: PackedCopy):
    """The packed model's forward over T tokens returning all T logits, compiled as a decode step is
    (minillm.torch.packed.compile_decode_step: frozen weights, max-autotune; with k+1 rows its
    matrix products become GEMMs that stream the weights once, where the eager pass costs about
    two decode steps). One static graph per T, compiled on the first call and kept on the packed
    copy, which lives as long as its model's weights do."""
    if copy.compiled_verify_step is None:
        copy.compiled_verify_step = packed.compile_decode_step(copy.model, last_only=False, dynamic=False)
    return copy.compiled_verify_step


def distributions(logits: torch.Tensor, sampling: SamplingConfig, vocab_size: int | None) -> torch.Tensor:
    """logits (T, V) -> the sampler's next-token distributions (T, V): the filters of
    minillm.torch.sampling, then softmax; one-hot at the argmax when greedy."""
    logits = process_logits(mask_padded_vocab(logits, vocab_size), sampling)
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return torch.softmax(logits, dim=-1)


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The modified rejection sampling, for B rounds at once. p (B, k+1, V) the target's
    distributions, q (B, k, V) the draft's, drafted (B, k) the draft's tokens (x_i ~ q_i).
    Returns (n (B,) how many drafted tokens are accepted, next (B,) the token that follows them)."""
    B, k = drafted.shape
    p_x = p[:, :k].gather(-1, drafted[..., None])[..., 0]  # (B, k) p_i(x_i)
    q_x = q.gather(-1, drafted[..., None])[..., 0]  # (B, k) q_i(x_i) > 0: x_i was drawn from q_i
    accept = torch.rand(B, k, generator=generator) < p_x / q_x  # probability min(1, p/q): rand < 1
    n = accept.long().cumprod(-1).sum(-1)  # (B,) accepted before the first rejection
    # Next token: the residual max(0, p_n - q_n) at the first rejection; with q_{k+1} = 0 appended,
    # the same formula gives p_{k+1} itself when all k were accepted.
    q = torch.cat([q, q.new_zeros(B, 1, q.size(-1))], dim=1)  # (B, k+1, V)
    rows = torch.arange(B)
    residual = (p[rows, n] - q[rows, n]).clamp(min=0)  # (B, V)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q up to rounding: a rejection was a rounding fluke
    residual = torch.where(empty, p[rows, n], residual)
    return n, torch.multinomial(residual, 1, generator=generator)[:, 0]  # multinomial normalises


def propose(draft: CachedDecoder, context: list[int], k: int, sampling: SamplingConfig,
            vocab_size: int | None = None,
            generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
    """The draft's k tokens after `context`, one forward each (the first also catches up on the
    context tokens it has not seen: the last one, or the last two after a round that accepted
    all), and their distributions q (k, V); greedy: its argmaxes, and q None (not needed)."""
    drafted, q, feed = [], [], context[draft.length:]
    for _ in range(k):
        logits = draft.forward(feed)[-1:]  # (1, V)
        if sampling.greedy:
            feed = [int(mask_padded_vocab(logits, vocab_size).argmax())]
        else:
            q.append(distributions(logits, sampling, vocab_size))  # (1, V)
            feed = [int(torch.multinomial(q[-1][0], 1, generator=generator))]
        drafted.append(feed[0])
    return drafted, (torch.cat(q) if q else None)


def speculative_round(target: CachedDecoder, draft: CachedDecoder, context: list[int], k: int,
                      sampling: SamplingConfig, vocab_size: int | None = None,
                      generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """One round of Algorithm 1 after `context` (prompt + tokens so far; both caches hold at most
    len(context) - 1 of them). Returns the new tokens (1 .. k+1) and how many drafts were accepted."""
    # 1. The draft proposes k tokens.
    drafted, q = propose(draft, context, k, sampling, vocab_size, generator)
    # 2. The target scores the last context token and every draft in one forward: p_1 .. p_{k+1}.
    logits = target.forward(context[target.length:] + drafted)  # (k+1, V)
    # 3. Accept or reject. Greedy: the rule on one-hot distributions, without building them: accept
    #    while the draft's token is the target's argmax; the next token is the target's argmax.
    if sampling.greedy:
        best = mask_padded_vocab(logits, vocab_size).argmax(-1).tolist()  # (k+1,)
        n = next((i for i in range(k) if drafted[i] != best[i]), k)
        nxt = best[n]
    else:
        p = distributions(logits, sampling, vocab_size)  # (k+1, V)
        q = p.new_zeros(0, p.size(-1)) if q is None else q  # (k, V)
        accepted, token = verify(p[None], q[None], torch.tensor([drafted], dtype=torch.long), generator)
        n, nxt = int(accepted), int(token)
    # 4. Roll both caches back to the accepted tokens.
    for model in (target, draft):
        model.rollback(len(context) + n)
    return drafted[:n] + [nxt], n


@torch.inference_mode()
def speculative_stream(target, draft, prompt_ids, max_new_tokens: int, *, k: int = 4,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       min_p: float | None = None, seed: int | None = None,
                       stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
                       vocab_size: int | None = None,
                       compile: bool = False, accept_counts: list[int] | None = None) -> Iterator[int]:
    """Yield the new ids of one prompt (list[int] / 1-D tensor) as speculative rounds produce them,
    ending with a stop token or the token completing a stop string, as generate_stream does.
    Options as generate's (no repetition penalty, beams or sliding window); k drafts per round.
    accept_counts, when given (a list of k+1 zeros), counts the rounds by drafts accepted."""
    prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} ids) is not the target's "
                         f"({target.config.vocab_size}): speculative decoding needs one tokenizer")
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    sampling = SamplingConfig(temperature, top_k, top_p, min_p)
    max_seq_len = min(target.config.max_seq_len, draft.config.max_seq_len)
    window = cache_length([len(prompt)], max_new_tokens, max_seq_len)
    target = CachedDecoder(target, window, compile, verify_length=k + 1)  # the verify pass: k + 1 tokens
    draft = CachedDecoder(draft, window, compile)
    for model in (target, draft):  # prefill all but the last prompt token: round 1 starts from it
        if len(prompt) > 1:
            model.prefill(prompt[:-1])
    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    checker, stop, context = StopChecker(tokenizer, stop_strings), set(stop_token_ids), list(prompt)
    while len(context) < len(prompt) + max_new_tokens:
        # No more drafts than tokens left to produce: positions stay inside the caches.
        left = len(prompt) + max_new_tokens - len(context)
        new, n = speculative_round(target, draft, context, min(k, left - 1), sampling, vocab_size, generator)
        if accept_counts is not None:
            accept_counts[n] += 1
        context += new
        for t in new:
            yield t
            if t in stop or checker.push(t):
                return


def speculative_generate(target, draft, prompt_ids, max_new_tokens: int, *, k: int = 4,
                         **kwargs) -> SpeculativeOutput:
    """Generate up to max_new_tokens after one prompt with the target's distribution (greedy:
    its exact output), the draft proposing k tokens per round. Options as speculative_stream's.
    Returns SpeculativeOutput(tokens, accept_counts)."""
    counts = [0] * (k + 1)
    tokens = list(speculative_stream(target, draft, prompt_ids, max_new_tokens, k=k, accept_counts=counts,
                                     **kwargs))
    return SpeculativeOutput(tokens, counts)
