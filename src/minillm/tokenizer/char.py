"""Character-level tokenizer: one id per Unicode code point seen in the training text.

The simplest tokenizer that works (nanoGPT's shakespeare_char): the vocabulary is the sorted set
of characters in the corpus, then (optionally) an `<unk>` id, then the special tokens. A character
outside the vocabulary is an error naming it, or the `<unk>` id when built with `unk=True`.
"""

from __future__ import annotations

from typing import Any, Iterable

from minillm.tokenizer.base import FORMAT_VERSION, Tokenizer
from minillm.tokenizer.hf import char_to_hf

UNK = "<|unk|>"


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are the corpus' characters in code-point order; special tokens follow.

    >>> tok = CharTokenizer().train("hello")
    >>> tok.decode(tok.encode("hole"))
    'hole'
    """

    type_name = "char"

    def __init__(self, chars: Iterable[str] = (), unk: bool = False) -> None:
        super().__init__()
        self._build(sorted(set(chars)), unk)

    def _build(self, chars: list[str], unk: bool) -> None:
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # <unk> sits between the characters and the special tokens so special ids stay last.
        self.unk_id: int | None = len(chars) if unk else None
        self._add_special_tokens(len(chars) + (1 if unk else 0))

    def train(self, text_or_iter: str | Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        """Build the vocabulary from the characters of a string or an iterable of strings; returns
        `self`. `vocab_size` is accepted so that both tokenizers train through the same call (the
        corpus decides the size; if given, it must be large enough)."""
        texts = [text_or_iter] if isinstance(text_or_iter, str) else text_or_iter
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        self._build(sorted(seen), self.unk_id is not None)
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ValueError(f"corpus needs {self.vocab_size} char ids (specials included), "
                             f"vocab_size={vocab_size}")
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.unk_id is not None) + len(self.special_tokens)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pass
        ids = []
        for position, c in enumerate(text):
            i = self.stoi.get(c, self.unk_id)
            if i is None:
                raise ValueError(f"character {c!r} (U+{ord(c):04X}) at position {position} is not in the "
                                 "vocabulary of this CharTokenizer (build it with unk=True to map unknown "
                                 "characters to <unk>)")
            ids.append(i)
        return ids

    def _token_text(self, token_id: int) -> str:
        if 0 <= token_id < len(self.chars):
            return self.chars[token_id]
        if token_id == self.unk_id:
            return "\ufffd"
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        raise ValueError(f"token id {token_id} out of range (vocab_size={self.vocab_size})")

    def token_bytes(self, token_id: int) -> bytes:
        # surrogatepass: a lone surrogate in the corpus is still one id with some bytes.
        return self._token_text(token_id).encode("utf-8", errors="surrogatepass")

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text (exact: every id is whole characters)."""
        return "".join(self._token_text(int(i)) for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "version": FORMAT_VERSION, "chars": self.chars,
                "unk": self.unk_id is not None, "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharTokenizer":
        tok = cls(data["chars"], unk=bool(data.get("unk")))
        tok._set_special_tokens(data["special_tokens"])
        return tok

    def hf_dict(self) -> dict[str, Any]:
        return char_to_hf(self.chars, self.special_tokens, UNK, self.unk_id)
