"""What every generation loop (PyTorch, JAX, the CLI) does with the ids it produces, framework-free:
turn them into text as they come (`TextDeltas` pushed, `text_pieces` pulled), stop at a stop string
(`StopChecker`), and look up the ids of named special tokens (`special_ids`).
"""

from __future__ import annotations

from typing import Iterator, Sequence


class StopChecker:
    """Has the decoded text of one row come to contain a stop string? Fed one id at a time."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated ids")
        self.to_text = tokenizer.stream_decoder() if self.stop_strings else None  # ids -> text
        self.text = ""

    def push(self, token_id: int) -> bool:
        if not self.stop_strings:
            return False
        piece = self.to_text.push(token_id)
        self.text += piece
        tail = self.text[-(max(map(len, self.stop_strings)) + len(piece)):]
        return any(s in tail for s in self.stop_strings)


class TextDeltas:
    """The text of one generated sequence, pushed one id at a time (a server's decode loop) and
    shown as deltas: never half a UTF-8 character (the tokenizer's stream decoder); the text ends
    before the first stop string, and the last len(stop) - 1 characters are held back until they
    cannot be the start of one."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.to_text = tokenizer.stream_decoder()
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text, self.shown = "", 0

    def _cut(self) -> int:
        """Where the first stop string starts in the text so far, or -1."""
        return min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one id -> (text that can be shown now, whether a stop string has appeared)."""
        self.text += self.to_text.push(token_id)
        cut = self._cut()
        if cut >= 0:
            return self._show(cut), True
        return self._show(len(self.text) - self.hold), False

    def finish(self) -> str:
        """The held-back rest, once generation has ended for another reason than a stop string."""
        self.text += self.to_text.flush()
        cut = self._cut()
        return self._show(len(self.text) if cut < 0 else cut)

    def _show(self, end: int) -> str:
        if end <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown:end], end
        return delta


def text_pieces(tokens: Iterator[int], tokenizer, stop_strings: Sequence[str] = (),
                stop_token_ids: Sequence[int] = ()) -> Iterator[str]:
    """Token ids -> text pieces (TextDeltas, pulled): stop tokens are not shown and end the text,
    as does the first stop string."""
    deltas = TextDeltas(tokenizer, stop_strings)
    for t in tokens:
        if t in stop_token_ids:
            break
        piece, stopped = deltas.push(t)
        if piece:
            yield piece
        if stopped:
            return
    rest = deltas.finish()
    if rest:
        yield rest


def special_ids(tokenizer, *names: str) -> list[int]:
    """Ids of the named special tokens this tokenizer has (missing ones are skipped)."""
    ids = []
    for name in names:
        try:
            ids.extend(tokenizer.role_ids(name))  # every token of the role (an imported eos list)
        except AttributeError:
            pass
    return ids
