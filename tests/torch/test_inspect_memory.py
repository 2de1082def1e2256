"""`minillm inspect --world-size N --parallel ddp|fsdp`: memory per rank against hand-counted bytes
and the tensors autograd really saves. (Its agreement with the resident peak of real 2-rank runs is
measured by benchmarks/scale_out.py.)"""

import json

import pytest
import torch

from minillm.cli import main as cli
from minillm.config import ModelConfig, TrainConfig
from minillm.memory import memory_per_rank, peak
from minillm.torch.model import Transformer, next_token_loss

MODEL = dict(vocab_size=50, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=128, mlp="gelu_exact")


def _train(**kw) -> TrainConfig:
    return TrainConfig(model=ModelConfig(**MODEL), batch_size=8, block_size=32, **kw)


def test_state_bytes_by_hand():
    # parameters: tok_emb 50*32 + pos_emb 32*32 + norm 32 = 2656; a block: q, k, v, o 4*32*32, up and
    # down 2*128*32, two norm gains 2*32 = 12352
    n, block, root = 2656 + 2 * 12352, 12352, 2656
    one, ddp = memory_per_rank(_train(), 1), memory_per_rank(_train(), 4)
    fsdp = memory_per_rank(_train(parallel="fsdp"), 4)
    assert (one["weights"], one["gradients"], one["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (4 * n, 8 * n, 8 * n)  # + DDP's buckets
    gathered = root + 2 * block
    assert (fsdp["weights"], fsdp["gradients"], fsdp["optimizer"]) == (
        4 * (n // 4 + gathered), 4 * (n // 4 + gathered), 8 * n // 4)
    # activations: per token 2 blocks * (8 D + 2 d_ff + H) + 2 D + vocab floats; 8 sequences per rank
    per_token = 2 * (8 * 32 + 2 * 128 + 4) + 2 * 32 + 50
    assert one["activations"] == 4 * 8 * 32 * per_token
    assert ddp["activations"] == fsdp["activations"] == 4 * 2 * 32 * per_token
    assert peak(one) == 4 * n + 8 * n + one["activations"] + 2 * n


@pytest.mark.parametrize("style", [dict(), dict(mlp="swiglu", d_ff=96), dict(d_model=64, n_heads=8)])
def test_activations_match_what_autograd_saves(style):
    """The activation term without backward's share is the bytes of the tensors autograd saves for
    backward (each storage once, parameters excluded), counted by a saved-tensors hook."""
    train = TrainConfig(model=ModelConfig(**{**MODEL, **style}), batch_size=4, block_size=32)
    model = Transformer(train.model)
    params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, train.model.vocab_size, (4, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_loss(model(x), x)
    counted = sum(v for k, v in saved.items() if k not in params)
    assert memory_per_rank(train)["activations"] == pytest.approx(counted, rel=0.05)


def test_activation_checkpointing_keeps_one_input_per_block():
    plain, ac = memory_per_rank(_train()), memory_per_rank(_train(activation_checkpointing=True))
    layer, D = 8 * 32 + 2 * 128 + 4, 32
    assert ac["activations"] == 4 * 8 * 32 * (2 * D + 3 * layer // 2 + 2 * D + 50)
    assert ac["activations"] < plain["activations"]


def test_cli_sizes_each_strategy(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('batch_size = 8\nblock_size = 32\n[model]\nvocab_size = 50\nmax_seq_len = 32\n'
                      'd_model = 32\nn_layers = 2\nn_heads = 4\nd_ff = 128\nmlp = "gelu_exact"\n')
    reports = {}
    for parallel in ("ddp", "fsdp"):
        assert cli(["inspect", "--config", str(config), "--world-size", "4", "--parallel", parallel,
                    "--json"]) == 0
        reports[parallel] = json.loads(capsys.readouterr().out)
    assert reports["fsdp"]["memory_per_rank"] == memory_per_rank(_train(parallel="fsdp"), 4)
    assert reports["fsdp"]["peak_memory_per_rank"] < reports["ddp"]["peak_memory_per_rank"]
    assert cli(["inspect", "--config", str(config), "--world-size", "2", "--parallel", "fsdp"]) == 0
    assert "per rank of 2, fsdp" in capsys.readouterr().out
    assert cli(["inspect", "--config", str(config), "--world-size", "3"]) == 2
    assert "micro-batch 8 (batch_size / grad_accum) must be divisible by the number of ranks (3)" in \
        capsys.readouterr().err
