"""Run-directory I/O: round trip, atomic writes, clear errors for bad files."""

import dataclasses

import pytest
import torch

from minillm import checkpoint
from minillm.config import ModelConfig
from minillm.torch.model import Transformer, load_model, model_params

CFG = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  norm="rmsnorm", positions="rope", mlp="swiglu")


@pytest.mark.parametrize("cfg", [CFG, ModelConfig.preset("gpt-char", bias=True, tie_embeddings=False)])
def test_canonical_shapes_match_the_torch_model(cfg):
    sd = Transformer(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == checkpoint.canonical_shapes(cfg)


def test_save_load_round_trip(tmp_path):
    model = Transformer(CFG).eval()
    checkpoint.save_run(tmp_path, CFG, None, model_params(model))
    loaded, tok = load_model(tmp_path)
    assert tok is None and loaded.config == CFG
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    checkpoint.save_run(tmp_path, CFG, None, model_params(Transformer(CFG)))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {"d_mo')
    with pytest.raises(checkpoint.CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_other_architecture_is_a_clear_error(tmp_path):
    checkpoint.save_run(tmp_path, CFG, None, model_params(Transformer(CFG)))
    other = dataclasses.replace(CFG, n_kv_heads=4)
    with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
        checkpoint.load_weights(tmp_path, other)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_weights(tmp_path / "nope")
