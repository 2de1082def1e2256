"""Each component against an independent reference (a PyTorch built-in or the formula in float64)."""

import math

import pytest
import torch.nn.functional as F

import torch
from minillm.config import ModelConfig
from minillm.torch import layers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_layernorm_matches_torch():
    ours, ref = layers.LayerNorm(48, eps=1e-5), torch.nn.LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        ours.bias.copy_(torch.randn(48))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    x = torch.randn(3, 7, 48) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    no_bias = layers.LayerNorm(48, bias=False)
    assert no_bias.bias is None and len(list(no_bias.parameters())) == 1


def test_rmsnorm_matches_torch_and_formula():
    ours, ref = layers.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 5, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    x64, w64 = x.double(), ours.weight.double()
    formula = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(ours(x).double(), formula, atol=1e-5, rtol=1e-5)


def test_sinusoidal_table_matches_paper_formula():
    T, D = 50, 32
    table = layers.sinusoidal_table(T, D)
    for pos in range(T):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert abs(table[pos, 2 * i].item() - math.sin(angle)) < 1e-6
            assert abs(table[pos, 2 * i + 1].item() - math.cos(angle)) < 1e-6


def test_rope_is_a_complex_rotation():
    """Rotate-half RoPE == multiplying z_i = x[i] + j x[i + hd/2] by exp(j p theta_i), in float64."""
    T, hd, theta = 40, 16, 10000.0
    cos, sin = layers.rope_tables(T, hd, theta)
    x = torch.randn(2, 3, T, hd)
    ours = layers.apply_rope(x, cos, sin).double()
    x64 = x.double()
    z = torch.complex(x64[..., : hd // 2], x64[..., hd // 2 :])
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * freqs)
    ref = torch.cat([(z * rot).real, (z * rot).imag], dim=-1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    # A rotation keeps norms, and the score q.k depends only on the offset between positions.
    torch.testing.assert_close(ours.norm(dim=-1), x64.norm(dim=-1), atol=1e-5, rtol=1e-5)


def _naive_attention(q, k, v, mask):
    """softmax(q kᵀ / sqrt(d)) v, one (batch, head, query) at a time, in float64."""
    B, H, T, hd = q.shape
    out = torch.zeros(B, H, T, hd, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = [(q[b, h, t].double() @ k[b, h, s].double()).item() / math.sqrt(hd) for s in range(k.size(2))]
                scores = [sc if mask[t, s] else -math.inf for s, sc in enumerate(scores)]
                m = max(scores)
                w = torch.tensor([math.exp(sc - m) for sc in scores], dtype=torch.float64)
                out[b, h, t] = (w / w.sum()) @ v[b, h].double()
    return out


@pytest.mark.parametrize("T, S", [(6, 6), (3, 8)])  # full causal, and a query block after cached keys
def test_attention_paths_match_naive_loop(T, S):
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    mask = layers.causal_mask(T, S)
    ref = _naive_attention(q, k, v, mask)
    out_math, weights = layers.attention_math(q, k, v, None)
    torch.testing.assert_close(out_math.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, T))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa.double(), ref, atol=1e-5, rtol=0)


def _attn_config(**kw):
    return ModelConfig(vocab_size=10, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, **kw)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_module_paths_agree_and_match_naive(n_kv_heads):
    attn = layers.Attention(_attn_config(n_kv_heads=n_kv_heads)).eval()
    x = torch.randn(2, 7, 32)
    fused = attn(x)
    attn.use_sdpa = False
    plain = attn(x, keep_weights=True)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
    assert attn.last_weights.shape == (2, 4, 7, 7)
    # reference: project, repeat each K/V head for its group, naive attention, project out
    q = attn.q(x).view(2, 7, 4, 8).transpose(1, 2)
    k = attn.k(x).view(2, 7, n_kv_heads, 8).transpose(1, 2).repeat_interleave(4 // n_kv_heads, 1)
    v = attn.v(x).view(2, 7, n_kv_heads, 8).transpose(1, 2).repeat_interleave(4 // n_kv_heads, 1)
    y = _naive_attention(q, k, v, layers.causal_mask(7, 7)).float().transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(fused, attn.o(y), atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha():
    """n_kv_heads == n_heads through the GQA code path equals plain MHA done with torch's module."""
    attn = layers.Attention(_attn_config(bias=True)).eval()
    mha = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        mha.out_proj.weight.copy_(attn.o.weight)
        mha.out_proj.bias.copy_(attn.o.bias)
    x = torch.randn(2, 9, 32)
    ref, _ = mha(x, x, x, attn_mask=~layers.causal_mask(9, 9), need_weights=False)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_formula():
    cfg = _attn_config(mlp="swiglu", d_ff=24)
    mlp = layers.SwiGLU(cfg)
    x = torch.randn(3, 5, 32)
    x64 = x.double()
    g, u, d = (m.weight.double() for m in (mlp.gate, mlp.up, mlp.down))
    gate = x64 @ g.T
    ref = ((gate / (1 + torch.exp(-gate))) * (x64 @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_gelu_mlp_uses_gpt2_tanh_gelu():
    mlp = layers.GeluMLP(_attn_config(bias=True))
    x = torch.randn(4, 32)
    h = (x @ mlp.up.weight.T + mlp.up.bias).double()
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    ref = gelu @ mlp.down.weight.double().T + mlp.down.bias.double()
    torch.testing.assert_close(mlp(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_exact_gelu_mlp_uses_erf():
    mlp = layers.GeluMLP(_attn_config(mlp="gelu_exact"))
    x = torch.randn(4, 32)
    h = (x @ mlp.up.weight.T).double()
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(mlp(x).double(), gelu @ mlp.down.weight.double().T, atol=1e-5, rtol=1e-5)
