"""The mixture-of-experts MLP (minillm.torch.moe, minillm.jax.moe): equal to transformers'
MixtralForCausalLM with the same weights, its load-balancing loss equal to the formula in float64 and
to transformers' load_balancing_loss_func, JAX equal to PyTorch, and a few training steps that lower
the loss and log the expert usage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minillm.checkpoint import canonical_shapes
from minillm.config import ModelConfig
from minillm.interop import hf
from minillm.torch import moe
from minillm.torch.generate import generate
from minillm.torch.model import Transformer
from tests.conftest import prepare_char_data

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

MOE = dict(vocab_size=61, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
           norm="rmsnorm", positions="rope", mlp="swiglu", tie_embeddings=False, n_experts=4,
           experts_per_token=2)


def moe_model(seed: int = 0, **overrides) -> Transformer:
    """A random MoE model whose routers are spread wide enough that every expert gets tokens."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**MOE, **overrides})).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.weight.normal_(0.0, 0.5)
    return model


def test_config_fields_default_to_the_dense_model_and_are_validated():
    saved = ModelConfig().to_dict()  # config.json of a dense model is what it was before these fields
    assert not {"n_experts", "experts_per_token", "router_aux_loss_coef"} & set(saved)
    dense = canonical_shapes(ModelConfig(mlp="swiglu"))
    assert canonical_shapes(ModelConfig(mlp="swiglu", n_experts=1)) == dense  # 1 expert is the dense MLP
    shapes = canonical_shapes(ModelConfig(**MOE))
    assert shapes["blocks.1.mlp.router.weight"] == (4, 32) and "blocks.1.mlp.router.bias" not in shapes
    assert shapes["blocks.1.mlp.experts.3.gate.weight"] == (48, 32)
    assert shapes["blocks.0.mlp.experts.0.down.weight"] == (32, 48) and "blocks.0.mlp.up.weight" not in shapes
    assert set(Transformer(ModelConfig(**MOE)).state_dict()) == set(shapes)
    for bad, field in ((dict(n_experts=-1), "n_experts"),
                       (dict(n_experts=4, experts_per_token=5), "experts_per_token"),
                       (dict(experts_per_token=0), "experts_per_token"),
                       (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef")):
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            ModelConfig(**bad)


def test_moe_model_equals_mixtral_with_the_same_weights():
    model = moe_model()
    tokens = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    mixtral = hf.to_transformers(model)
    assert type(mixtral).__name__ == "MixtralForCausalLM" and mixtral.config.num_local_experts == 4
    with torch.no_grad():
        ours = model(tokens)
        out = mixtral(tokens, output_router_logits=True)
    torch.testing.assert_close(ours, out.logits, atol=1e-5, rtol=0)
    # the router logits (what the aux loss sees) agree too, and so does the aux loss itself
    for block, theirs in zip(model.blocks, out.router_logits):
        torch.testing.assert_close(block.mlp.router_logits, theirs, atol=1e-6, rtol=0)
    used = {e for block in model.blocks for e in route_ids(block)}
    assert used == {0, 1, 2, 3}, "every expert should see tokens, or the test proves less"
    aux = moe.load_balancing_loss([b.mlp.router_logits for b in model.blocks], k=2)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)


def route_ids(block) -> list[int]:
    return moe.route(block.mlp.router_logits, 2)[1].flatten().tolist()


def test_mixtral_imports_and_round_trips():
    """A Mixtral made by transformers (its own init) imports to the same logits; export gives it back."""
    torch.manual_seed(2)
    hf_config = transformers.MixtralConfig(vocab_size=53, hidden_size=32, intermediate_size=40,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                           num_local_experts=3, num_experts_per_tok=2,
                                           max_position_embeddings=64, router_aux_loss_coef=0.02,
                                           initializer_range=0.2)
    mixtral = transformers.MixtralForCausalLM(hf_config).eval()
    config, sd = hf.from_transformers(mixtral)
    assert (config.n_experts, config.experts_per_token, config.router_aux_loss_coef) == (3, 2, 0.02)
    model = Transformer(config).eval()
    model.load_state_dict(sd)
    tokens = torch.randint(0, 53, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), mixtral(tokens).logits, atol=1e-5, rtol=0)
    back = hf.to_transformers(model).state_dict()
    for name, tensor in mixtral.state_dict().items():
        assert torch.equal(back[name], tensor), name
    with pytest.raises(ValueError, match="bias=True"):
        hf.to_transformers(moe_model(bias=True))
    with pytest.raises(ValueError, match="n_experts=4"):  # GPT-2 style experts: no transformers class
        hf.to_transformers(Transformer(ModelConfig(n_experts=4, d_model=32, n_layers=1)))


