"""Each JAX layer against its PyTorch twin (minillm.torch.layers) on the same weights, fp32 CPU."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import layers as jl  # noqa: E402
from minillm.torch import layers as tl  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)


def _randomize(module: "torch.nn.Module", seed: int = 0) -> dict:
    """Give every parameter (gains and biases too) random values; return them as numpy arrays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return {k: jnp.array(v.numpy()) for k, v in module.state_dict().items()}


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(jax_out, torch_out):
    np.testing.assert_allclose(np.asarray(jax_out), torch_out.detach().numpy(), **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(bias):
    ref = tl.LayerNorm(24, eps=1e-5, bias=bias)
    p = _randomize(ref)
    x = _x(2, 5, 24) * 3 + 1
    _close(jl.layer_norm(jnp.asarray(x.numpy()), p["weight"], p.get("bias"), 1e-5), ref(x))


def test_rms_norm():
    ref = tl.RMSNorm(24, eps=1e-6)
    p = _randomize(ref)
    x = _x(2, 5, 24) * 3
    _close(jl.rms_norm(jnp.asarray(x.numpy()), p["weight"], 1e-6), ref(x))


def _f64_rms_norm(x, w, eps):
    return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def _f64_layer_norm(x, w, b, eps):
    centred = x - x.mean(-1, keepdims=True)
    return w * centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) + b


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_norms_match_float64_formulas_at_every_scale(scale):
    """At scale 1e-4 the mean square (~1e-8) sits far below eps, so eps decides the output: a norm
    that drops eps (or puts it outside the square root) blows such inputs up to unit scale."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(3, 16)) * scale, rng.normal(size=16), rng.normal(size=16)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jl.rms_norm(f32(x), f32(w), 1e-6)), _f64_rms_norm(x, w, 1e-6),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jl.layer_norm(f32(x), f32(w), f32(b), 1e-5)),
                               _f64_layer_norm(x, w, b, 1e-5), rtol=1e-5, atol=1e-6)


def test_norms_keep_bfloat16_and_compute_statistics_in_float32():
    rng = np.random.default_rng(1)
    # A mean far from 0: in bfloat16 (8 bits of mantissa) x - mean would keep little of x's spread.
    x = jnp.asarray(rng.normal(size=(2, 64)) + 100, jnp.bfloat16)
    w, b = jnp.ones(64, jnp.bfloat16), jnp.zeros(64, jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    for y, ref in [(jl.rms_norm(x, w, 1e-6), _f64_rms_norm(x64, 1.0, 1e-6)),
                   (jl.layer_norm(x, w, b, 1e-5), _f64_layer_norm(x64, 1.0, 0.0, 1e-5))]:
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=0.02 * np.abs(ref).max(), rtol=0)


def test_position_tables_equal_torch():
    np.testing.assert_allclose(np.asarray(jl.sinusoidal_table(40, 16)), tl.sinusoidal_table(40, 16).numpy(),
                               atol=1e-7)
    for theta in (10000.0, 500000.0):
        cos, sin = jl.rope_tables(300, 16, theta)
        tcos, tsin = tl.rope_tables(300, 16, theta)
        np.testing.assert_allclose(np.asarray(cos), tcos.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sin), tsin.numpy(), atol=1e-6)


def test_rope_is_a_rotation_and_matches_torch():
    cos, sin = jl.rope_tables(10, 8)
    x = _x(2, 3, 10, 8)
    y = jl.apply_rope(jnp.asarray(x.numpy()), cos, sin)
    _close(y, tl.apply_rope(x, *tl.rope_tables(10, 8)))
    # A rotation keeps each (x[i], x[i + hd/2]) pair's length.
    pair_len = lambda a: np.asarray(a)[..., :4] ** 2 + np.asarray(a)[..., 4:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair_len(y), pair_len(x.numpy()), rtol=1e-5)


def test_causal_mask_offsets():
    np.testing.assert_array_equal(np.asarray(jl.causal_mask(3, 5)), tl.causal_mask(3, 5).numpy())
    np.testing.assert_array_equal(np.asarray(jl.causal_mask(3, 5)),
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(jl.causal_mask(2, 6, 1)),
                                  [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


# MHA, GQA, MQA
@pytest.mark.parametrize("n_heads,n_kv_heads,rope", [(4, 4, False), (4, 2, True), (4, 1, True)])
def test_attention(n_heads, n_kv_heads, rope):
    cfg = ModelConfig(d_model=32, n_heads=n_heads, n_kv_heads=n_kv_heads, bias=True)
    ref = tl.Attention(cfg)
    p = {f"attn.{k}": v for k, v in _randomize(ref).items()}
    x = _x(2, 7, 32)
    cos_sin = tl.rope_tables(7, cfg.head_dim) if rope else None
    jax_cos_sin = jl.rope_tables(7, cfg.head_dim) if rope else None
    y, cache = jl.attention(p, "attn", cfg, jnp.asarray(x.numpy()), jax_cos_sin)
    assert cache is None
    _close(y, ref(x, cos_sin))


def test_attention_math_default_mask_is_causal_against_float64():
    """mask=None must be the causal mask: checked against the formula with a literal lower triangle."""
    q, k, v = (np.random.default_rng(s).normal(size=(1, 2, 4, 8)) for s in (1, 2, 3))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((4, 4), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out, w = jl.attention_math(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), None)
    np.testing.assert_allclose(np.asarray(w), weights, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), weights @ v, atol=1e-5)


def test_attention_math_weights_and_explicit_mask():
    q, k, v = _x(1, 2, 3, 4, seed=1), _x(1, 2, 5, 4, seed=2), _x(1, 2, 5, 4, seed=3)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    out, w = jl.attention_math(*(jnp.asarray(t.numpy()) for t in (q, k, v)), jnp.asarray(mask.numpy()))
    ref_out, ref_w = tl.attention_math(q, k, v, mask)
    _close(out, ref_out)
    _close(w, ref_w)


def test_attention_with_fixed_cache_equals_full():
    """Prefill 4 tokens then 3 single-token steps into a cache of 10 slots == one causal pass."""
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2)
    p = {f"attn.{k}": v for k, v in _randomize(tl.Attention(cfg)).items()}
    x = jnp.asarray(_x(2, 7, 32).numpy())
    cos, sin = jl.rope_tables(10, cfg.head_dim)
    full, _ = jl.attention(p, "attn", cfg, x, (cos[:7], sin[:7]))
    kc = vc = jnp.zeros((2, 2, 10, cfg.head_dim))
    pieces = []
    for start, end in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        y, (kc, vc) = jl.attention(p, "attn", cfg, x[:, start:end], (cos[start:end], sin[start:end]),
                                   (kc, vc, start))
        pieces.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "swiglu"])
def test_mlps(kind):
    cfg = ModelConfig(d_model=32, mlp=kind, bias=kind == "gelu")
    ref = tl.SwiGLU(cfg) if kind == "swiglu" else tl.GeluMLP(cfg)
    p = {f"mlp.{k}": v for k, v in _randomize(ref).items()}
    x = _x(2, 5, 32)
    _close(jl.mlp(p, "mlp", cfg, jnp.asarray(x.numpy())), ref(x))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_block(style):
    if style == "gpt2":
        cfg = ModelConfig(d_model=32, n_heads=4, bias=True)
    else:
        cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, norm="rmsnorm", positions="rope", mlp="swiglu")
    ref = tl.Block(cfg)
    p = {f"b.{k}": v for k, v in _randomize(ref).items()}
    x = _x(2, 6, 32)
    rope = style == "llama"
    y, _ = jl.block(p, "b", cfg, jnp.asarray(x.numpy()), jl.rope_tables(6, 8) if rope else None)
    _close(y, ref(x, tl.rope_tables(6, 8) if rope else None))


def test_dropout_is_off_without_a_key_and_scales_with_one():
    x = jnp.ones((1000,))
    assert jl.dropout(x, 0.5, None) is x
    y = np.asarray(jl.dropout(x, 0.25, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)
    assert 0.2 < (y == 0).mean() < 0.3
