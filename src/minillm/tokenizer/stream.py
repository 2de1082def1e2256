"""What every generation loop (PyTorch, JAX, the CLI) does with the ids it produces, framework-free:
turn them into text as they come (`text_pieces`), stop at a stop string (`StopChecker`), and look
up the ids of named special tokens (`special_ids`).
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


def text_pieces(tokens: Iterator[int], tokenizer, stop_strings: Sequence[str] = (),
                stop_token_ids: Sequence[int] = ()) -> Iterator[str]:
    """Token ids -> text pieces through the tokenizer's streaming decoder (never half a UTF-8
    character). Stop tokens are not shown; the text ends before the first stop string, and the
    last len(stop)-1 characters are held back until they cannot be the start of one."""
    to_text, text, shown = tokenizer.stream_decoder(), "", 0
    hold = max((len(s) for s in stop_strings if s), default=1) - 1
    for t in tokens:
        if t in stop_token_ids:
            break
        text += to_text.push(t)
        cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
        if cut >= 0:
            yield text[shown:cut]
            return
        if len(text) - hold > shown:
            yield text[shown:len(text) - hold]
            shown = len(text) - hold
    text += to_text.flush()
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    if cut > shown:
        yield text[shown:cut]


def special_ids(tokenizer, *names: str) -> list[int]:
    """Ids of the named special tokens this tokenizer has (missing ones are skipped)."""
    ids = []
    for name in names:
        try:
            ids.append(tokenizer.special_id(name))
        except (KeyError, AttributeError):
            pass
    return ids
