"""The tokenizer interface shared by every tokenizer: special tokens, encode/decode, JSON save/load.

Subclasses (`CharTokenizer`, `BPETokenizer`) supply how ordinary text becomes ids
(`_encode_ordinary`), the UTF-8 bytes of each id (`token_bytes`) and a JSON-able description of
themselves (`to_dict`). Everything else lives here once:

- **Special tokens** (`bos`, `eos`, `pad` and the chat roles) are appended after the ordinary
  vocabulary. Following tiktoken, a special-token string inside ordinary text is encoded as
  ordinary text unless the caller allows it via `allowed_special`; an allowed special token is
  always exactly one id. This is what keeps user-typed "<|user|>" from forging a chat turn.
- **Decoding** joins token bytes and decodes them as UTF-8: an id sequence that cuts a character
  in half decodes to U+FFFD instead of raising, and `StreamDecoder` holds back the bytes of an
  unfinished character until the next token completes it, so a chat UI never prints half of one.
- **Files** are JSON (never pickle) with a `"type"` field, written atomically.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, ClassVar, Iterable

import regex

from minillm.files import atomic_write_text, read_json

# Names callers use -> the strings that appear in text. Order fixes their ids (after the vocabulary).
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}

FORMAT_VERSION = 1


class Tokenizer:
    """Base class; `special_tokens` maps each special-token string (e.g. "<|eos|>") to its id."""

    type_name: ClassVar[str] = ""  # the "type" field of the saved JSON

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {}

    # --- what a subclass provides -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; ids are 0 .. vocab_size - 1."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes of one id (for a byte-level BPE id, possibly part of a character)."""
        raise NotImplementedError

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text that is to contain no special tokens."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, including `"type": self.type_name`."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tokenizer":
        """Inverse of `to_dict`."""
        raise NotImplementedError

    def hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `tokenizer.json` content (built by `minillm.tokenizer.hf`)."""
        raise NotImplementedError

    # --- special tokens -----------------------------------------------------------------------
    def _add_special_tokens(self, first_id: int) -> None:
        """Give every special token in `SPECIAL_TOKENS` an id, starting at `first_id`."""
        self._set_special_tokens({s: first_id + i for i, s in enumerate(SPECIAL_TOKENS.values())})

    def _set_special_tokens(self, special_tokens: dict[str, int]) -> None:
        self.special_tokens = dict(special_tokens)
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}

    def special_id(self, name: str) -> int:
        """Id of a special token given by name ("eos") or by string ("<|eos|>")."""
        token = SPECIAL_TOKENS.get(name, name)
        if token not in self.special_tokens:
            raise KeyError(f"unknown special token {name!r}; known: {sorted(self.special_tokens)}")
        return self.special_tokens[token]

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    # --- encode / decode ------------------------------------------------------------------------
    def _allowed(self, allowed_special: str | Iterable[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        allowed = {SPECIAL_TOKENS.get(name, name) for name in allowed_special}
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise KeyError(f"unknown special tokens {sorted(unknown)}")
        return allowed

    def encode(self, text: str, allowed_special: str | Iterable[str] = "none") -> list[int]:
        """Text -> ids. `allowed_special` is "none" (default: special-token strings are ordinary
        text), "all", or a collection of special-token names/strings that become single ids."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        # Longest first, so that a special token that is a prefix of another never wins.
        alternatives = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        ids: list[int] = []
        # With a capturing group, split() returns ordinary text at even and specials at odd indices.
        for i, part in enumerate(regex.split(f"({alternatives})", text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 (a cut character) decode to U+FFFD."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A `StreamDecoder` for decoding ids one chunk at a time (e.g. while sampling)."""
        return StreamDecoder(self)

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically) to `path`."""
        _write_json(path, self.to_dict())

    def save_hf(self, path: str | os.PathLike) -> None:
        """Export to Hugging Face `tokenizers` JSON, which gives the same ids (but see `tokenizer.hf`)."""
        _write_json(path, self.hf_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer saved by `save` (for `BPETokenizer`, also an exported HF tokenizer.json)."""
        return cls.from_file_dict(read_json(path), str(path))

    @classmethod
    def from_file_dict(cls, data: dict[str, Any], source: str) -> "Tokenizer":
        """`from_dict` after checking the `"type"` field; `source` names the file in errors."""
        if data.get("type") != cls.type_name:
            found = data.get("type")
            raise ValueError(f"{source}: expected a {cls.type_name!r} tokenizer, found type {found!r}")
        return cls.from_dict(data)


def _write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


class StreamDecoder:
    """Decode ids incrementally without ever emitting half a UTF-8 character.

    A byte-level token can end inside a multi-byte character (an emoji is 4 bytes and may span
    several tokens); Python's incremental UTF-8 decoder buffers such a tail until the next bytes
    complete it, so `"".join(push(chunk) for chunk in chunks) + flush()` == `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the text that is now complete (possibly "")."""
        if isinstance(ids, int):
            ids = [ids]
        data = b"".join(self.tokenizer.token_bytes(int(i)) for i in ids)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is left (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
