"""The docs' figures of tokens, positions and masks, each computed by the project's own code:
BPE vocabulary growth (minillm.tokenizer.bpe), the sinusoidal table and the RoPE rotation
(minillm.torch.layers), ALiBi's biases (minillm.torch.alibi), causal and sliding-window masks
(minillm.torch.layers / masks).

Each figure is two functions: `*_numbers` computes what is drawn (the tests check it against
independent formulas) and `draw_*` (ctx) lays it out and hands it to ctx.save.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from minillm.data.loader import read_meta, read_tokens
from minillm.data.sources import get_source
from minillm.tokenizer import SPECIAL_TOKENS, BPETokenizer, load_tokenizer
from minillm.torch.alibi import alibi_bias, alibi_slopes
from minillm.torch.layers import apply_rope, causal_mask, rope_tables, sinusoidal_table
from minillm.torch.masks import window_mask


def shown(text: str) -> str:
    """A token's text made visible on a plot: spaces as ␣, line breaks as ↵, tabs as →."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "→")


def plt_figure(*args, **kwargs):
    """plt.subplots with the constrained layout (labels, colour bars and titles never overlap)."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, layout="constrained", **kwargs)


# --- BPE: tokens per byte as merges are learned ---------------------------------------------------
def corpus_text(ctx, n_bytes: int) -> str:
    """The first ~n_bytes characters of the corpus: the prepared data directory (work/data, as
    ctx.run() prepares it) decoded back to text, else the built-in Shakespeare source."""
    data = ctx.work / "data"
    if (data / "meta.json").is_file():
        tokenizer, eos = load_tokenizer(data / "tokenizer.json"), read_meta(data).get("eos_id")
        ids = np.asarray(read_tokens(data / "train.bin")[: 2 * n_bytes])
        return tokenizer.decode(int(i) for i in ids if i != eos)[:n_bytes]
    return "".join(islice(get_source("shakespeare").texts(), 1))[:n_bytes]


def bpe_numbers(text: str, n_merges: int, checkpoints: int = 12) -> dict:
    """Train byte-level BPE on `text` (n_merges merges), then re-encode the text with the first k
    merges for k on a log-spaced grid. Returns merges (k values), tokens_per_byte, and top (the
    first 20 merges as (left, right, merged) strings)."""
    trained = BPETokenizer().train(text, 256 + n_merges + len(SPECIAL_TOKENS))
    n = len(trained.merges)
    ks = sorted({0, n, *np.unique(np.geomspace(1, max(n, 1), checkpoints).astype(int)).tolist()})
    n_bytes = len(text.encode("utf-8"))
    per_byte = []
    for k in ks:  # the tokenizer after k merges: the first k of the trained list
        specials = {s: 256 + k + i for i, s in enumerate(SPECIAL_TOKENS.values())}
        partial = BPETokenizer.from_dict({"pattern": trained.pattern, "merges": trained.merges[:k],
                                          "special_tokens": specials})
        per_byte.append(len(partial.encode(text)) / n_bytes)

    def text_of(token_id: int) -> str:
        return trained.token_bytes(token_id).decode("utf-8", errors="replace")

    top = [(text_of(a), text_of(b), text_of(256 + r)) for r, (a, b) in enumerate(trained.merges[:20])]
    return dict(merges=ks, tokens_per_byte=per_byte, top=top, n_bytes=n_bytes)


def draw_bpe_merges(ctx) -> None:
    numbers = bpe_numbers(corpus_text(ctx, 4096 if ctx.quick else 1 << 20), 64 if ctx.quick else 1024)
    fig, (ax, listing) = plt_figure(1, 2, figsize=(11, 4.8), gridspec_kw=dict(width_ratios=(1.6, 1)))
    ax.plot(numbers["merges"], numbers["tokens_per_byte"], "o-")
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="merges learned (vocabulary = 256 bytes + merges)", ylabel="tokens per byte of text",
           title=f"Byte-level BPE on {numbers['n_bytes'] / 1024:,.0f} KiB of the corpus", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    for k, y in zip(numbers["merges"], numbers["tokens_per_byte"]):
        if k == numbers["merges"][-1]:
            ax.annotate(f"{y:.2f} tokens/byte\nafter {k} merges", (k, y), textcoords="offset points",
                        xytext=(-10, -45), ha="right", arrowprops=dict(arrowstyle="->"))
    lines = [f"{r + 1:>2}. {shown(a):>4} + {shown(b):<4} → {shown(m)}"
             for r, (a, b, m) in enumerate(numbers["top"])]
    listing.axis("off")
    listing.set_title("The first 20 merges (␣ = space, ↵ = newline)")
    listing.text(0.05, 0.98, "\n".join(lines), family="monospace", va="top", fontsize=11,
                 transform=listing.transAxes)
    ctx.save(fig, "bpe-merges.png")


# --- positions: the sinusoidal table and the RoPE rotation ----------------------------------------
def draw_positions(ctx) -> None:
    table = sinusoidal_table(128, 64).numpy()  # (T, D)
    fig, (heat, lines) = plt_figure(1, 2, figsize=(12, 4.5), gridspec_kw=dict(width_ratios=(1.3, 1)))
    image = heat.imshow(table, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    fig.colorbar(image, ax=heat, label="PE[p, d]")
    heat.set(xlabel="dimension d (even: sin, odd: cos)", ylabel="position p",
             title="Sinusoidal positions (Vaswani et al. 2017), D = 64")
    for d in (8, 16, 24, 40):
        lines.plot(table[:, d], label=f"d = {d} (wavelength {2 * np.pi * 10000 ** (d / 64):,.0f})")
    lines.set(xlabel="position p", ylabel="PE[p, d]", title="Low dimensions turn fast, high ones slowly")
    lines.legend(loc="lower left", fontsize=8)
    ctx.save(fig, "positions.png")


def rope_numbers(head_dim: int = 16, T: int = 48, seed: int = 0) -> dict:
    """RoPE by the model's own tables: x rotated at each position (pair i of x starts at 45 degrees,
    radius 1 + i/2, so the pairs draw concentric circles), and scores[m, n] = rope(q, m) · rope(k, n)
    for one random q and k: a function of m - n only."""
    cos, sin = rope_tables(T, head_dim)  # (T, hd) each
    generator = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, head_dim, generator=generator)
    radius = 1 + torch.arange(head_dim // 2) / 2
    x = torch.cat((radius, radius)) / 2**0.5
    rotated = [apply_rope(v.expand(1, 1, T, head_dim), cos, sin)[0, 0] for v in (x, q, k)]  # (T, hd) each
    return dict(rotated_x=rotated[0].numpy(), q=q.numpy(), k=k.numpy(),
                scores=(rotated[1] @ rotated[2].T).numpy())  # (T, T)


def draw_rope_rotation(ctx) -> None:
    head_dim, T, shown_positions = 16, 48, 12
    numbers = rope_numbers(head_dim, T)
    fig, (circle, heat, offset) = plt_figure(1, 3, figsize=(16, 5))
    half = head_dim // 2
    for i, colour in zip((0, 2, 4), ("C0", "C1", "C2")):  # pair i = dims (i, i + hd/2)
        xy = numbers["rotated_x"][:shown_positions, [i, i + half]]
        ring = np.linspace(0, 2 * np.pi, 200)
        circle.plot((1 + i / 2) * np.cos(ring), (1 + i / 2) * np.sin(ring), color=colour, lw=0.5, alpha=0.4)
        circle.plot(xy[:, 0], xy[:, 1], "o", color=colour, ms=5,
                    label=f"pair {i}: θ = {10000 ** (-2 * i / head_dim):.3g} rad/position")
        labelled = range(shown_positions) if i == 0 else (0, shown_positions - 1)
        for p in labelled:
            circle.annotate(str(p), xy[p], textcoords="offset points", xytext=(5, 3), fontsize=8,
                            color=colour)
    circle.set(aspect="equal", xlim=(-3.6, 3.6), ylim=(-3.6, 3.6), xlabel="x[i]", ylabel="x[i + hd/2]",
               title=f"One vector at positions 0..{shown_positions - 1}")
    circle.legend(fontsize=8, loc="lower left")
    image = heat.imshow(numbers["scores"], cmap="RdBu_r", origin="lower")
    fig.colorbar(image, ax=heat, label="q · k after RoPE")
    heat.set(xlabel="key position n", ylabel="query position m", title="Score of q at m and k at n")
    for m in (T // 2, T - 1):
        n = np.arange(m + 1)
        offset.plot(m - n, numbers["scores"][m, n], label=f"query at m = {m}", lw=2 if m == T - 1 else 5,
                    alpha=0.6)
    offset.set(xlabel="offset m - n (positions)", ylabel="q · k",
               title="Same offset, same score: only m - n matters")
    offset.legend(fontsize=8)
    fig.suptitle(f"RoPE (Su et al. 2021), head_dim {head_dim}: pair i of a query or key rotates by "
                 "p · θ_i at position p")
    ctx.save(fig, "rope-rotation.png")


# --- ALiBi and the masks --------------------------------------------------------------------------
def alibi_numbers(n_heads: int = 8, T: int = 16) -> dict:
    """ALiBi's slopes and its bias (H, T, T) over the causal triangle (-inf above the diagonal)."""
    slopes = alibi_slopes(n_heads)
    positions = torch.arange(T)
    bias = alibi_bias(slopes, positions, positions)[0]  # (H, T, T)
    bias = bias.masked_fill(~window_mask(positions, positions, None), float("-inf"))
    return dict(slopes=slopes.numpy(), bias=bias.numpy())


