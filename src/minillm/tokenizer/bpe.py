"""Byte-level byte-pair encoding (BPE) with regex pre-splitting, trained from scratch.

Conventions (fixed so that any two correct trainers produce the same merges):
- ids 0..255 are the raw bytes; merge number k creates id 256 + k;
- text is first split into chunks by a regex (GPT-4's pattern by default, GPT-2's available);
  merges never cross a chunk boundary;
- each step merges the most frequent adjacent pair; among pairs with equal count the smallest
  `(id1, id2)` wins, so merges do not depend on the order of the text;
- special tokens get the ids after the last merge.

Training (Sennrich et al. 2016) comes twice. First the lesson, `learn_merges_naive`: count every
adjacent pair, merge the most frequent, repeat. Then `learn_merges`, the same merges with the
bookkeeping of fast implementations:
1. *chunk dedup*: identical chunks are counted once (`Counter`), so the work depends on the
   number of distinct chunks, not on the corpus size; the input is streamed.
2. *incremental pair counts*: `pair_counts` and `where` (pair -> chunks containing it) are built
   once; a merge only revisits the chunks that contain the merged pair and applies the change
   in their pair counts, instead of recounting everything.
3. a heap with lazy deletion finds the best pair: an entry is stale when its count no longer
   matches `pair_counts`, and is skipped.

Encoding merges the lowest-rank (earliest-learned) pair first, repeatedly, inside each chunk;
that is also how Hugging Face `tokenizers` applies merges, so an exported tokenizer gives the same
ids. Chunk results are cached, because natural text repeats the same words endlessly.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any, Iterable

import regex

from minillm.tokenizer.base import FORMAT_VERSION, SPECIAL_TOKENS, Tokenizer
from minillm.tokenizer.hf import Pair, bpe_from_hf, bpe_to_hf

# The split patterns of GPT-2 and of GPT-4 (tiktoken's cl100k_base); public constants.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

CACHE_SIZE = 1 << 18  # chunks remembered by encode; cleared when full (bounded memory)


def merge_pair(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, scanning left to right, by `new_id`.

    Occurrences do not overlap: with pair (a, a), [a, a, a] becomes [aa, a].
    """
    first, second = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == first and i + 1 < n and ids[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges_naive(chunk_counts: dict[str, int], n_merges: int) -> list[Pair]:
    """The textbook trainer (minbpe's basic.py): the merges of `learn_merges` below, but every merge
    recounts the whole corpus: O(n_merges x corpus), fine for a lesson, too slow for real text.
    `chunk_counts` maps each pre-split chunk to how often it occurs (its pairs count that often).
    """
    words = [(list(chunk.encode("utf-8")), count) for chunk, count in chunk_counts.items()]
    merges: list[Pair] = []
    for k in range(n_merges):
        pair_counts: Counter[Pair] = Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break  # every chunk is a single token: nothing left to merge
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))  # most frequent; ties: smallest
        words = [(merge_pair(ids, best, 256 + k), count) for ids, count in words]
        merges.append(best)
    return merges


def count_chunks(texts: Iterable[str], pattern: str) -> Counter[str]:
    """Count the distinct pre-split chunks of a stream of texts (each text is split on its own)."""
    split = regex.compile(pattern).findall
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split(text))  # Counter.update on a list runs in C
    return counts


def learn_merges(chunk_counts: dict[str, int], n_merges: int) -> list[Pair]:
    """Learn up to `n_merges` merges from chunk -> count (fewer if no pair is left): the fast trainer,
    with incremental pair counts and a heap (steps 2 and 3 of the module docstring)."""
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + count
            where.setdefault(pair, set()).add(w)
    # Max-heap on count via negation; equal counts pop the smallest pair first (the tie rule).
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(merges) < n_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count or negative_count == 0:
            continue  # stale entry: the count changed after it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        delta = _apply_merge(words, counts, where, pair, new_id)
        for changed, d in delta.items():
            if d:
                pair_counts[changed] = pair_counts.get(changed, 0) + d
                if pair_counts[changed] > 0:
                    heapq.heappush(heap, (-pair_counts[changed], changed))
    return merges


