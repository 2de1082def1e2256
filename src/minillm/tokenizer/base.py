"""The tokenizer interface shared by every tokenizer: special tokens, encode/decode, JSON save/load.

Subclasses (`CharTokenizer`, `BPETokenizer`) supply how ordinary text becomes ids
(`_encode_ordinary`), the UTF-8 bytes of each id (`token_bytes`) and a JSON-able description of
themselves (`to_dict`). Everything else lives here once:

- **Special tokens** (`bos`, `eos`, `pad` and the chat roles) are appended after the ordinary
  vocabulary. Following tiktoken, a special-token string inside ordinary text is encoded as
  ordinary text unless the caller allows it via `allowed_special`; an allowed special token is
  always exactly one id. This is what keeps user-typed "<|user|>" from forging a chat turn.
- **Roles**: a tokenizer imported from another library keeps that library's special-token texts
  (`<|endoftext|>`, `</s>`, `<|im_end|>` ...), so an optional role map says which of them plays
  bos, eos and pad (saved as `"roles"`, e.g. {"eos": "<|endoftext|>"}; eos may list several
  tokens, all of which end generation). `special_id("eos")` consults it before `SPECIAL_TOKENS`;
  our own tokenizers have no map, and their files are unchanged.
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

# The roles a role map may assign (the chat roles stay minillm's own tokens: minillm.tokenizer.chat).
TOKEN_ROLES = ("bos", "eos", "pad")

FORMAT_VERSION = 1


class Tokenizer:
    """Base class; `special_tokens` maps each special-token string (e.g. "<|eos|>") to its id."""

    type_name: ClassVar[str] = ""  # the "type" field of the saved JSON

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {}
        self.roles: dict[str, list[str]] = {}  # role -> the special tokens playing it (see set_roles)

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

    def set_roles(self, roles: dict[str, str | list[str]] | None, source: str = "roles") -> None:
        """Say which special tokens play bos / eos / pad: {"eos": "<|endoftext|>"} or, for several
        (all end generation; the first is `special_id("eos")`), {"eos": ["<|im_end|>", "<|endoftext|>"]}.
        ValueError naming `source` (the file) and the role for anything else."""
        if roles is not None and not isinstance(roles, dict):
            raise ValueError(f"{source}: roles must be an object like {{\"eos\": \"</s>\"}}, "
                             f"got {roles!r:.80}")
        checked: dict[str, list[str]] = {}
        for role, tokens in (roles or {}).items():
            if role not in TOKEN_ROLES:
                raise ValueError(f"{source}: unknown role {role!r}; roles are {', '.join(TOKEN_ROLES)}")
            tokens = [tokens] if isinstance(tokens, str) else tokens
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
                raise ValueError(f"{source}: role {role!r} must name a token or a non-empty list of tokens, "
                                 f"got {tokens!r:.80}")
            unknown = [t for t in tokens if t not in self.special_tokens]
            if unknown:
                raise ValueError(f"{source}: role {role!r} names {unknown[0]!r}, which is not a special "
                                 "token of this tokenizer")
            checked[role] = list(dict.fromkeys(tokens))
        self.roles = checked

    def special_token(self, name: str) -> str | None:
        """Text of the special token given by role/name ("eos") or by text; None if there is none."""
        token = self.roles[name][0] if name in self.roles else SPECIAL_TOKENS.get(name, name)
        return token if token in self.special_tokens else None

    def special_id(self, name: str) -> int:
        """Id of a special token given by role/name ("eos": the role map's token, else "<|eos|>") or
        by text; KeyError if the tokenizer has none."""
        token = self.special_token(name)
        if token is None:
            raise KeyError(f"unknown special token {name!r}; known: {sorted(self.special_tokens)}")
        return self.special_tokens[token]

    def role_ids(self, name: str) -> list[int]:
        """Every id playing role `name` (eos: all the tokens that end generation); [] if none."""
        if name in self.roles:
            return [self.special_tokens[t] for t in self.roles[name]]
        token = self.special_token(name)
        return [] if token is None else [self.special_tokens[token]]

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    # --- encode / decode ------------------------------------------------------------------------
    def _allowed(self, allowed_special: str | Iterable[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        allowed = {self.special_token(name) or name for name in allowed_special}
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
        """Write the tokenizer as JSON (atomically) to `path`; a role map, if any, as `"roles"`."""
        data = self.to_dict()
        if self.roles:
            data["roles"] = {role: tokens[0] if len(tokens) == 1 else tokens
                             for role, tokens in self.roles.items()}
        _write_json(path, data)

    def save_hf(self, path: str | os.PathLike) -> None:
        """Export to Hugging Face `tokenizers` JSON, which gives the same ids (but see `tokenizer.hf`)."""
        _write_json(path, self.hf_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer saved by `save` (for `BPETokenizer`, also an exported HF tokenizer.json)."""
        return cls.from_file_dict(read_json(path), str(path))

    @classmethod
    def from_file_dict(cls, data: dict[str, Any], source: str) -> "Tokenizer":
        """`from_dict` after checking the `"type"` field, plus the role map (checked); `source`
        names the file in errors."""
        if data.get("type") != cls.type_name:
            found = data.get("type")
            raise ValueError(f"{source}: expected a {cls.type_name!r} tokenizer, found type {found!r}")
        tokenizer = cls.from_dict(data)
        tokenizer.set_roles(data.get("roles"), source)
        return tokenizer


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