def draw_alibi_bias(ctx) -> None:
    n_heads, T = 8, 16
    numbers = alibi_numbers(n_heads, T)
    fig, axes = plt_figure(1, 5, figsize=(17, 3.9), gridspec_kw=dict(width_ratios=(1, 1, 1, 1, 1.3)))
    lowest = numbers["bias"][0][np.isfinite(numbers["bias"][0])].min()
    for ax, h in zip(axes[:4], (0, 1, 3, 7)):
        image = ax.imshow(np.ma.masked_invalid(numbers["bias"][h]), cmap="viridis", vmin=lowest, vmax=0)
        ax.set(title=f"head {h + 1}: m = 1/{1 / numbers['slopes'][h]:.0f}", xlabel="key j", ylabel="query i",
               xticks=range(0, T, 5), yticks=range(0, T, 5))
    fig.colorbar(image, ax=axes[3], label="bias -m·(i - j)")
    distance = np.arange(T)
    for h in range(n_heads):
        axes[4].plot(distance, -numbers["slopes"][h] * distance, label=f"head {h + 1}")
    axes[4].set(xlabel="distance i - j (positions)", ylabel="bias added to the score",
                title="Penalty grows linearly with distance")
    axes[4].legend(fontsize=7, ncol=2)
    fig.suptitle(f"ALiBi (Press et al. 2022), {n_heads} heads: slopes m_h = 2^(-8h/{n_heads}); "
                 "masked (future) keys blank")
    ctx.save(fig, "alibi-bias.png")


