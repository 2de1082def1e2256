# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Tokens: text as a list of integers
#
# A language model never sees letters. It sees integers ("token ids"), one per piece of text, and
# learns which id comes next. The *tokenizer* decides what a piece is. This tutorial builds the two
# tokenizers of minillm by hand and checks each against the library:
#
# 1. **characters**: one id per distinct character (`src/minillm/tokenizer/char.py`, `CharTokenizer`);
# 2. **byte-pair encoding (BPE)**: start from the bytes of UTF-8 and merge the most frequent
#    neighbouring pair, again and again (`src/minillm/tokenizer/bpe.py`, `BPETokenizer`).
#
# Every tutorial runs as a plain script (`python docs/tutorials/01-tokens.py`) or, after
# `jupytext --to notebook`, as a notebook; each `assert` is a check against the library.

# %%
from collections import Counter

import regex

from minillm.tokenizer.base import SPECIAL_TOKENS
from minillm.tokenizer.bpe import GPT4_SPLIT_PATTERN, BPETokenizer
from minillm.tokenizer.char import CharTokenizer

text = ("To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n"
        "Or to take arms against a sea of troubles\n"
        "And by opposing end them. To die, to sleep;\n"
        "No more; and by a sleep to say we end\n"
        "The heart-ache and the thousand natural shocks\n"
        "That flesh is heir to: 'tis a consummation\n"
        "Devoutly to be wish'd. To die, to sleep;\n")
print(len(text), "characters,", len(text.encode("utf-8")), "bytes")

# %% [markdown]
# ## A character tokenizer in four lines
#
# The vocabulary is the sorted set of characters; a character's id is its place in that list.
# minillm appends its *special tokens* (`<|bos|>`, `<|eos|>`, the chat roles, ...) after the
# characters: ids that no text produces, used later to mark where documents and chat turns end.

# %%
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
ids = [stoi[c] for c in text]
print(len(chars), "distinct characters:", "".join(chars).replace("\n", "\\n"))
print("first ids:", ids[:20])

char_tok = CharTokenizer().train(text)
assert char_tok.encode(text) == ids  # the same ids as the library's
assert char_tok.decode(ids) == text  # and decoding is exact
assert char_tok.vocab_size == len(chars) + len(SPECIAL_TOKENS)  # specials come after the characters
print("CharTokenizer agrees; vocab_size", char_tok.vocab_size)

# %% [markdown]
# Characters are simple and never fail on text made of the same characters, but sequences are long
# (one id per character) and a character it has never seen has no id at all. BPE fixes both.
#
# ## Byte-pair encoding by hand
#
# BPE (Sennrich et al. 2016, as used by GPT-2 and LLaMA) starts from the 256 possible bytes, so any
# text can be encoded. Then it *learns merges*: count every adjacent pair of ids, give the most
# frequent pair a new id (256, 257, ...), replace it everywhere, repeat. Two details make the merges
# well defined:
#
# - the text is first split into chunks by a regular expression (GPT-4's pattern: words with their
#   leading space, numbers, punctuation runs, whitespace), and merges never cross a chunk boundary;
# - among pairs with the same count, the smallest `(id1, id2)` wins.

# %%
chunks = Counter(regex.findall(GPT4_SPLIT_PATTERN, text))  # chunk -> how often it occurs
print("some chunks:", list(chunks)[:12])


def merge(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in seq (left to right, no overlaps) by new_id."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


n_merges = 40
words = {chunk: list(chunk.encode("utf-8")) for chunk in chunks}  # chunk -> its ids so far
merges, vocab = [], {b: bytes([b]) for b in range(256)}  # vocab: id -> the bytes it stands for
for k in range(n_merges):
    pairs = Counter()
    for chunk, seq in words.items():
        for pair in zip(seq, seq[1:]):
            pairs[pair] += chunks[chunk]  # a chunk seen 3 times counts its pairs 3 times
    best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties: the smallest pair
    words = {chunk: merge(seq, best, 256 + k) for chunk, seq in words.items()}
    merges.append(best)
    vocab[256 + k] = vocab[best[0]] + vocab[best[1]]
print("first 12 merges:", [vocab[256 + k].decode("utf-8", "replace") for k in range(12)])

# %% [markdown]
# The library's trainer (`learn_merges` in `bpe.py`) gets the same merges with the bookkeeping of
# fast implementations (incremental pair counts, a heap). `vocab_size` counts the 256 bytes, the
# merges and the special tokens.

# %%
bpe = BPETokenizer().train(text, vocab_size=256 + n_merges + len(SPECIAL_TOKENS))
assert bpe.merges == merges
print("BPETokenizer learned the same", len(merges), "merges")

# %% [markdown]
# ## Encoding new text
#
# To encode, split into chunks the same way, then inside each chunk apply the merge that was
# *learned first* among the pairs present, until none applies. Earlier merges are the building
# blocks of later ones, so the order matters.

# %%
rank = {pair: 256 + k for k, pair in enumerate(merges)}  # pair -> the id it became


def encode_by_hand(s: str) -> list[int]:
    out = []
    for chunk in regex.findall(GPT4_SPLIT_PATTERN, s):
        seq = list(chunk.encode("utf-8"))
        while len(seq) > 1:
            pair = min(zip(seq, seq[1:]), key=lambda p: rank.get(p, float("inf")))  # earliest merge
            if pair not in rank:
                break
            seq = merge(seq, pair, rank[pair])
        out += seq
    return out


new_text = "To sleep, perchance to dream: ay, there's the rub; ünïcödé too 🙂"
assert encode_by_hand(new_text) == bpe.encode(new_text)
assert bpe.decode(bpe.encode(new_text)) == new_text  # bytes make every text encodable, emoji too
ids = bpe.encode(text)
print(f"{len(text.encode('utf-8'))} bytes -> {len(ids)} BPE tokens "
      f"({len(text.encode('utf-8')) / len(ids):.2f} bytes per token after {n_merges} merges)")
print([bpe.decode([i]) for i in bpe.encode("To be, or not to be")])

# %% [markdown]
# More merges mean shorter sequences (more text per context window, fewer steps per token) and a
# larger embedding table. `minillm prepare --tokenizer bpe --vocab-size 4096` trains one on a
# whole corpus; the docs' tokens page plots how the sequence shrinks as merges are added.
#
# Next: **02 · Embeddings and positions**, where ids become vectors.