def reference_aux_loss(layers: list[np.ndarray], E: int, k: int) -> float:
    """Switch Transformer eq. 4-6 over every layer's tokens, in float64 with explicit loops."""
    f, P, n = np.zeros(E), np.zeros(E), 0
    for logits in layers:
        for row in logits.astype(np.float64):
            p = np.exp(row - row.max())
            p /= p.sum()
            for e in np.argsort(-p, kind="stable")[:k]:
                f[e] += 1
            P += p
            n += 1
    return E * float(np.sum((f / n) * (P / n)))


def test_load_balancing_loss_equals_the_formula_and_transformers():
    g = torch.Generator().manual_seed(4)
    layers = [torch.randn(13, 5, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
    for k in (1, 2, 3):
        ours = moe.load_balancing_loss(layers, k)
        assert ours.item() == pytest.approx(reference_aux_loss([x.numpy() for x in layers], 5, k), abs=1e-6)
        theirs = load_balancing_loss_func(tuple(x.float() for x in layers), num_experts=5, top_k=k)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    uniform = [torch.zeros(8, 4)]  # every expert equally likely: the loss is exactly k
    assert moe.load_balancing_loss(uniform, 2).item() == pytest.approx(2.0, abs=1e-6)


def test_routing_weights_are_the_softmax_over_the_chosen_logits():
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, chosen = moe.route(logits, 3)
    top = logits.topk(3, dim=-1)
    assert torch.equal(chosen, top.indices)
    torch.testing.assert_close(weights, torch.softmax(top.values, -1).float(), atol=1e-7, rtol=0)


def test_training_lowers_the_loss_and_logs_expert_usage(tmp_path):
    from minillm.config import TrainConfig
    from minillm.torch.train import Trainer
    from minillm.train_loop import train

    data = prepare_char_data(tmp_path, "the quick brown fox jumps over the lazy dog.\n" * 60)
    model = ModelConfig(**{**MOE, "vocab_size": 65, "d_model": 32})
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), model=model, batch_size=8,
                      block_size=32, max_steps=25, lr=1e-2, warmup_steps=2, eval_interval=0, eval_batches=1,
                      log_interval=5, dtype="float32", threads=1, seed=1)
    trainer = Trainer(cfg, quiet=True)
    x, y = trainer.data.train_batch(trainer.device)
    with torch.no_grad():  # the training loss is the cross-entropy plus coef * the aux loss
        ce = torch.nn.functional.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten())
        aux = moe.load_balancing_loss([b.mlp.router_logits for b in trainer.model.blocks], 2)
        assert trainer.loss(x, y).item() == pytest.approx(ce.item() + 0.01 * aux.item(), abs=1e-6)
    train(trainer)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("train_loss") is not None]
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"] - 0.5
    for row in train_rows:
        usage = np.array(row["expert_usage"])  # (layers, experts): the share of tokens per expert
        assert usage.shape == (2, 4) and np.allclose(usage.sum(1), 2.0, atol=1e-3) and (usage >= 0).all()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["n_experts"] == 4 and "experts_per_token" not in saved  # at its default


def test_generation_runs_the_moe_model_with_a_kv_cache():
    """generate() (its eager fallback for configs the packed decoder can't run) equals greedy argmax
    over full forwards without a cache."""
    model = moe_model(seed=6)
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert out == tokens[len(prompt):]


# --- JAX == PyTorch ------------------------------------------------------------------------------
def _jax_params(model: Transformer):
    from minillm.jax.model import params_from_canonical

    return params_from_canonical({k: v.numpy() for k, v in model.state_dict().items()}, model.config)


