"""Export to and import from the Hugging Face `tokenizers` JSON format (`tokenizer.json`).

Nothing here imports `tokenizers`: the format is plain JSON, so exporting needs no extra package.

How our byte-level BPE is expressed in HF's pipeline, so that `Tokenizer.from_file` gives our ids:
- pre-tokenizer = Split(our regex, "Isolated") then ByteLevel(use_regex=False): first the same
  chunks as ours, then each chunk's bytes mapped to printable characters (GPT-2's byte-to-unicode
  table: the printable Latin-1 bytes stand for themselves, the rest are shifted above U+0100);
- model = BPE whose vocabulary is written in that printable alphabet, merges in our order, and
  `ignore_merges=False` (otherwise HF takes a whole chunk that happens to be in the vocabulary
  without merging, which can give different ids from merging by rank);
- decoder = ByteLevel (maps the printable characters back to bytes).

Two documented differences:
- Unicode versions: our split regex runs on the `regex` module (Unicode 17 tables), HF's on
  Oniguruma (older tables). The newest letters and digits (e.g. CJK Extension J, U+323B0..)
  count as letters for us and not for HF, so text containing them may pre-split, and hence
  encode, differently. The letter, number and whitespace classes agree on every code point that
  Python's `unicodedata` knows as assigned (a test checks all of them).
- Special tokens are HF "added tokens", which HF always splits out of the text. Our `encode`
  only does so when the caller allows them (the tiktoken convention), so ids differ on text that
  *contains a special-token string* unless `allowed_special="all"`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from minillm.files import atomic_write_text

if TYPE_CHECKING:
    from minillm.tokenizer.bpe import BPETokenizer
    from minillm.tokenizer.char import CharTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by HF's ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. become U+0100, U+0101, ...
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _added_tokens(special_tokens: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(special_tokens.items(), key=lambda item: item[1])
    ]


def bpe_to_hf_dict(tok: "BPETokenizer") -> dict[str, Any]:
    """The HF `tokenizer.json` content for a `BPETokenizer`."""
    byte_char = bytes_to_unicode()
    names = ["".join(byte_char[b] for b in token) for token in tok.vocab]
    vocab: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in vocab:
            # Two merge paths built the same bytes; HF's vocabulary (string -> id) cannot hold both.
            raise ValueError(f"ids {vocab[name]} and {i} are the same bytes {tok.vocab[i]!r}; not expressible in HF BPE")
        vocab[name] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(tok.special_tokens),
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[names[a], names[b]] for a, b in tok.merges],
        },
    }


def save_bpe_hf(tok: "BPETokenizer", path: Any) -> None:
    """Write `tok` as an HF `tokenizer.json` (atomically)."""
    atomic_write_text(path, json.dumps(bpe_to_hf_dict(tok), ensure_ascii=False, indent=1) + "\n")


def _hf_pattern(data: dict[str, Any], source: str) -> str:
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    raise ValueError(f"{source}: no Split(Regex) pre-tokenizer; only byte-level BPE files written by save_hf load")


def bpe_from_hf_dict(data: dict[str, Any], source: str = "tokenizer.json") -> "BPETokenizer":
    """Rebuild a `BPETokenizer` from HF `tokenizer.json` content of the shape `save_hf` writes.

    Requires ids 0..255 to be the single bytes and merge k to create id 256 + k (our convention);
    other byte-level BPE files (e.g. GPT-2's, whose ids are ordered differently) are refused.
    """
    from minillm.tokenizer.bpe import BPETokenizer

    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: model type {model.get('type')!r} is not BPE")
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = model["vocab"]
    for name, i in vocab.items():
        if i < 256 and (len(name) != 1 or char_byte.get(name) != i):
            raise ValueError(f"{source}: id {i} is {name!r}, not byte {i}; ids 0..255 must be the raw bytes")
    merges = []
    for k, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if vocab.get(left + right) != 256 + k:
            raise ValueError(f"{source}: merge {k} does not create id {256 + k}; not in minillm's id order")
        merges.append((vocab[left], vocab[right]))
    tok = BPETokenizer(_hf_pattern(data, source))
    tok._set_merges(merges)
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tok._set_special_tokens(specials)
    return tok


def save_char_hf(tok: "CharTokenizer", path: Any) -> None:
    """Write a `CharTokenizer` as an HF `tokenizer.json`: one piece per character, WordLevel model.

    Unknown characters map to "<|unk|>" in HF; ours raise unless built with `unk=True`.
    """
    from minillm.tokenizer.char import UNK

    vocab = {c: i for i, c in enumerate(tok.chars)}
    if tok.unk_id is not None:
        vocab[UNK] = tok.unk_id
    vocab.update(tok.special_tokens)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(tok.special_tokens),
        "normalizer": None,
        # [\s\S] matches any single code point, newlines included.
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    }
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
