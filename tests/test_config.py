import json

import pytest

from minillm.config import MODEL_PRESETS, ModelConfig, load_train_config, parse_overrides


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_build_and_round_trip_json(name, tmp_path):
    c = ModelConfig.preset(name)
    (tmp_path / "c.json").write_text(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == c


@pytest.mark.parametrize(
    "fields, field_name",
    [
        (dict(d_model=130, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(norm="batchnorm"), "norm"),
        (dict(positions="xpos"), "positions"),
        (dict(mlp="relu"), "mlp"),
        (dict(n_layers=0), "n_layers"),
        (dict(dropout=1.5), "dropout"),
        (dict(positions="rope", d_model=12, n_heads=4), "rope"),
    ],
)
def test_bad_config_names_the_field(fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        ModelConfig(**fields)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ValueError, match="dmodel"):
        ModelConfig.from_dict({"dmodel": 64})
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig.from_dict({"d_model": "64"})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt5")


def test_toml_with_preset_and_overrides(tmp_path):
    p = tmp_path / "m.toml"
    no_data = tmp_path / "no-data"  # no meta.json: vocab_size stays the preset's
    p.write_text(f'data_dir = "{no_data}"\nblock_size = 32\n[model]\npreset = "llama-tiny"\nn_layers = 2\n')
    c = load_train_config(p, ["model.d_model=192", "model.n_heads=6", "model.tie_embeddings=false"]).model
    assert (c.n_layers, c.d_model, c.tie_embeddings, c.positions) == (2, 192, False, "rope")
    assert parse_overrides(["lr=3e-4", "name=abc"]) == {"lr": 3e-4, "name": "abc"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])


def test_defaults_follow_the_papers():
    assert ModelConfig(d_model=128, mlp="gelu").d_ff == 512
    assert ModelConfig(d_model=384, mlp="swiglu").d_ff == 1024  # 8/3 * 384 rounded up to 64
    assert ModelConfig(n_heads=4).n_kv_heads == 4
    assert json.loads(json.dumps(ModelConfig().to_dict()))["n_kv_heads"] == 4


def test_vocab_size_comes_from_the_data_unless_set(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 321}))
    p = tmp_path / "t.toml"
    p.write_text(f'data_dir = "{tmp_path}"\nblock_size = 32\n[model]\npreset = "gpt-char"\n')
    assert load_train_config(p).model.vocab_size == 321
    assert load_train_config(p, ["model.vocab_size=400"]).model.vocab_size == 400
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": "many"}))
    with pytest.raises(ValueError, match="meta.json: vocab_size must be a positive integer"):
        load_train_config(p)
