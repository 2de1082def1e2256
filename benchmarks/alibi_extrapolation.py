"""Length extrapolation (issue 17, ALiBi): the val loss of models trained at context T, evaluated at
T, 2T and 4T on the built-in char corpus's val split. The part `--extrapolation` of
benchmarks/architectures.py (on the runs its part 1 trains) and `--extrapolation-only` (the RoPE
baseline, the sliding window and ALiBi alone); both add a run with sinusoidal positions.

How each model runs past its max_seq_len T: its weights are loaded into the same config with
max_seq_len = L (nothing else changes). ALiBi has no table at all (its biases are -m_h * distance);
RoPE's cos/sin and the sinusoids are tables of a formula, computed here for L positions: the same
formula over more positions, with no interpolation or rescaling of the frequencies (NTK, YaRN).
Learned positions have no rows past T, so they cannot be evaluated there at all.

The loss is minillm.torch.evaluate.perplexity's (what `minillm eval --data` prints) on the first
--eval-tokens of val.bin, cut into windows of L tokens: every token is predicted once, from the
tokens before it in its window, so a longer window means more context per token on average (L / 2):
a model that extrapolates gets a lower loss there, one that does not gets a higher one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from minillm.checkpoint import load_run
from minillm.data.loader import read_tokens
from minillm.torch.evaluate import extend_context, perplexity
from minillm.torch.model import Transformer, load_model

FACTORS = (1, 2, 4)  # evaluated at T, 2T, 4T
SINUSOIDAL = ("sinusoidal", ["model.positions=sinusoidal"])


def extended_model(run: Path, length: int) -> Transformer | None:
    """The run's model over `length` tokens (minillm.torch.evaluate.extend_context, what `minillm eval
    --block-size` uses); None for learned positions asked past the trained length."""
    model = load_model(run)[0]
    if model.config.positions == "learned" and length > model.config.max_seq_len:
        return None
    return extend_context(model, length)


def how_it_extends(run: Path) -> str:
    """The table's last column: what changes past the trained context."""
    config = load_run(run)[0]
    way = {"alibi": "nothing (no table: biases -m_h (i - j))", "learned": "cannot (no rows past T)",
           "rope": "RoPE table extended (same theta)", "sinusoidal": "sinusoid table extended"}
    note = way[config.positions]
    if config.attention_window:
        note += f"; attention spans at most {config.attention_window} tokens"
    if config.attention == "linear":
        note += "; linear attention"
    return note


def val_losses(run: Path, tokens, context: int, batch_size: int = 8) -> dict[int, float | None]:
    """{L: val loss (nats/token) at block L} for L = context x FACTORS; None where it can't run."""
    losses = {}
    for factor in FACTORS:
        length = factor * context
        model = extended_model(run, length)
        losses[length] = None if model is None else perplexity(model, tokens, length, batch_size)["loss"]
    return losses


def measure(runs: list[tuple[str, Path]], train: Callable[[str, list[str], Path], dict], out: Path,
            data_dir: Path, context: int, eval_tokens: int) -> list[dict]:
    """Each (name, run directory) at T, 2T, 4T, after training the sinusoidal run with
    train(name, overrides, run) (architectures.train_variant: the same budget as the others)."""
    name, overrides = SINUSOIDAL
    print(f"{time.strftime('%H:%M:%S')} {name} (for the extrapolation)", flush=True)
    train(name, overrides, out / "v-sinusoidal")
    runs = [*runs, (name, out / "v-sinusoidal")]
    tokens = read_tokens(data_dir / "val.bin")[: eval_tokens + 1]
    rows = []
    for name, run in runs:
        print(f"{time.strftime('%H:%M:%S')} {name} at {', '.join(str(f * context) for f in FACTORS)}",
              flush=True)
        rows.append({"name": name, "losses": val_losses(run, tokens, context), "how": how_it_extends(run)})
    return rows


def table(rows: list[dict], context: int, eval_tokens: int) -> str:
    """The markdown table of the rows of measure()."""
    lengths = [f * context for f in FACTORS]
    head = " | ".join(f"val loss at {n}" + (" (trained)" if n == context else f" ({n // context}x)")
                      for n in lengths)
    lines = [f"| trained at {context} tokens, val loss on the first {eval_tokens:,} val tokens | {head} "
             f"| past the trained context |", "|---|" + "---|" * len(lengths) + "---|"]
    for r in rows:
        cells = " | ".join("n/a" if r["losses"][n] is None else f"{r['losses'][n]:.3f}" for n in lengths)
        lines.append(f"| {r['name']} | {cells} | {r['how']} |")
    return "\n".join(lines)
