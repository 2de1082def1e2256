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
# # 03 · Attention: every token looks back at the tokens before it
#
# Attention (Vaswani et al. 2017) is how a token gathers information from others. Each token's
# vector `x` is projected three ways: a **query** `q` (what am I looking for?), a **key** `k`
# (what do I contain?) and a **value** `v` (what do I pass on?). Token `i` scores every token `j`
# with `q_i · k_j / sqrt(hd)`, turns the scores into weights with a softmax, and takes the
# weighted average of the values. With `H` heads this happens `H` times in parallel on slices of
# `hd = d_model / H` dimensions, and an output projection mixes the heads back together.
#
# A language model must not peek at the future it is trained to predict, so token `i` may only
# attend to tokens `j <= i`: the **causal mask**. The library's version is `Attention` in
# `src/minillm/torch/layers.py` (the readable formula is `attention_math`; the fast path calls
# PyTorch's fused `scaled_dot_product_attention`).

# %%
import math

import torch
from torch.testing import assert_close

from minillm.config import ModelConfig
from minillm.torch.layers import Attention
from minillm.torch.masks import window_mask

torch.manual_seed(0)
config = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, bias=False)
attn = Attention(config).eval()
x = torch.randn(2, 6, config.d_model)  # (B=2 sequences, T=6 tokens, D=32)

# %% [markdown]
# ## Attention in ten lines
#
# The weights are the module's own (`attn.q.weight` is `(out, in)`, PyTorch's convention, so
# `x @ W.T` applies it). When there are fewer key/value heads than query heads (grouped-query
# attention, below) each K/V head is shared by a group of query heads.

# %%
def attention_by_hand(x, attn, n_heads, n_kv_heads):
    B, T, D = x.shape
    hd = D // n_heads
    q = (x @ attn.q.weight.T).view(B, T, n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
    k = (x @ attn.k.weight.T).view(B, T, n_kv_heads, hd).transpose(1, 2)  # (B, K, T, hd)
    v = (x @ attn.v.weight.T).view(B, T, n_kv_heads, hd).transpose(1, 2)  # (B, K, T, hd)
    k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=1) for t in (k, v))  # (B, H, T, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, T, T): query rows, key columns
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # True where key j <= query i
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (B, H, T, T), rows sum to 1
    y = (weights @ v).transpose(1, 2).reshape(B, T, D)  # heads side by side again: (B, T, D)
    return y @ attn.o.weight.T, weights


y, weights = attention_by_hand(x, attn, config.n_heads, config.n_kv_heads)
assert_close(y, attn(x))  # the fused kernel's answer
y_lib = attn(x, keep_weights=True)  # the readable path, which keeps the weights for plots
assert_close(weights, attn.last_weights)
assert_close(y, y_lib)
print("attention by hand = layers.Attention; weights of head 0, sequence 0:")
print(weights[0, 0].detach().numpy().round(2))

# %% [markdown]
# The upper triangle is zero (the mask) and every row sums to one (the softmax). The first token
# can only attend to itself. The mask is what makes training efficient: one forward pass over `T`
# tokens gives `T` predictions, each made as if the future did not exist yet. Let us check that:
# changing the last token must not change any earlier output.

# %%
x_changed = x.clone()
x_changed[:, -1] = torch.randn(config.d_model)
with torch.no_grad():
    before, after = attn(x), attn(x_changed)
assert_close(before[:, :-1], after[:, :-1])  # positions 0..T-2 never saw the last token
assert not torch.allclose(before[:, -1], after[:, -1])
print("changing token 5 changes only output 5")

# %% [markdown]
# ## Grouped-query attention (GQA)
#
# During generation every layer caches the keys and values of past tokens (tutorial 06). GQA
# (Ainslie et al. 2023, used by LLaMA 2/3 and Mistral) keeps fewer K/V heads than query heads
# (`n_kv_heads`), so the cache shrinks by `n_heads / n_kv_heads`. The K and V projections shrink
# with it; the formula above handles it with `repeat_interleave`.

# %%
gqa_config = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         bias=False)
gqa = Attention(gqa_config).eval()
print("q weight", tuple(gqa.q.weight.shape), "k weight", tuple(gqa.k.weight.shape))  # (32, 32), (16, 32)
y_gqa, _ = attention_by_hand(x, gqa, gqa_config.n_heads, gqa_config.n_kv_heads)
assert_close(y_gqa, gqa(x))
print("GQA by hand = layers.Attention with n_kv_heads=2")

# %% [markdown]
# ## Other masks
#
# The mask is data, so variants are one line: a *sliding window* (Mistral) lets each query see
# only the last `attention_window` keys. `src/minillm/torch/masks.py` builds the model's mask
# from the positions of queries and keys; with a window of 3 on 6 tokens:

# %%
positions = torch.arange(6)
mask = window_mask(positions, positions, window=3)  # (T, S): True = may attend
expected = torch.tensor([[j <= i and i - j < 3 for j in range(6)] for i in range(6)])
assert torch.equal(mask, expected)
print(mask.int().numpy())

# %% [markdown]
# `minillm attention --run RUN --text "..." --out maps.png` draws these weights for every layer
# and head of a trained model. Next: **04 · The block and the model**.
