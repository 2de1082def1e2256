"""The JAX model against the PyTorch one: full-model logits, loss, checkpoints both ways, and the
rule that neither framework package imports the other."""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from minillm import checkpoint  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.torch.model import Transformer, model_from_params, model_params, next_token_loss  # noqa: E402
from tests.conftest import perturbed_torch_model  # noqa: E402

GPT2 = dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
SHAPES = {  # (B, T, model fields): 3 GPT-2 style, 3 LLaMA style with grouped-query attention
    "gpt2-a": (1, 8, dict(GPT2, vocab_size=37, d_model=32, n_layers=1, n_heads=2)),
    "gpt2-b": (3, 17, dict(GPT2, vocab_size=50, d_model=48, n_layers=2, n_heads=4)),
    "gpt2-c": (2, 32, dict(GPT2, vocab_size=65, d_model=64, n_layers=3, n_heads=8, bias=False,
                           tie_embeddings=False)),
    "llama-a": (1, 8, dict(LLAMA, vocab_size=37, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)),
    "llama-b": (3, 17, dict(LLAMA, vocab_size=50, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                            tie_embeddings=False)),
    "llama-c": (2, 32, dict(LLAMA, vocab_size=65, d_model=64, n_layers=3, n_heads=8, n_kv_heads=1,
                            rope_theta=500000.0)),
}


def torch_model(fields: dict, max_seq_len: int = 32) -> Transformer:
    return perturbed_torch_model(ModelConfig(max_seq_len=max_seq_len, **fields))


def tokens(B: int, T: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_full_model_logits_match_torch(name):
    B, T, fields = SHAPES[name]
    model = torch_model(fields)
    ids = tokens(B, T, fields["vocab_size"])
    ref = model(torch.from_numpy(ids).long()).detach().numpy()
    params = jm.params_from_canonical(model_params(model), model.config)
    logits = np.asarray(jm.jit_forward(model.config)(params, jnp.asarray(ids)))
    assert logits.shape == ref.shape == (B, T, fields["vocab_size"])
    assert np.abs(logits - ref).max() <= 1e-5


def test_sinusoidal_positions_exact_gelu_and_loss_match_torch():
    model = torch_model(dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, positions="sinusoidal",
                             mlp="gelu_exact"))
    ids = tokens(2, 12, 40)
    targets = tokens(2, 12, 40, seed=2)
    targets[0, :3] = -100  # ignored positions
    ref_logits = model(torch.from_numpy(ids).long())
    ref_loss = next_token_loss(ref_logits, torch.from_numpy(targets).long()).item()
    params = jm.params_from_canonical(model_params(model), model.config)
    logits = jm.jit_forward(model.config)(params, jnp.asarray(ids))
    assert np.abs(np.asarray(logits) - ref_logits.detach().numpy()).max() <= 1e-5
    assert abs(float(jm.next_token_loss(logits, jnp.asarray(targets))) - ref_loss) <= 1e-6


@pytest.mark.parametrize("name", ["gpt2-b", "llama-b", "sinusoidal"])
def test_forward_runs_in_bfloat16(name):
    """A bfloat16 params tree gives bfloat16 logits (no float32 table promotes the whole forward)
    whose loss stays close to the float32 one; mixed-precision training relies on both."""
    B, T, fields = SHAPES.get(name, SHAPES["gpt2-b"])
    model = torch_model(dict(fields, positions="sinusoidal") if name == "sinusoidal" else fields)
    params = jm.params_from_canonical(model_params(model), model.config)
    ids, targets = jnp.asarray(tokens(B, T, model.config.vocab_size)), jnp.asarray(tokens(B, T, 50, seed=2))
    forward = jm.jit_forward(model.config)
    logits = forward(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), ids)
    assert logits.dtype == jnp.bfloat16
    fp32_loss = float(jm.next_token_loss(forward(params, ids), targets))
    assert abs(float(jm.next_token_loss(logits, targets)) - fp32_loss) < 0.02 * fp32_loss


def test_forward_rejects_too_long_input():
    cfg = ModelConfig(vocab_size=10, max_seq_len=8, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        jm.forward(jm.init_params(cfg, jax.random.PRNGKey(0)), cfg, jnp.zeros((1, 9), jnp.int32))


def test_init_params_has_canonical_names_and_gpt2_scales():
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, bias=True, tie_embeddings=False)
    params = jm.init_params(cfg, jax.random.PRNGKey(0))
    checkpoint.check_params(cfg, params)
    assert jm.num_parameters(params) == Transformer(cfg).num_parameters()
    assert abs(float(params["tok_emb.weight"].std()) - 0.02) < 0.002
    assert abs(float(params["blocks.0.mlp.down.weight"].std()) - 0.01) < 0.001  # 0.02 / sqrt(2 * 2)
    assert float(jnp.abs(params["blocks.1.attn.q.bias"]).max()) == 0.0
    assert float(params["norm.weight"].min()) == 1.0


@pytest.mark.parametrize("name", ["gpt2-b", "llama-b"])
def test_one_checkpoint_serves_both_frameworks(tmp_path, name):
    """torch writes model.safetensors -> JAX loads it; JAX writes -> torch loads it; equal logits."""
    B, T, fields = SHAPES[name]
    model = torch_model(fields)
    ids = tokens(B, T, fields["vocab_size"])
    checkpoint.save_model(tmp_path / "from_torch", model.config, model_params(model))
    config, params, _ = jm.load_params(tmp_path / "from_torch")
    ref = model(torch.from_numpy(ids).long()).detach().numpy()
    assert np.abs(np.asarray(jm.jit_forward(config)(params, jnp.asarray(ids))) - ref).max() <= 1e-5

    jax_params = jm.init_params(model.config, jax.random.PRNGKey(3))
    jm.save_model(tmp_path / "from_jax", model.config, jax_params)
    config, flat = checkpoint.load_weights(tmp_path / "from_jax")
    back = model_from_params(config, flat).eval()
    expected = np.asarray(jm.jit_forward(model.config)(jax_params, jnp.asarray(ids)))
    assert np.abs(back(torch.from_numpy(ids).long()).detach().numpy() - expected).max() <= 1e-5
    assert sorted(flat) == sorted(model_params(model))  # the same canonical names, tied head absent


def test_params_from_canonical_rejects_wrong_architecture():
    cfg = ModelConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2)
    flat = jm.params_to_canonical(jm.init_params(cfg, jax.random.PRNGKey(0)))
    with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
        jm.params_from_canonical(flat, ModelConfig(vocab_size=10, d_model=16, n_layers=2, n_heads=2))


@pytest.mark.parametrize("package,forbidden", [("minillm.jax", "torch"), ("minillm.torch", "jax")])
def test_frameworks_do_not_import_each_other(package, forbidden):
    modules = {"minillm.jax": ["layers", "model", "kv_cache", "sampling", "beam", "generate", "optim", "step",
                               "train", "parallel", "trainer_state"],
               "minillm.torch": ["layers", "model", "sampling", "kv_cache", "generate", "beam"]}[package]
    code = (f"import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module('{package}.' + m)\n"
            f"bad = sorted(m for m in sys.modules if m == '{forbidden}' or m.startswith('{forbidden}.'))\n"
            f"assert not bad, bad[:5]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
