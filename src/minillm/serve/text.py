"""Token ids -> the text a client is sent, one id at a time: the streaming form of
minillm.tokenizer.stream.text_pieces (same rules, pushed instead of pulled, because the ids of a
served request arrive from the decode loop one step at a time)."""

from __future__ import annotations

from typing import Sequence


class TextDeltas:
    """The text of one generated sequence as deltas. Never half a UTF-8 character (the
    tokenizer's stream decoder); the text ends before the first stop string, and the last
    len(stop) - 1 characters are held back until they cannot be the start of one."""

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
