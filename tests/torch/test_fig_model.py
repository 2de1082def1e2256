"""The figures drawn from a trained model (minillm.viz.fig_model / fig_interop / fig_quantize): their
numbers against independent references, and every figure written as a PNG from a tiny run."""

from __future__ import annotations

import json
import shutil

import matplotlib
import numpy as np
import pytest
import torch

from minillm.checkpoint import load_run
from minillm.torch import quantize
from minillm.torch.gptq import calibration_batches
from minillm.torch.model import load_model
from minillm.viz import fig_interop, fig_model, fig_quantize
from minillm.viz.figures import FigureContext

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def figures(env, tmp_path_factory):
    """A FigureContext whose work/model is a copy of the tiny base run (so ctx.run() trains nothing)."""
    work = tmp_path_factory.mktemp("figwork")
    shutil.copytree(env["base"], work / "model")
    return FigureContext(out=tmp_path_factory.mktemp("figout"), work=work, quick=True)


def test_loss_curves_are_the_logged_rows(env):
    rows = [json.loads(line) for line in (env["base"] / "metrics.jsonl").read_text().splitlines()]
    curves = fig_model.loss_curves(env["base"])
    assert curves["train"] == [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(curves["train"]) >= 3 and len(curves["speed"]) >= 3


def test_residual_streams_are_the_blocks_outputs(env):
    """Stream 0 is the token embedding (RoPE adds nothing to x), stream i + 1 is block i applied to
    stream i, and the final norm of the last stream is Transformer.hidden."""
    model, tokenizer = load_model(env["base"])
    labels, streams = fig_model.residual_streams(env["base"])
    ids = torch.tensor([tokenizer.encode(fig_model.PROMPT)])
    T = ids.size(1)
    assert streams.shape == (model.config.n_layers + 1, T, model.config.d_model) and len(labels) == T
    assert labels[:6] == ["W", "h", "e", "r", "e", "␣"]
    with torch.inference_mode():
        torch.testing.assert_close(streams[0], model.tok_emb(ids)[0])
        for i, block in enumerate(model.blocks):
            torch.testing.assert_close(streams[i + 1], block(streams[i][None], model.rope(None, T))[0])
        torch.testing.assert_close(model.norm(streams[-1]), model.hidden(ids)[0])


def test_kv_cache_timings_decode_the_same_tokens(env):
    """Cached (generate) and uncached decodes pick the same greedy tokens, the uncached ones checked
    once more against argmax over a single forward pass of the final sequence."""
    t = fig_model.kv_cache_timings(env["base"], [8, 300], new_tokens=5, repeats=1)  # 300 > max_seq_len 256
    assert t["cached"] == t["uncached"] and all(len(x) == 5 for x in t["cached"])
    assert all(ms > 0 for ms in t["cached_ms"] + t["uncached_ms"])
    model, tokenizer = load_model(env["base"])
    prompt = fig_model.prompt_ids(tokenizer, 8)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + t["cached"][0]]))[0]
    assert logits[7:-1].argmax(-1).tolist() == t["cached"][0]


def test_sft_targets_are_the_assistant_span_by_hand(env):
    _, tokenizer, _ = load_run(env["base"])
    special = tokenizer.special_id
    ids, trained = fig_model.sft_targets(tokenizer)
    prompt = ([special("bos"), special("system")] + tokenizer.encode("Answer briefly.")
              + [special("eos"), special("user")] + tokenizer.encode("Where is the moon?")
              + [special("eos"), special("assistant")])
    answer = tokenizer.encode("By the sea.") + [special("eos")]
    assert ids == prompt + answer
    assert trained == [False] * len(prompt) + [True] * len(answer)


def test_jax_and_torch_logits_agree(env):
    ours, theirs = fig_interop.jax_vs_torch(env["base"])
    assert ours.shape == theirs.shape and ours.shape[0] == len(fig_model.PROMPT)
    assert np.abs(ours - theirs).max() < 1e-4 and ours.std() > 0.1  # a real model, not all zeros


def test_export_parity_with_transformers(env):
    ours, theirs = fig_interop.export_parity(env["base"])
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4


def test_quantization_errors_against_direct_computation(env):
    """int8 < int4 in weight error on every layer, GPTQ < int4 RTN in output error on average, and
    the output error read from the Hessian equals ||X ΔWᵀ|| / ||X Wᵀ|| on the captured inputs X."""
    errors = fig_quantize.quantization_errors(env["base"], env["data"], n_sequences=8)
    model, _ = load_model(env["base"])
    linears = quantize.target_linears(model)
    assert set(errors) == set(linears)
    int4 = [p for p in errors if "int4" in errors[p]]
    assert int4 and all(errors[p]["int8"][0] < errors[p]["int4"][0] for p in int4)
    assert np.mean([errors[p]["gptq-int4"][1] / errors[p]["int4"][1] for p in int4]) < 1
    path = "blocks.1.attn.q"  # one layer, by hand: its inputs on the same calibration batches
    inputs = []
    hook = linears[path].register_forward_hook(lambda m, args, out: inputs.append(args[0].flatten(0, -2)))
    with torch.inference_mode():
        for batch in calibration_batches(str(env["data"]), 8, min(256, model.config.max_seq_len)):
            model(batch)
    hook.remove()
    X, W = torch.cat(inputs).double(), linears[path].weight.detach().double()
    scale = W.abs().amax(1, keepdim=True) / 127  # int8 per output channel, written out
    Q = torch.round(W / scale).clamp(-127, 127) * scale
    assert errors[path]["int8"][0] == pytest.approx(float((W - Q).norm() / W.norm()), rel=1e-4)
    output = float((X @ (W - Q).T).norm() / (X @ W.T).norm())
    assert errors[path]["int8"][1] == pytest.approx(output, rel=1e-4)


@pytest.mark.parametrize("name", [*fig_model.FIGURES, *fig_interop.FIGURES, *fig_quantize.FIGURES])
def test_figure_is_written(figures, name):
    draw = {**fig_model.FIGURES, **fig_interop.FIGURES, **fig_quantize.FIGURES}[name]
    path = draw(figures)
    assert path == figures.out / name and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
