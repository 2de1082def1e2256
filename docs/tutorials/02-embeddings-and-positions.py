# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Embeddings and positions: ids become vectors that know where they are
#
# The first layer of the model turns each token id into a vector of `d_model` numbers: row `id`
# of a learned table, the *token embedding* (`tok_emb` in `src/minillm/torch/model.py`).
# Attention (tutorial 03) compares tokens with each other but has no notion of order by itself,
# so the model must also be told *where* each token sits. minillm has four ways, chosen by
# `ModelConfig.positions`:
#
# - `"learned"` (GPT-2): a second learned table, one row per position, added to the embedding;
# - `"sinusoidal"` (Vaswani et al. 2017): a fixed table of sines and cosines, added likewise;
# - `"rope"` (Su et al. 2021, LLaMA): nothing is added; queries and keys are *rotated* inside attention;
# - `"alibi"` (Press et al. 2022): nothing is added; attention scores get a distance penalty.
#
# We build the embedding lookup, the sinusoidal table and the RoPE rotation by hand and check each
# against `src/minillm/torch/layers.py` and the model.

# %%
import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.config import SINUSOID_SCALE, ModelConfig
from minillm.torch.alibi import alibi_bias, alibi_slopes
from minillm.torch.layers import apply_rope, rope_tables, sinusoidal_table
from minillm.torch.model import Transformer

torch.manual_seed(0)

# %% [markdown]
# ## The token embedding is a table lookup
#
# Looking up row `id` is the same as multiplying a one-hot vector by the table, which is why the
# table is trained by gradient descent like any other weight matrix.

# %%
config = ModelConfig(vocab_size=50, max_seq_len=32, d_model=16, n_layers=1, n_heads=2, positions="sinusoidal")
model = Transformer(config)
tokens = torch.tensor([[3, 14, 15, 9, 2, 6]])  # (B=1, T=6)

one_hot = F.one_hot(tokens, config.vocab_size).float()  # (1, 6, 50)
by_hand = one_hot @ model.tok_emb.weight  # (1, 6, 16)
assert_close(by_hand, model.tok_emb(tokens))
print("embedding of token 3, first 4 of 16 numbers:", model.tok_emb.weight[3, :4].detach().numpy().round(4))

# %% [markdown]
# ## Sinusoidal positions by hand
#
# Position `p` gets, in dimensions `2i` and `2i+1`, `sin(p / 10000^(2i/D))` and
# `cos(p / 10000^(2i/D))`: a clock with `D/2` hands turning at geometrically spaced speeds. Fast
# hands tell neighbours apart, slow hands tell the beginning from the end.
#
# The table's values reach 1, while the token embeddings start near 0.02 (GPT-2's init). Added as
# they are, the positions would drown the tokens, so the model adds the table times
# `SINUSOID_SCALE` = 0.02 (`src/minillm/config.py` says why; the paper instead multiplies the
# embeddings by `sqrt(D)` to put both at one scale).

# %%
D, T = config.d_model, config.max_seq_len
table = torch.zeros(T, D, dtype=torch.float64)
for p in range(T):
    for i in range(D // 2):
        angle = p / 10000 ** (2 * i / D)
        table[p, 2 * i] = math.sin(angle)
        table[p, 2 * i + 1] = math.cos(angle)

assert_close(table.float(), sinusoidal_table(T, D))
scaled = SINUSOID_SCALE * table.float()
assert_close(scaled, model.sin_table)  # the model holds it as a fixed buffer, not a parameter
# The model's first step: token embeddings plus the scaled rows for positions 0..T-1.
assert_close(model.embed(tokens, None), model.tok_emb(tokens) + scaled[: tokens.size(1)])
print("sinusoidal table matches; position 1, first 6 dims:", table[1, :6].numpy().round(3))

# %% [markdown]
# ## RoPE: rotate queries and keys by an angle proportional to the position
#
# RoPE splits each attention head's `hd` dimensions into `hd/2` pairs and rotates pair `i` of a
# token at position `p` by the angle `p · θ^(-2i/hd)` (θ = 10000). minillm pairs dimension `i` with
# dimension `i + hd/2` (the "rotate-half" layout of Hugging Face's LLaMA). A 2-D rotation by angle
# `a` maps `(x, y)` to `(x cos a - y sin a, x sin a + y cos a)`.

# %%
hd, theta = 8, 10000.0
x = torch.randn(1, 1, T, hd, dtype=torch.float64)  # (B, heads, T, hd): one head's queries


def rope_by_hand(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for p in range(x.size(2)):
        for i in range(hd // 2):
            a = p * theta ** (-2 * i / hd)
            u, v = x[..., p, i], x[..., p, i + hd // 2]  # the pair (i, i + hd/2)
            out[..., p, i] = u * math.cos(a) - v * math.sin(a)
            out[..., p, i + hd // 2] = u * math.sin(a) + v * math.cos(a)
    return out


cos, sin = rope_tables(T, hd, theta)  # (T, hd) each: what the model keeps as buffers
assert_close(rope_by_hand(x).float(), apply_rope(x.float(), cos, sin))
print("apply_rope = the rotation by hand")

# %% [markdown]
# Why rotate? The score of query `q` at position `m` against key `k` at position `n` is the dot
# product of the rotated vectors, and rotating both by angles proportional to `m` and `n` leaves
# only the *difference* `m - n`: attention sees relative positions, with no table to outgrow.

# %%
q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)


def rotated_score(m: int, n: int) -> float:
    seq = torch.zeros(1, 1, T, hd, dtype=torch.float64)
    seq[0, 0, m], seq[0, 0, n] = q, k  # (m != n below) q at position m, k at position n
    r = rope_by_hand(seq)[0, 0]
    return float(r[m] @ r[n])


scores = [rotated_score(m, m - 3) for m in (3, 10, 20, 31)]  # always 3 apart
assert max(scores) - min(scores) < 1e-9
print("q·k at offset 3, four absolute positions:", [round(s, 6) for s in scores])

# %% [markdown]
# In the model, `Transformer.rope` picks the rows of `rope_cos` / `rope_sin` for the positions and
# `Attention.forward` applies them to q and k (`layers.py`). ALiBi (`src/minillm/torch/alibi.py`)
# skips rotations too: head `h` adds `-m_h · (i - j)` to the score of query `i` for key `j`, with
# fixed slopes `m_h = 2^(-8h/H)`.

# %%
rope_model = Transformer(ModelConfig(vocab_size=50, max_seq_len=T, d_model=16, n_layers=1, n_heads=2,
                                     positions="rope"))
assert_close(rope_model.rope_cos, cos)
slopes = alibi_slopes(4)
assert_close(slopes, torch.tensor([2 ** (-8 * h / 4) for h in range(1, 5)]))
positions = torch.arange(5)
bias = alibi_bias(slopes, positions, positions)  # (1, H, T, S)
assert_close(bias[0, 1, 4, 0], -slopes[1] * 4)  # head 1, query 4, key 0: four steps back
print("ALiBi bias of head 0 (query rows, key columns):\n", (bias[0, 0] + 0.0).numpy())  # + 0.0: no -0.

# %% [markdown]
# The docs' positions page draws the sinusoidal table and the RoPE rotation from these same
# functions. Next: **03 · Attention**, where queries meet keys.
