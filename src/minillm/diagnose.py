"""What `minillm sample --diagnose` reports about a generated text: how sure the model was of each
token (entropy) and whether the output has fallen into a loop (the same span over and over).

Entropy H(p) = -Σ p log2 p of the model's next-token distribution, in bits: 0 when one token has
all the mass, log2(V) when all V tokens are equally likely; a sharp rise marks where the model is
guessing. Loops: greedy or low-temperature decoding of a small model often ends repeating a short
span ("the the the", "I am. I am."); find_loop names the shortest span that ends the output at
least min_repeats times in a row. Framework-free: probabilities come as numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

MIN_REPEATS = 3   # a span seen three times in a row at the end is a loop ...
MIN_TOKENS = 8    # ... once the repeats cover at least this many tokens ("..." alone is not one)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """(..., V) probabilities -> (...,) entropy in bits, -Σ p log2 p (0 log 0 = 0), in float64."""
    p = np.asarray(probs, dtype=np.float64)
    logs = np.log2(np.where(p > 0, p, 1.0))  # p = 0 terms contribute 0
    return -(p * logs).sum(axis=-1)


@dataclass(frozen=True)
class Loop:
    """From output token `start` on, the output is `span` over and over: `repeats` whole copies,
    then, when `partial`, the start of one more (where generation stopped)."""
    span: tuple[int, ...]
    repeats: int
    start: int
    partial: bool = False

    def as_dict(self, decode: Callable[[list[int]], str]) -> dict:
        return {"span": decode(list(self.span)), "span_tokens": list(self.span), "repeats": self.repeats,
                "start": self.start, "partial": self.partial}


def periodic_start(tokens: Sequence[int], period: int) -> int:
    """The earliest index s from which `tokens` repeats with this period to its end
    (tokens[i] == tokens[i + period] for every i >= s); len(tokens) - period at least."""
    s = len(tokens) - period
    while s > 0 and tokens[s - 1] == tokens[s - 1 + period]:
        s -= 1
    return s


def find_loop(tokens: Sequence[int], min_repeats: int = MIN_REPEATS,
              min_tokens: int = MIN_TOKENS) -> Loop | None:
    """The shortest span that the output ends by repeating at least min_repeats whole times in a
    row (the repeating stretch at least min_tokens long), read from where the repetition starts;
    None when there is none. E.g. [5, 1, 2, 1, 2, 1, 2, 1, 2, 1] with min_repeats=3, min_tokens=6:
    span (1, 2), repeats 4, start 1, partial (the final 1 starts a fifth copy)."""
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be >= 2 (one copy is no repetition), got {min_repeats}")
    tokens = list(tokens)
    for period in range(1, len(tokens) // min_repeats + 1):  # shortest first
        start = periodic_start(tokens, period)
        length = len(tokens) - start  # the repeating stretch
        if length // period >= min_repeats and length >= min_tokens:
            return Loop(tuple(tokens[start:start + period]), length // period, start, length % period > 0)
    return None


def loop_warning(loop: Loop, decode: Callable[[list[int]], str], label: str = "the output") -> str:
    """One line naming the repeated span, e.g. "warning: sample 1 loops: ' the fair' repeated 4 times
    (and a part) from output token 11 to its end (9 tokens each)"."""
    span, n = decode(list(loop.span)), len(loop.span)
    return (f"warning: {label} loops: {span!r} repeated {loop.repeats} times{' (and a part)' * loop.partial} "
            f"from output token {loop.start} to its end ({n} token{'s' if n > 1 else ''} each)")


def token_label(piece: str) -> str:
    """A token's text made visible on one line: a space as '␣', a line break as '↵' (as in the docs'
    figures), tabs and carriage returns escaped; '∅' for a token with no text."""
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "\\t").replace("\r", "\\r") or "∅"


def entropy_report(pieces: Sequence[str], entropy: Sequence[float], width: int = 100) -> str:
    """Per-token entropy as wrapped lines of 'token:bits' cells, after a summary line."""
    if not len(entropy):
        return "entropy: no generated tokens"
    e = np.asarray(entropy, dtype=np.float64)
    hi = int(e.argmax())
    lines = [f"entropy (bits; 0 = certain): mean {e.mean():.2f}, max {e[hi]:.2f} at output token {hi} "
             f"({token_label(pieces[hi])!r})"]
    line = ""
    for piece, bits in zip(pieces, e):
        cell = f"{token_label(piece)}:{bits:.2f}"
        if line and len(line) + 1 + len(cell) > width:
            lines.append(line)
            line = ""
        line = f"{line} {cell}" if line else cell
    return "\n".join(lines + [line])


def diagnose(probs: np.ndarray, output: Sequence[int], decode: Callable[[list[int]], str],
             label: str = "the output", min_repeats: int = MIN_REPEATS, min_tokens: int = MIN_TOKENS) -> dict:
    """The diagnosis of one generated output: probs (len(output), V) the model's distribution at
    each of its tokens (minillm.torch.introspect.next_token_probs). Returns a JSON-ready dict:
    tokens (ids), pieces (their texts), entropy (bits per token), loop (find_loop's, or None) and
    warning (loop_warning's line naming `label`, or None)."""
    output = [int(t) for t in output]
    loop = find_loop(output, min_repeats, min_tokens)
    return {"tokens": output, "pieces": [decode([t]) for t in output],
            "entropy": [round(float(e), 4) for e in entropy_bits(probs)],
            "loop": loop.as_dict(decode) if loop else None,
            "warning": loop_warning(loop, decode, label) if loop else None}


def diagnosis_text(diagnosis: dict) -> str:
    """The lines `minillm sample --diagnose` prints under a sample: entropies, then any loop warning."""
    lines = [entropy_report(diagnosis["pieces"], diagnosis["entropy"])]
    return "\n".join(lines + ([diagnosis["warning"]] if diagnosis["warning"] else []))