def test_jax_forward_cached_decoding_and_aux_loss_equal_torch():
    jnp = pytest.importorskip("jax.numpy")
    import jax

    from minillm.jax import moe as jax_moe
    from minillm.jax.kv_cache import make_cache
    from minillm.jax.model import forward, forward_cached
    from minillm.jax.step import loss_fn

    model = moe_model(seed=7)
    config, params = model.config, _jax_params(model)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(tokens)

    @jax.jit
    def forward_with_router_logits(params, tokens):
        router_logits = []
        return forward(params, config, tokens, router_logits=router_logits), router_logits

    got, router_logits = forward_with_router_logits(params, jnp.asarray(tokens.numpy()))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-5, rtol=0)
    torch_router = [b.mlp.router_logits.numpy() for b in model.blocks]
    for ours, theirs in zip(router_logits, torch_router):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
    usage = np.asarray(jax_moe.expert_usage(router_logits, config))
    np.testing.assert_allclose(usage, np.array(moe.expert_usage(model)["expert_usage"]), atol=1e-4)
    # cached decoding: a 5-token prefill, then one token at a time, each step's logits as the full forward's
    cache, start = make_cache(config, 2, 12), 0
    cached = jax.jit(lambda params, x, cache, start: forward_cached(params, config, x, cache, start))
    for t in (5, 1, 1, 1, 1, 1, 1, 1):
        x = jnp.asarray(tokens[:, start:start + t].numpy())
        step, cache = cached(params, x, cache, jnp.asarray(start))
        np.testing.assert_allclose(np.asarray(step), expected[:, start:start + t].numpy(), atol=1e-5, rtol=0)
        start += t
    # the training loss: cross-entropy + coef * the load-balancing loss, as the PyTorch Trainer's
    # and its gradient, through the router too (the aux loss is what trains a router to balance)
    x, y = tokens[:, :-1], tokens[:, 1:]
    ce = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch_loss = ce + moe.aux_loss(model)
    torch_loss.backward()
    jax_loss, grads = jax.jit(jax.value_and_grad(lambda params, x, y: loss_fn(params, config, x, y)))(
        params, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    assert float(jax_loss) == pytest.approx(torch_loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        if name != "lm_head.weight" or "lm_head.weight" in grads:
            np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), atol=1e-5, rtol=0,
                                       err_msg=name)
    aux = jax_moe.load_balancing_loss([jnp.asarray(r) for r in torch_router], 2)
    assert float(aux) == pytest.approx(reference_aux_loss(torch_router, 4, 2), abs=1e-6)


def test_an_moe_run_exports_as_a_mixtral_directory_and_imports_back(tmp_path):
    """`minillm export hf` / `import hf` of a run directory: transformers' AutoModelForCausalLM reads
    the export as Mixtral with our logits; importing it gives back the same run."""
    from minillm.checkpoint import save_run
    from minillm.cli import main as cli
    from minillm.tokenizer import CharTokenizer
    from minillm.torch.model import load_model, model_params
    from tests.torch.conftest import CORPUS

    tokenizer = CharTokenizer().train(CORPUS)
    model = moe_model(seed=9, vocab_size=tokenizer.vocab_size)
    save_run(tmp_path / "run", model.config, tokenizer, model_params(model))
    assert cli(["export", "hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, model(tokens), atol=1e-5, rtol=0)
    assert cli(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(tmp_path / "back")
    assert back.config.n_experts == 4 and back.config.experts_per_token == 2
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens), atol=1e-5, rtol=0)


def test_flops_per_token_count_the_active_experts_only():
    """6 N + 12 L D T with N the parameters a token uses: the dense model's, plus (k - 1) more MLPs
    and the router in each layer."""
    moe_net, dense = Transformer(ModelConfig(**MOE)), Transformer(ModelConfig(**{**MOE, "n_experts": 0}))
    mlp = 3 * 32 * 48  # gate, up, down of one SwiGLU expert
    extra = 2 * ((2 - 1) * mlp + 4 * 32)  # n_layers * ((k - 1) experts + the router's E * D)
    assert moe_net.flops_per_token(16) == dense.flops_per_token(16) + 6 * extra
    assert moe_net.num_parameters() == dense.num_parameters() + 2 * (3 * mlp + 4 * 32)  # all E experts stored
