"""GPTQ (minillm.torch.gptq): the Hessian against its formula, GPTQ = round-to-nearest when the
inputs are uncorrelated (H = I), lower layer-wise output error than RTN on the same calibration
data, for each layer of a trained model, and `minillm quantize --method gptq-int4`."""

from __future__ import annotations

import json

import numpy as np
import torch

from minillm.cli import main as cli
from minillm.torch import gptq, quantize
from minillm.torch.sft import load_for_inference


def output_error(w: torch.Tensor, w_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||² in float64: the layer-wise objective GPTQ minimises."""
    return float(((X.double() @ (w.double() - w_hat.double()).t()) ** 2).sum())


def test_hessian_is_2_xtx_over_n_accumulated_in_batches():
    X = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    h = gptq.Hessian(16)
    for part in X.split(70):  # uneven batches: the running mean must weigh them by size
        h.add(part)
    x64 = X.double().numpy()
    np.testing.assert_allclose(h.H.numpy(), 2 * x64.T @ x64 / 300, rtol=1e-10, atol=1e-12)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H = I has no off-diagonal terms: nothing to compensate, so GPTQ rounds each weight to nearest."""
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = gptq.gptq(w, torch.eye(128, dtype=torch.float64), group_size=32)
    rtn_codes, rtn_scales, rtn_zeros = quantize.quantize_int4(w, 32)
    assert torch.equal(codes, rtn_codes)
    torch.testing.assert_close(scales, rtn_scales)
    torch.testing.assert_close(zeros, rtn_zeros)


def test_gptq_lowers_the_output_error_of_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    X = torch.randn(2048, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.1 * torch.randn(2048, 256,
                                                                                                  generator=g)
    h = gptq.Hessian(256)
    h.add(X)
    rtn = quantize.dequantize_int4(*quantize.quantize_int4(w, 64))
    ours = quantize.dequantize_int4(*gptq.gptq(w, h.H, group_size=64))
    assert output_error(w, ours, X) < 0.5 * output_error(w, rtn, X)


def test_gptq_beats_rtn_on_every_layer_of_a_trained_model(env):
    """Per layer, on the same calibration inputs (those the float model's layers see)."""
    model, _ = load_for_inference(env["base"])
    batches = gptq.calibration_batches(str(env["data"]), n_sequences=32, length=64, batch_size=16)
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = quantize.target_linears(model)
    hooks = [m.register_forward_hook(lambda mod, inp, out, p=p: inputs.setdefault(p, []).append(inp[0]))
             for p, m in layers.items()]
    with torch.no_grad():
        for tokens in batches:
            model(tokens)
    for hook in hooks:
        hook.remove()
    assert len(layers) == 14
    for path, linear in layers.items():
        X = torch.cat(inputs[path]).flatten(0, 1)  # (N, in)
        h = gptq.Hessian(linear.in_features)
        h.add(X)
        w = linear.weight.detach()
        rtn = quantize.dequantize_int4(*quantize.quantize_int4(w, 32))
        ours = quantize.dequantize_int4(*gptq.gptq(w, h.H, group_size=32))
        assert output_error(w, ours, X) < output_error(w, rtn, X), path


def test_quantize_command_gptq_int4(env, tmp_path):
    out = tmp_path / "gptq"
    assert cli(["quantize", "--run", str(env["base"]), "--method", "gptq-int4", "--group-size", "32",
                "--calibration", str(env["data"]), "--calibration-sequences", "16", "--calibration-length",
                "64", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["quantization"]
    assert record["method"] == "gptq-int4" and record["group_size"] == 32 and record["bits"] == 4
    model, _ = load_for_inference(out)
    layer = model.blocks[1].mlp.down
    assert isinstance(layer, quantize.Int4Linear) and layer.qweight.dtype == torch.uint8