def _apply_merge(words: list[list[int]], counts: list[int], where: dict[Pair, set[int]], pair: Pair,
                 new_id: int) -> dict[Pair, int]:
    """Merge `pair` in the words that contain it; return the change in each pair's count."""
    delta: dict[Pair, int] = {}
    for w in where.pop(pair, ()):
        word = words[w]
        merged = merge_pair(word, pair, new_id)
        if len(merged) == len(word):
            continue  # `where` may list words that lost the pair to an earlier merge
        count = counts[w]
        for old in zip(word, word[1:]):
            delta[old] = delta.get(old, 0) - count
        for new in zip(merged, merged[1:]):
            delta[new] = delta.get(new, 0) + count
            if new_id in new:  # only pairs with the new token can be new to this word
                where.setdefault(new, set()).add(w)
        words[w] = merged
    return delta


class BPETokenizer(Tokenizer):
    """Byte-level BPE: `BPETokenizer().train(text_or_iter, vocab_size)`, then `encode`/`decode`.

    `pattern` is "gpt4" (default), "gpt2" or a regex string for pre-splitting.
    """

    type_name = "bpe"

    def __init__(self, pattern: str = "gpt4") -> None:
        super().__init__()
        self.pattern = SPLIT_PATTERNS.get(pattern, pattern)
        self._split = regex.compile(self.pattern).findall
        self._set_merges([])

    def _set_merges(self, merges: list[Pair]) -> None:
        """Install merges: the rank table for encoding, the byte table for decoding, specials."""
        self.merges: list[Pair] = [tuple(m) for m in merges]  # type: ignore[misc]
        self.ranks: dict[Pair, int] = {}  # pair -> id of the merged token (= 256 + rank)
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]
        for i, pair in enumerate(self.merges):
            new_id = 256 + i
            if not (pair[0] < new_id and pair[1] < new_id):
                raise ValueError(f"merge {i} {pair} uses an id that does not exist yet")
            self.ranks[pair] = new_id
            self.vocab.append(self.vocab[pair[0]] + self.vocab[pair[1]])
        self._add_special_tokens(len(self.vocab))
        self._cache: dict[str, list[int]] = {}

    def train(self, text_or_iter: str | Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn merges so that the vocabulary (256 bytes + merges + special tokens) has
        `vocab_size` ids, or fewer if the corpus runs out of pairs.

        `text_or_iter` is a string or any iterable of strings (e.g. a file's lines or documents);
        it is read once, item by item, and each item is pre-split on its own. Returns `self`.
        """
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            smallest = 256 + len(SPECIAL_TOKENS)
            raise ValueError(f"vocab_size must be at least {smallest} (bytes + special tokens)")
        texts = [text_or_iter] if isinstance(text_or_iter, str) else text_or_iter
        self._set_merges(learn_merges(count_chunks(texts, self.pattern), n_merges))
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def _encode_chunk(self, data: bytes) -> list[int]:
        """Apply merges to one chunk's bytes, lowest rank first, until none applies."""
        ids = list(data)
        ranks = self.ranks
        while len(ids) >= 2:
            # The pair learned earliest; pairs that were never learned rank last.
            best = min(zip(ids, ids[1:]), key=lambda pair: ranks.get(pair, 1 << 62))
            if best not in ranks:
                break
            ids = merge_pair(ids, best, ranks[best])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        cache = self._cache
        ids: list[int] = []
        for chunk in self._split(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk.encode("utf-8", errors="surrogatepass"))
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self.vocab):
            return self.vocab[token_id]
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode("utf-8")
        raise ValueError(f"token id {token_id} out of range (vocab_size={self.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "version": FORMAT_VERSION, "pattern": self.pattern,
                "merges": [list(m) for m in self.merges], "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BPETokenizer":
        tok = cls(data["pattern"])
        tok._set_merges([tuple(m) for m in data["merges"]])
        tok._set_special_tokens(data["special_tokens"])
        return tok

    @classmethod
    def from_file_dict(cls, data: dict[str, Any], source: str) -> "BPETokenizer":
        """Our JSON (`save`), or a Hugging Face tokenizer.json written by `save_hf` (no "type")."""
        if "model" in data and "type" not in data:
            pattern, merges, special_tokens = bpe_from_hf(data, source)
            return cls.from_dict({"pattern": pattern, "merges": merges, "special_tokens": special_tokens})
        return super().from_file_dict(data, source)  # type: ignore[return-value]

    def hf_dict(self) -> dict[str, Any]:
        return bpe_to_hf(self.vocab, self.merges, self.pattern, self.special_tokens)
