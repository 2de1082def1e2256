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
# # 04 · The block and the model
#
# A Transformer is a stack of identical **blocks**. Each block does two things, each wrapped in a
# normalisation and a residual connection ("pre-norm", as in GPT-2 and LLaMA):
#
#     x = x + attention(norm(x))      tokens exchange information (tutorial 03)
#     x = x + mlp(norm(x))            each token is transformed on its own
#
# The residual `x + ...` lets every block add a small correction to a running "residual stream"
# instead of rewriting it, which is what makes deep stacks trainable. The model is then
# embeddings (tutorial 02), `n_layers` blocks, a final norm and the `lm_head`, which turns each
# position's vector into one score (a *logit*) per vocabulary entry for the next token.
#
# Here the LLaMA-style parts: RMSNorm, SwiGLU and RoPE. `Block` is in `src/minillm/torch/layers.py`,
# `Transformer` in `src/minillm/torch/model.py`.

# %%
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.config import MODEL_PRESETS, ModelConfig
from minillm.torch.model import Transformer

torch.manual_seed(0)
config = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     norm="rmsnorm", positions="rope", mlp="swiglu")
model = Transformer(config).eval()
with torch.no_grad():  # move every weight off its initial value (norm gains start at exactly 1)
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
tokens = torch.randint(0, config.vocab_size, (2, 10))  # (B, T)
print(model)  # the modules, with the canonical parameter names of DESIGN.md

# %% [markdown]
# ## The parts of a block
#
# **RMSNorm** (Zhang & Sennrich 2019) rescales each vector to unit root-mean-square and multiplies
# by a learned gain; unlike LayerNorm it does not subtract the mean and has no bias.
# **SwiGLU** (Shazeer 2020) is the MLP of LLaMA: two projections up to `d_ff`, one of them passed
# through SiLU and used as a gate on the other, and a projection back down.

# %%
def rms_norm(x, weight, eps=config.norm_eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, mlp):
    return F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T) @ mlp.down.weight.T


block = model.blocks[0]
x = torch.randn(2, 10, config.d_model)  # (B, T, D): a residual stream
assert_close(rms_norm(x, block.attn_norm.weight), block.attn_norm(x))
assert_close(swiglu(x, block.mlp), block.mlp(x))
print("RMSNorm and SwiGLU by hand = the library's; d_ff =", config.d_ff)

# %% [markdown]
# ## A block by hand
#
# Attention is the module of tutorial 03; RoPE's cos/sin tables for positions 0..T-1 are the
# model's buffers (tutorial 02).

# %%
rope = (model.rope_cos[:10], model.rope_sin[:10])  # (T, hd) each


def block_by_hand(x, block):
    x = x + block.attn(rms_norm(x, block.attn_norm.weight), rope)
    return x + swiglu(rms_norm(x, block.mlp_norm.weight), block.mlp)


assert_close(block_by_hand(x, block), block(x, rope))
print("block by hand = layers.Block")

# %% [markdown]
# ## The whole model by hand
#
# The embeddings are *tied* here (`tie_embeddings=True`, as in GPT-2): the `lm_head` reuses the
# token embedding table, so the logit of token `v` is the dot product of the final vector with
# that token's own embedding.

# %%
with torch.no_grad():
    h = model.tok_emb.weight[tokens]  # (B, T, D); RoPE adds nothing here, it acts inside attention
    for blk in model.blocks:
        h = block_by_hand(h, blk)
    logits = rms_norm(h, model.norm.weight) @ model.tok_emb.weight.T  # (B, T, vocab)
    assert_close(logits, model(tokens))
print("model by hand = Transformer:", tuple(logits.shape), "logits (batch, positions, vocabulary)")

# %% [markdown]
# ## Counting parameters by hand
#
# Per block: the attention projections (q and o are `D × H·hd`, k and v `D × K·hd` with `K` key/value
# heads), the MLP (three `D × d_ff` matrices for SwiGLU, two for GELU), two norms, and biases where
# the config has them. Around the blocks: the token table, a learned position table if any, the
# final norm, and an `lm_head` unless it is tied. `Transformer.num_parameters` counts the tensors
# themselves; the formula must agree for every preset (built on the `meta` device: shapes, no memory).

# %%
def count_by_hand(c: ModelConfig) -> int:
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    norm = c.d_model * (2 if c.norm == "layernorm" and c.bias else 1)  # gain (+ bias)
    attn = 2 * c.d_model * q_dim + 2 * c.d_model * kv_dim + (q_dim + 2 * kv_dim + c.d_model) * c.bias
    n_mats = 3 if c.mlp == "swiglu" else 2
    mlp = n_mats * c.d_model * c.d_ff + ((n_mats - 1) * c.d_ff + c.d_model) * c.bias
    block = attn + mlp + 2 * norm
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)  # + untied lm_head
    positions = c.max_seq_len * c.d_model if c.positions == "learned" else 0
    return embeddings + positions + c.n_layers * block + norm


assert count_by_hand(config) == model.num_parameters()
for name in MODEL_PRESETS:
    preset = ModelConfig.preset(name)
    with torch.device("meta"):
        n = Transformer(preset).num_parameters()
    assert count_by_hand(preset) == n, name
    print(f"{name:12s} {n:>13,d} parameters")
# GPT-2 small as OpenAI released it: 124,439,808 parameters (a number from outside this project).
assert count_by_hand(ModelConfig.preset("gpt2-small")) == 124_439_808

# %% [markdown]
# Training costs about `6 N` FLOPs per token for the `N` weights used in matrix products (2 for
# the forward multiply-add, 4 for the backward), plus attention's own `12 · L · D · T` at context
# `T` (the PaLM paper's appendix B): `Transformer.flops_per_token`. Embedding lookups are not
# products, so a tied table counts once, as the `lm_head`.

# %%
c = config
n_matmul = model.num_parameters(exclude_embeddings=True)
assert model.flops_per_token(16) == 6 * n_matmul + 12 * c.n_layers * c.d_model * 16
print(f"{model.flops_per_token(16):,} training FLOPs per token at context 16")

# %% [markdown]
# Next: **05 · Training**, where these weights learn Shakespeare.
