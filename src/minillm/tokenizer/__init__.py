"""Tokenizers built from scratch: character-level and byte-level BPE, one interface.

base.py (the interface, special tokens), char.py, bpe.py (the naive trainer, then the fast one),
hf.py (Hugging Face tokenizer.json <-> plain dicts), stream.py (stop strings, text pieces).
`load_tokenizer(path)` reads any tokenizer file we write (a run directory's `tokenizer.json`).
"""

from __future__ import annotations

import os

from minillm.files import read_json
from minillm.tokenizer.base import SPECIAL_TOKENS, StreamDecoder, Tokenizer
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.char import CharTokenizer

TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}

__all__ = ["SPECIAL_TOKENS", "BPETokenizer", "CharTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer JSON file (or a directory's `tokenizer.json`), dispatching on its `"type"`;
    a Hugging Face `tokenizer.json` written by `save_hf` (a `"model"`, no `"type"`) loads as BPE."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    data = read_json(path)
    kind = data.get("type")
    if kind is None and "model" in data:
        kind = "bpe"
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"{path}: unknown tokenizer type {kind!r}; "
                         f"expected one of {sorted(TOKENIZER_TYPES)}")
    return TOKENIZER_TYPES[kind].from_file_dict(data, str(path))
