"""Our LoRA against the `peft` library's on the `transformers` export of the same model and values."""

import json

import pytest
import torch

from minillm.checkpoint import CheckpointError
from minillm.interop import hf
from minillm.interop import peft as peft_io
from minillm.torch import lora
from tests.conftest import make_model

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TOKENS = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
RANK, ALPHA = 4, 8
# Written out here, independently of minillm.interop.peft: our layer -> its transformers module
MODULES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
           "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
           "mlp.down": "mlp.down_proj"}


def _pair(targets=("q", "k", "v", "o", "gate", "up", "down")):
    """Our model with a random adapter, and peft on its transformers export with the same A/B values."""
    model = make_model("llama-gqa")
    hf_model = hf.to_transformers(model)  # exported before the swap: the base weights only
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=[f"{t}_proj" for t in targets])
    peft_model = peft.get_peft_model(hf_model, config)
    lora.add_lora(model, rank=RANK, alpha=ALPHA, targets=targets)
    theirs = dict(peft_model.named_parameters())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(model.config.n_layers):
            for ours_name, their_name in MODULES.items():
                if ours_name.split(".")[1] not in targets:
                    continue
                layer = model.get_submodule(f"blocks.{i}.{ours_name}")
                for ab in "AB":  # B non-zero too, or B's mapping would go untested
                    w = getattr(layer, f"lora_{ab}")["default"].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)
                    theirs[f"base_model.model.model.layers.{i}.{their_name}.lora_{ab}.default.weight"].copy_(w)
    return model, peft_model


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_logits_and_gradients_match_peft():
    model, peft_model = _pair()
    ours = model(TOKENS)
    theirs = peft_model(input_ids=TOKENS).logits
    _close(ours, theirs)
    assert (ours - make_model("llama-gqa")(TOKENS)).abs().max() > 0.1  # the adapter matters
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * weights).sum().backward()  # the same loss on both
    (theirs * weights).sum().backward()
    their_params = dict(peft_model.named_parameters())
    n = 0
    for i in range(model.config.n_layers):
        for ours_name, their_name in MODULES.items():
            layer = model.get_submodule(f"blocks.{i}.{ours_name}")
            for ab in "AB":
                grad = getattr(layer, f"lora_{ab}")["default"].weight.grad
                their = their_params[
                    f"base_model.model.model.layers.{i}.{their_name}.lora_{ab}.default.weight"]
                assert grad.abs().max() > 0
                _close(grad, their.grad)
                n += 1
    assert n == 2 * 7 * 2


def test_loraplus_steps_match_peft():
    """LoRA+ (B at 16x A's learning rate) through our make_optimizer and Trainer's lr_scale rule, against
    peft's create_loraplus_optimizer: the same adapters after two AdamW steps on the same loss."""
    from peft.optimizers import create_loraplus_optimizer

    from minillm.config import TrainConfig
    from minillm.torch.optim import make_optimizer

    model, peft_model = _pair()
    lora.freeze_base(model)
    lr, ratio = 1e-2, 16.0
    cfg = TrainConfig(lr=lr, weight_decay=0.0)
    ours = make_optimizer(cfg, model, lambda name: ratio if ".lora_B." in name else 1.0)[0]
    for group in ours.param_groups:  # what Trainer.train_step does each step with the schedule's lr
        group["lr"] = lr * group["lr_scale"]
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0)
    for _ in range(2):
        for m, opt in ((model, ours), (peft_model, theirs)):
            logits = m(TOKENS) if m is model else m(input_ids=TOKENS).logits
            logits.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    their_params = dict(peft_model.named_parameters())
    for i in range(model.config.n_layers):
        for ours_name, their_name in MODULES.items():
            layer = model.get_submodule(f"blocks.{i}.{ours_name}")
            for ab in "AB":
                their = f"base_model.model.model.layers.{i}.{their_name}.lora_{ab}.default.weight"
                _close(getattr(layer, f"lora_{ab}")["default"].weight, their_params[their])


def test_adapter_saved_by_peft_loads_here(tmp_path):
    model, peft_model = _pair(targets=("q", "v", "down"))
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=TOKENS).logits
    fresh = make_model("llama-gqa")
    config = peft_io.load_peft(fresh, tmp_path, name="from_peft")
    assert config == lora.LoRAConfig(RANK, ALPHA, 0.0, ("q", "v", "down"))
    with torch.no_grad():
        _close(fresh(TOKENS), expected)
    assert lora.active_adapter(fresh) == "from_peft"


def test_our_adapter_loads_in_peft(tmp_path):
    model, _ = _pair(targets=("k", "o", "gate", "up"))
    peft_io.save_peft(model, tmp_path)
    with torch.no_grad():
        expected = model(TOKENS)
    base = hf.to_transformers(make_model("llama-gqa"))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        _close(loaded(input_ids=TOKENS).logits, expected)
    assert sorted(loaded.peft_config["default"].target_modules) == ["gate_proj", "k_proj", "o_proj",
                                                                    "up_proj"]
    # and back: our own reader gives the same adapter
    again = make_model("llama-gqa")
    peft_io.load_peft(again, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(TOKENS), expected)


def test_gpt2_style_models_are_refused(tmp_path):
    model = make_model("gpt2")
    lora.add_lora(model, rank=2)
    with pytest.raises(ValueError, match="LLaMA-style models only: the GPT-2 export fuses q, k and v"):
        peft_io.save_peft(model, tmp_path)
    with pytest.raises(ValueError, match="LLaMA-style models only"):
        peft_io.load_peft(make_model("gpt2"), tmp_path)


def _peft_dir(tmp_path):
    model, _ = _pair(targets=("q", "v"))
    peft_io.save_peft(model, tmp_path)
    return tmp_path / "adapter_config.json"


@pytest.mark.parametrize("fields, message", [
    (dict(use_dora=True), r"adapter_config.json: use_dora=True is not supported"),
    (dict(use_rslora=True), r"adapter_config.json: use_rslora=True is not supported"),
    (dict(bias="all"), r"adapter_config.json: bias='all' is not supported"),
    (dict(lora_bias=True), r"adapter_config.json: lora_bias=True is not supported"),
    (dict(rank_pattern={"q_proj": 8}), r"adapter_config.json: rank_pattern=\{'q_proj': 8\} is not supported"),
    (dict(peft_type="IA3"), r"adapter_config.json: peft_type 'IA3' is not supported"),
    (dict(target_modules="all-linear"), r"adapter_config.json: target_modules must be a list"),
    (dict(target_modules=["q_proj", "lm_head"]), r"adapter_config.json: target module 'lm_head'"),
    (dict(r=8), r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A"
                r".weight' has shape \[4, 32\], the model needs \[8, 32\]"),
    (dict(target_modules=["q_proj"]),
     r"adapter_model.safetensors: unexpected tensor 'base_model.model.model.layers.0.self_attn.v_proj"
     r".lora_A.weight'"),
])
def test_unsupported_peft_adapters_give_one_line_errors(tmp_path, fields, message):
    path = _peft_dir(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    model = make_model("llama-gqa")
    with pytest.raises(CheckpointError, match=message) as err:
        peft_io.load_peft(model, tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert not lora.lora_layers(model)


def test_foreign_tensor_names_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    _peft_dir(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = tensors.popitem()[1]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'base_model.model.model.layers.0.self_attn"
                                              r".q_proj.lora_magnitude_vector'"):
        peft_io.load_peft(make_model("llama-gqa"), tmp_path)
