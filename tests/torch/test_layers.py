"""Each component against an independent reference (a PyTorch built-in or the formula in float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("module", [True, False])
def test_rmsnorm_epsilon_counts_on_small_inputs(module):
    """x ~ 1e-4 gives mean(x²) ~ 1e-8, well below eps = 1e-5: a norm that drops eps (or adds it
    outside the root) is off by orders of magnitude here, while unit-scale inputs hide it."""
    weight = torch.randn(32)
    x = torch.randn(4, 5, 32) * 1e-4
    if module:
        norm = layers.RMSNorm(32, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(weight)
        ours = norm(x)
    else:
        ours = layers.rms_norm(x, weight, 1e-5)
    x64 = x.double()
    formula = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(ours.double(), formula, atol=1e-6, rtol=1e-5)


def test_rmsnorm_statistics_are_float32_under_bfloat16():
    """bf16 input: the mean of squares is taken in float32 (it would lose digits, or overflow in
    fp16), only the result is rounded to bf16: within one bf16 rounding of the float64 formula."""
    x = (torch.randn(3, 64) * 30).bfloat16()
    weight = torch.ones(64, dtype=torch.bfloat16)
    ours = layers.rms_norm(x, weight, 1e-5)
    assert ours.dtype == torch.bfloat16
    x64 = x.double()
    formula = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ours.double(), formula, atol=0, rtol=2**-8)


def test_layer_norm_function_matches_float64_formula_on_small_inputs():
    x, w, b = torch.randn(4, 32) * 1e-4, torch.randn(32), torch.randn(32)
    x64 = x.double()
    centred = x64 - x64.mean(-1, keepdim=True)
    formula = centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(layers.layer_norm(x, w, b, 1e-5).double(), formula, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layers.norm(x, "layernorm", w, b, 1e-5), layers.layer_norm(x, w, b, 1e-5))
    torch.testing.assert_close(layers.norm(x, "rmsnorm", w, None, 1e-5), layers.rms_norm(x, w, 1e-5))


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
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), angles)
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
                scores = [(q[b, h, t].double() @ k[b, h, s].double()).item() / math.sqrt(hd)
                          for s in range(k.size(2))]
                scores = [sc if mask[t, s] else -math.inf for s, sc in enumerate(scores)]
                m = max(scores)
                w = torch.tensor([math.exp(sc - m) for sc in scores], dtype=torch.float64)
                out[b, h, t] = (w / w.sum()) @ v[b, h].double()
    return out


CAUSAL_6 = torch.tensor([  # full causal: query i sees keys 0 .. i
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
], dtype=torch.bool)
CAUSAL_3_AFTER_5 = torch.tensor([  # 3 queries after 5 cached keys: bottom-right aligned
    [1, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
], dtype=torch.bool)


@pytest.mark.parametrize("mask", [CAUSAL_6, CAUSAL_3_AFTER_5], ids=["6x6", "3x8"])
def test_causal_mask_is_bottom_right_aligned(mask):
    assert torch.equal(layers.causal_mask(*mask.shape), mask)


@pytest.mark.parametrize("mask", [CAUSAL_6, CAUSAL_3_AFTER_5], ids=["6x6", "3x8"])
def test_attention_paths_match_naive_loop(mask):
    """Default (None = causal) and explicit masks, bool and float, against a literal mask."""
    (T, S), neg = mask.shape, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    ref = _naive_attention(q, k, v, mask)
    out_math, weights = layers.attention_math(q, k, v, None)
    torch.testing.assert_close(out_math.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, T))
    assert torch.equal(weights[0, 0] > 0, mask)
    for explicit in (mask, neg):  # bool (True = attend) and float bias (0 / -inf), as the packed model
        out, _ = layers.attention_math(q, k, v, explicit)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
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
    causal = torch.ones(7, 7, dtype=torch.bool).tril()  # query i sees keys 0 .. i
    y = _naive_attention(q, k, v, causal).float().transpose(1, 2).reshape(2, 7, 32)
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
    future = torch.ones(9, 9, dtype=torch.bool).triu(diagonal=1)  # True = may NOT attend, for torch's module
    ref, _ = mha(x, x, x, attn_mask=future, need_weights=False)
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
    # the packed model's form: gate and up fused into one [gate | up] matrix, one product
    fused = torch.cat([mlp.gate.weight, mlp.up.weight])  # (2F, D)
    out = layers.swiglu(x, lambda h: h @ fused.T, None, mlp.down)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_mlps_call_their_linear_modules():
    """LoRA and quantization swap an nn.Linear for another module: the MLPs must go through it."""
    for cfg in (_attn_config(mlp="swiglu", d_ff=24), _attn_config(bias=True)):
        mlp = layers.SwiGLU(cfg) if cfg.mlp == "swiglu" else layers.GeluMLP(cfg)
        x = torch.randn(2, 3, 32)
        before = mlp(x)
        mlp.down = torch.nn.Sequential(mlp.down, _Doubling())  # what a LoRA wrapper does: a new module
        torch.testing.assert_close(mlp(x), 2 * before)


class _Doubling(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


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
