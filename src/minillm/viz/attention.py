"""Pictures of a model's inside, numpy in, matplotlib figure out: the attention maps of a text
(a grid, layers x heads, tokens on both axes) and its logit lens (layers x positions, each cell the
top next-token guess coloured by its probability). minillm.torch.introspect computes the arrays;
`minillm attention` / `minillm lens` and the docs' figures (viz/fig_inspect.py) draw them here.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from minillm.diagnose import token_label
from minillm.files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def _cell_inches(n_tokens: int) -> float:
    """Side of one T x T map: room for a token label per row/column (about 0.17 in at 8 pt)."""
    return max(2.4, 0.17 * n_tokens)


def attention_grid(weights: np.ndarray, tokens: Sequence[str], layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, title: str | None = None):
    """A figure of attention maps: weights (L, H, T, T) as from introspect.attention_maps, tokens the
    T token texts; one panel per chosen layer (rows) and head (columns), titled "layer i head j",
    queries down, keys across, all on one colour scale 0..1 with a colour bar."""
    L, H, T, _ = weights.shape
    layers = list(range(L)) if layers is None else list(layers)
    heads = list(range(H)) if heads is None else list(heads)
    labels = [token_label(t) for t in tokens]
    plt = _pyplot()
    side = _cell_inches(T)
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False, layout="constrained",
                             figsize=(side * len(heads) + 1.5, side * len(layers) + 0.8))
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=10)
            ax.set_xticks(range(T), labels if r == len(layers) - 1 else [""] * T, rotation=90, fontsize=8)
            ax.set_yticks(range(T), labels if c == 0 else [""] * T, fontsize=8)
            if r == len(layers) - 1:
                ax.set_xlabel("key (token attended to)")
            if c == 0:
                ax.set_ylabel("query (token attending)")
    fig.colorbar(image, ax=axes, shrink=min(1.0, 6.0 / (side * len(layers))), aspect=30,
                 label="attention weight")
    fig.suptitle(title or "attention weights per layer and head (rows sum to 1)")
    return fig


def lens_figure(rows: Sequence[str], tokens: Sequence[str], guesses: Sequence[Sequence[str]],
                probs: np.ndarray, title: str | None = None):
    """The logit lens as a heat map: rows (R,) layer names, tokens (T,) the text, guesses (R, T) the
    top guess at each cell and probs (R, T) its probability. The top axis shows the token that
    really comes next; a guess that matches it is drawn in bold."""
    R, T = probs.shape
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * T + 2.0), 0.5 * R + 2.2), layout="constrained")
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    following = list(tokens[1:]) + [None]  # the token after each position (none after the last)
    for r in range(R):
        for t in range(T):
            match = following[t] is not None and guesses[r][t] == following[t]
            ax.text(t, r, token_label(guesses[r][t]), ha="center", va="center", fontsize=10,
                    fontweight="bold" if match else "normal", color="white" if probs[r, t] > 0.6 else "black")
    ax.set_yticks(range(R), rows)
    ax.set_xticks(range(T), [token_label(t) for t in tokens], fontsize=9)
    ax.set_xlabel("input token at each position")
    ax.set_ylabel("residual stream read after")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(T), [token_label(t) if t is not None else "?" for t in following], fontsize=9)
    top.set_xlabel("token that really comes next (bold guess = right)")
    fig.colorbar(image, ax=ax, label="probability of the top guess")
    ax.set_title(title or "logit lens: the top next-token guess after each layer", pad=30)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure as a PNG (dpi 100) atomically, and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
