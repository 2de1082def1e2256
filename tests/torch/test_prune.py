"""Pruning (minillm.torch.prune, `minillm prune`): exact sparsity of the masks, 2:4 in every group,
structurally pruned models equal to the dense model with the same heads / channels masked, an
explicit head_dim in torch == JAX, and a recovery fine-tune that keeps pruned weights at zero."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minillm.checkpoint import load_weights, save_run
from minillm.cli import main as cli
from minillm.config import ModelConfig
from minillm.interop import hf
from minillm.tokenizer import load_tokenizer
from minillm.torch import prune
from minillm.torch.generate import generate
from minillm.torch.model import Transformer, model_from_params, model_params
from minillm.torch.sft import load_for_inference
from tests.conftest import make_model, prepare_char_data, random_prompt
from tests.torch.conftest import CORPUS, EXAMPLES, finetune_args, one_line_error


def params_of(style: str, **overrides) -> tuple[ModelConfig, dict]:
    model = make_model(style, scale=1.0, **overrides)
    return model.config, model_params(model)


def test_head_dim_is_derived_unless_given_and_only_an_explicit_one_is_stored():
    derived = ModelConfig(d_model=32, n_heads=4)
    assert derived.head_dim == 8 and "head_dim" not in derived.to_dict()  # config.json as before
    explicit = ModelConfig(d_model=32, n_heads=2, head_dim=8)  # n_heads * head_dim = 16 != d_model
    assert explicit.to_dict()["head_dim"] == 8 and ModelConfig.from_dict(explicit.to_dict()) == explicit
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\), or head_dim"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="head_dim must be a positive integer, got 0"):
        ModelConfig(head_dim=0)


# --- unstructured ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_layer_magnitude_masks_zero_exactly_the_smallest_weights_of_each_matrix(sparsity):
    config, params = params_of("gpt2")
    names = prune.prunable_names(config)
    assert len(names) == 2 * 6  # q k v o up down per block; not embeddings, norms or lm_head
    pruned = prune.apply_masks(params, prune.magnitude_masks(params, names, sparsity, "layer"))
    for n in names:
        before, after = np.abs(params[n]).ravel(), pruned[n].ravel()
        zeroed = after == 0
        assert zeroed.sum() == round(sparsity * before.size), n
        assert before[zeroed].max() <= before[~zeroed].min()  # the smallest went, none other
        np.testing.assert_array_equal(after[~zeroed], params[n].ravel()[~zeroed])
    for n in set(params) - set(names):
        assert pruned[n] is params[n]


def test_global_magnitude_masks_hit_the_sparsity_over_all_matrices_not_each():
    config, params = params_of("llama-gqa")
    names = prune.prunable_names(config)
    assert sum("mlp.gate" in n for n in names) == 2
    pruned = prune.apply_masks(params, prune.magnitude_masks(params, names, 0.6, "global"))
    everything = np.concatenate([np.abs(params[n]).ravel() for n in names])
    zeroed = np.concatenate([pruned[n].ravel() == 0 for n in names])
    assert zeroed.sum() == round(0.6 * everything.size)
    assert everything[zeroed].max() <= everything[~zeroed].min()
    per_matrix = [float((pruned[n] == 0).mean()) for n in names]
    assert max(per_matrix) - min(per_matrix) > 0.05  # global: matrices differ (k, v have other scales)


def test_two_four_keeps_the_two_largest_of_every_four_inputs_in_every_row():
    config, params = params_of("llama-gqa")
    names = prune.prunable_names(config)
    pruned = prune.apply_masks(params, prune.two_four_masks(params, names))
    for n in names:
        groups = torch.from_numpy(pruned[n]).reshape(pruned[n].shape[0], -1, 4)  # (out, in/4, 4)
        assert bool(((groups != 0).sum(-1) == 2).all()), n
        original = torch.from_numpy(params[n]).reshape(groups.shape)
        top2 = original.abs().topk(2, dim=-1).indices  # the reference: torch.topk per group
        expected = torch.zeros_like(original).scatter(-1, top2, original.gather(-1, top2))
        assert torch.equal(groups, expected)
    with pytest.raises(ValueError, match="in_features divisible by 4; w has 6"):
        prune.two_four_masks({"w": np.ones((2, 6), np.float32)}, ["w"])


# --- structured -----------------------------------------------------------------------------------
def masked_dense_logits(config, params, tokens, heads=None, channels=None):
    """The dense model with the attention heads / MLP channels outside `heads` / `channels` (per
    layer) masked: their input columns of attn.o / mlp.down set to zero."""
    masked = dict(params)
    for i in range(config.n_layers):
        if heads is not None:
            cols = np.ones((config.n_heads, config.head_dim), bool)
            cols[heads[i]] = False
            masked[f"blocks.{i}.attn.o.weight"] = params[f"blocks.{i}.attn.o.weight"] * ~cols.ravel()
        if channels is not None:
            off = np.ones(config.d_ff, bool)
            off[channels[i]] = False
            masked[f"blocks.{i}.mlp.down.weight"] = params[f"blocks.{i}.mlp.down.weight"] * ~off
    return model_from_params(config, masked).eval()(tokens)


@pytest.mark.parametrize("style, sparsity, n_heads, n_kv_heads", [("gpt2", 0.25, 3, 3), ("gpt2", 0.5, 2, 2),
                                                                  ("llama-gqa", 0.5, 2, 2)])
def test_head_pruned_model_equals_the_dense_model_with_those_heads_masked(style, sparsity, n_heads,
                                                                          n_kv_heads):
    config, params = params_of(style)
    tokens = torch.tensor([random_prompt(20, seed=3)])
    keep = prune.keep_heads(config, params, sparsity)
    smaller, small_params = prune.remove_heads(config, params, keep)
    shape = (smaller.n_heads, smaller.n_kv_heads, smaller.head_dim, smaller.d_model)
    assert shape == (n_heads, n_kv_heads, 8, 32)
    assert small_params["blocks.0.attn.q.weight"].shape == (n_heads * 8, 32)
    if style == "llama-gqa":  # each K/V head keeps one of its two query heads
        assert all(sorted(h // 2 for h in k) == [0, 1] for k in keep)
    small = model_from_params(smaller, small_params).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), masked_dense_logits(config, params, tokens, heads=keep),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama-gqa"])
def test_channel_pruned_model_equals_the_dense_model_with_those_channels_masked(style):
    config, params = params_of(style)
    tokens = torch.tensor([random_prompt(20, seed=4)])
    keep = prune.keep_channels(config, params, 0.25)
    smaller, small_params = prune.remove_channels(config, params, keep)
    assert smaller.d_ff == round(0.75 * config.d_ff) and len({len(k) for k in keep}) == 1
    small = model_from_params(smaller, small_params).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), masked_dense_logits(config, params, tokens, channels=keep),
                                   rtol=1e-5, atol=1e-5)


def test_importance_is_weight_norm_times_the_rms_of_the_inputs_on_calibration_batches():
    model = make_model("gpt2", scale=1.0)
    batches = [torch.tensor([random_prompt(16, seed=s)]) for s in range(3)]
    outputs = []  # reference: GPT-2's MLP hidden is gelu_tanh(up(x)), taken from up's output
    handle = model.blocks[1].mlp.up.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
    rms = prune.input_rms(model, batches)
    handle.remove()
    hidden = F.gelu(torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]), approximate="tanh").double()
    np.testing.assert_allclose(rms["blocks.1.mlp.down"], hidden.pow(2).mean(0).sqrt().numpy(), rtol=1e-5)
    params = model_params(model)
    down = params["blocks.1.mlp.down.weight"].astype(np.float64)
    score = prune.column_importance(params, "blocks.1.mlp.down", rms)
    np.testing.assert_allclose(score, np.sqrt((down ** 2).sum(0)) * rms["blocks.1.mlp.down"], rtol=1e-6)
    assert set(rms) == {f"blocks.{i}.{k}" for i in range(2) for k in ("attn.o", "mlp.down")}


def test_the_fast_decoder_runs_a_head_pruned_model_as_the_eager_one():
    config, params = params_of("llama-gqa", n_kv_heads=4)  # MHA: 4 heads -> 3, head_dim 8, D 32
    keep = prune.keep_heads(config, params, 0.25)
    small = model_from_params(*prune.remove_heads(config, params, keep)).eval()
    prompt = random_prompt(5, seed=6)
    tokens = list(prompt)
    with torch.no_grad():  # the reference: greedy decoding by full forward passes of the eager model
        for _ in range(12):
            tokens.append(int(small(torch.tensor([tokens]))[0, -1].argmax()))
    assert generate(small, prompt, 12, temperature=0.0) == tokens[len(prompt):]


def test_a_head_pruned_llama_exports_to_transformers_and_a_gpt2_one_says_it_cannot():
    config, params = params_of("llama-gqa")
    keep = prune.keep_heads(config, params, 0.5)
    small = model_from_params(*prune.remove_heads(config, params, keep)).eval()
    theirs = hf.to_transformers(small).eval()
    assert theirs.config.head_dim == 8 and theirs.config.num_attention_heads == 2
    tokens = torch.tensor([random_prompt(10, seed=7)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, small(tokens), rtol=1e-5, atol=1e-5)
    config, params = params_of("gpt2")
    smaller, _ = prune.remove_heads(config, params, prune.keep_heads(config, params, 0.5))
    with pytest.raises(ValueError, match="head_dim=8 .* has no transformers GPT2Config"):
        hf.hf_config(smaller)


def test_unreachable_structured_sparsity_is_a_clear_error():
    config, params = params_of("llama-gqa")  # 4 query heads on 2 K/V heads: steps of 1/2
    with pytest.raises(ValueError, match=r"head sparsity 0.2 keeps every head: .* steps of 1/2"):
        prune.keep_heads(config, params, 0.2)
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune.keep_channels(config, params, 1.0)


def test_explicit_head_dim_runs_the_same_in_jax_as_in_torch():
    jax = pytest.importorskip("jax")
    from minillm.jax import model as jm

    for style in ("gpt2", "llama-gqa"):  # learned positions and RoPE; n_heads * head_dim = 24 != 32
        config = ModelConfig(**{**dict(make_model(style).config.to_dict()), "n_heads": 2 if style == "gpt2"
                                else 4, "n_kv_heads": 2, "head_dim": 12 if style == "gpt2" else 6})
        torch.manual_seed(0)
        model = Transformer(config).eval()
        ids = np.array([random_prompt(12, seed=5)], dtype=np.int32)
        ref = model(torch.from_numpy(ids).long()).detach().numpy()
        params = jm.params_from_canonical(model_params(model), config)
        logits = np.asarray(jm.jit_forward(config)(params, jax.numpy.asarray(ids)))
        assert np.abs(logits - ref).max() <= 1e-5


# --- the command, and a recovery fine-tune that keeps the zeros ----------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random LLaMA-style run over the fine-tuning tests' characters (no training needed)."""
    root = tmp_path_factory.mktemp("prune")
    tokenizer = load_tokenizer(prepare_char_data(root, CORPUS) / "tokenizer.json")
    config = ModelConfig(**{**make_model("llama-gqa").config.to_dict(), "vocab_size": tokenizer.vocab_size,
                            "max_seq_len": 128})
    torch.manual_seed(0)
    save_run(root / "base", config, tokenizer, model_params(Transformer(config)))
    (root / "chat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return root


def test_prune_command_writes_a_run_that_a_full_finetune_keeps_sparse(base, tmp_path):
    out = tmp_path / "pruned"
    assert cli(["prune", "--run", str(base / "base"), "--method", "magnitude", "--sparsity", "0.7",
                "--scope", "global", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["prune"]
    assert record["method"] == "magnitude" and record["scope"] == "global" and len(record["masked"]) == 14
    _, pruned = load_weights(out)
    assert prune.sparsity_of(pruned, record["masked"]) == pytest.approx(0.7, abs=1e-4)
    tuned = tmp_path / "tuned"
    assert cli(finetune_args(out, base / "chat.jsonl", tuned, "full", "max_steps=3", "lr=1e-2")) == 0
    _, after = load_weights(tuned)
    for n in record["masked"]:
        zero = pruned[n] == 0
        assert (after[n][zero] == 0).all(), n  # the pruned weights stayed pruned ...
    assert any(not np.array_equal(after[n], pruned[n]) for n in record["masked"])  # ... the rest trained
    assert json.loads((tuned / "config.json").read_text())["prune"] == record


def test_prune_command_heads_and_channels_give_smaller_runs_that_load(base, tmp_path):
    for method, sparsity, field, value in (("heads", "0.5", "n_heads", 2), ("channels", "0.25", "d_ff", 96)):
        out = tmp_path / method
        assert cli(["prune", "--run", str(base / "base"), "--method", method, "--sparsity", sparsity,
                    "--calibration", str(base / "char"), "--calibration-batches", "2",
                    "--out", str(out)]) == 0
        model, _ = load_for_inference(out)
        assert getattr(model.config, field) == value
        assert json.loads((out / "config.json").read_text())["prune"]["importance"].endswith("activation rms")


def test_prune_command_errors_are_one_line(base, tmp_path, capsys):
    one_line_error(capsys, ["prune", "--run", str(base / "base"), "--method", "magnitude",
                            "--sparsity", "1.5", "--out", str(tmp_path / "x")],
                   "sparsity must be in [0, 1), got 1.5")
    one_line_error(capsys, ["prune", "--run", str(base / "base"), "--method", "heads", "--sparsity", "0.1",
                            "--out", str(tmp_path / "x")], "keeps every head")
    one_line_error(capsys, ["prune", "--run", str(base / "base"), "--method", "2:4", "--out", str(base)],
                   "already exists")
