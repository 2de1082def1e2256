"""Tokenizers built from scratch: character-level and byte-level BPE, one interface.

- `base.py`:   the interface (special tokens, encode/decode, streaming decode, JSON save/load)
- `char.py`:   `CharTokenizer`, one id per character
- `bpe.py`:    `BPETokenizer`, byte-level BPE with regex pre-splitting (GPT-2 / GPT-4 patterns);
               the naive count-and-merge trainer first, then the fast incremental one
- `hf.py`:     Hugging Face `tokenizers` JSON <-> plain dicts (imports neither char.py nor bpe.py)
- `stream.py`: what decoders do with generated ids: stop strings, text pieces, special ids

`load_tokenizer(path)` reads any tokenizer file we write (a run directory's `tokenizer.json`).
"""

from __future__ import annotations

import os

from minillm.files import read_json
from minillm.tokenizer.base import SPECIAL_TOKENS, StreamDecoder, Tokenizer
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.char import CharTokenizer

TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}

__all__ = [
    "SPECIAL_TOKENS", "BPETokenizer", "CharTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer",
]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a JSON file, dispatching on its `"type"` field ("char" or "bpe").

    A Hugging Face `tokenizer.json` written by `save_hf` (no `"type"`, a `"model"` instead) loads
    as a `BPETokenizer`. A directory is taken to hold `tokenizer.json`.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    data = read_json(path)
    kind = data.get("type")
    if kind is None and "model" in data:
        kind = "bpe"  # a Hugging Face tokenizer.json written by save_hf
    if kind not in TOKENIZER_TYPES:
        raise ValueError(
            f"{path}: unknown tokenizer type {kind!r}; expected one of {sorted(TOKENIZER_TYPES)}"
        )
    return TOKENIZER_TYPES[kind].from_file_dict(data, str(path))