def mask_numbers(T: int = 12, window: int = 4, new: int = 4) -> dict:
    """Three masks (True = may attend): causal over T positions, a sliding window of `window` keys,
    and the causal mask of `new` queries decoding after T - new cached keys (bottom-right aligned)."""
    positions = torch.arange(T)
    return dict(causal=causal_mask(T, T).numpy(), window=window_mask(positions, positions, window).numpy(),
                cached=causal_mask(new, T).numpy())


def draw_masks(ctx) -> None:
    T, window, new = 12, 4, 4
    numbers = mask_numbers(T, window, new)
    fig, axes = plt_figure(1, 3, figsize=(14, 4.8), gridspec_kw=dict(width_ratios=(1, 1, 1)))
    titles = {"causal": "Causal: query i sees keys j ≤ i",
              "window": f"Sliding window W = {window}: i - W < j ≤ i",
              "cached": f"{new} new queries after {T - new} cached keys"}
    for ax, (name, title) in zip(axes, titles.items()):
        mask = numbers[name]
        rows = np.arange(T - mask.shape[0], T)  # the queries' positions
        ax.imshow(mask, cmap="Blues", vmin=-0.3, vmax=1.2,
                  extent=(-0.5, T - 0.5, rows[-1] + 0.5, rows[0] - 0.5))
        ax.set(title=title, xlabel="key position j", ylabel="query position i", xticks=range(T), yticks=rows)
        ax.set_aspect("equal")
    fig.suptitle("Attention masks (dark = may attend), from minillm.torch.layers.causal_mask and "
                 "masks.window_mask")
    ctx.save(fig, "masks.png")


FIGURES = {"bpe-merges.png": draw_bpe_merges, "positions.png": draw_positions,
           "rope-rotation.png": draw_rope_rotation, "alibi-bias.png": draw_alibi_bias,
           "masks.png": draw_masks}
