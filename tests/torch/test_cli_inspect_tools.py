"""`minillm attention`, `minillm lens` and `minillm sample --diagnose` on a run built by hand: head 0
attends to the previous token, and the next token is always the following letter (a -> b -> ... ->
h -> a), with a known probability, so greedy output loops through the alphabet."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minillm.checkpoint import save_run
from minillm.cli import main as cli
from minillm.config import ModelConfig
from minillm.tokenizer.char import CharTokenizer
from minillm.torch.model import Transformer, model_params
from minillm.viz import fig_inspect
from minillm.viz.figures import FigureContext
from tests.torch.conftest import one_line_error

LETTERS, CONTEXT, D_TOKEN = "abcdefgh", 48, 8  # positions are one-hot in the first CONTEXT dims
LOGIT = 3.0  # the logit of the next letter (all others 0)


def cycle_model(vocab_size: int, **overrides) -> Transformer:
    """Embeddings: position p -> e_p, letter t -> e_{CONTEXT + t}; the block adds nothing (zero
    output projections) but head 0's queries are the position code shifted by one, so it attends to
    the previous token; lm_head maps letter t's code to a logit LOGIT for letter t + 1."""
    config = ModelConfig(vocab_size=vocab_size, max_seq_len=CONTEXT, d_model=CONTEXT + D_TOKEN, n_layers=1,
                         n_heads=2, head_dim=CONTEXT, norm="rmsnorm", positions="learned", bias=False,
                         tie_embeddings=False, **overrides)
    model = Transformer(config).eval()
    eye = torch.eye(CONTEXT)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.blocks[0].attn_norm, model.blocks[0].mlp_norm, model.norm):
            norm.weight.fill_(1.0)
        model.pos_emb.weight[:, :CONTEXT] = eye
        model.tok_emb.weight[:D_TOKEN, CONTEXT:] = torch.eye(D_TOKEN)
        if config.attention == "softmax":
            model.blocks[0].attn.k.weight[:CONTEXT, :CONTEXT] = eye
            model.blocks[0].attn.q.weight[:CONTEXT, :CONTEXT] = 10.0 * eye.roll(1, dims=1)
        normed = 1.0 / math.sqrt(2 / config.d_model + config.norm_eps)  # RMSNorm of two one-hots: each entry
        for t in range(D_TOKEN):
            model.lm_head.weight[(t + 1) % D_TOKEN, CONTEXT + t] = LOGIT / normed
    return model


def expected_entropy(vocab_size: int) -> float:
    """Entropy in bits of softmax([LOGIT, 0, ..., 0]) over vocab_size tokens, in float64."""
    z = math.exp(LOGIT) + vocab_size - 1
    p_top, p_rest = math.exp(LOGIT) / z, 1 / z
    return -(p_top * math.log2(p_top) + (vocab_size - 1) * p_rest * math.log2(p_rest))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tokenizer = CharTokenizer().train(LETTERS)
    root = tmp_path_factory.mktemp("inspect")
    for name, overrides in (("cycle", {}), ("linear", {"attention": "linear"})):
        model = cycle_model(tokenizer.vocab_size, **overrides)
        save_run(root / name, model.config, tokenizer, model_params(model))
    return {"cycle": str(root / "cycle"), "linear": str(root / "linear"), "root": root,
            "vocab": tokenizer.vocab_size}


def _json(capsys, args: list[str]) -> dict:
    assert cli(args) == 0
    return json.loads(capsys.readouterr().out)


def test_attention_draws_the_previous_token_head_as_an_off_diagonal_line(runs, capsys):
    out = runs["root"] / "maps" / "attention.png"
    args = ["attention", "--run", runs["cycle"], "--text", LETTERS, "--out", str(out), "--json"]
    report = _json(capsys, args)
    weights = np.array(report["weights"])  # (layers, heads, T, T)
    assert report["tokens"] == list(LETTERS) and report["layers"] == [0] and report["heads"] == [0, 1]
    assert weights.shape == (1, 2, 8, 8) and out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert weights[0, 0].argmax(-1).tolist() == [0, 0, 1, 2, 3, 4, 5, 6]  # query p looks at key p - 1
    assert weights[0, 0, 1:].max(-1).min() > 0.99
    one = _json(capsys, ["attention", "--run", runs["cycle"], "--text", "abc", "--out", str(out), "--json",
                         "--heads", "1"])
    np.testing.assert_allclose(one["weights"][0][0], np.tril(np.ones((3, 3))) / [[1], [2], [3]], atol=1e-6)
    assert cli(["attention", "--run", runs["cycle"], "--text", "abc", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 1 layers x 2 heads, 3 tokens\n"


def test_lens_shows_the_next_letter_after_the_block(runs, capsys):
    report = _json(capsys, ["lens", "--run", runs["cycle"], "--text", "abch", "--top-k", "2", "--json"])
    assert report["rows"] == ["embed", "block 0"] and report["tokens"] == list("abch")
    assert report["top_k"] == 2
    final = report["guesses"][-1]  # (T, k): the block adds nothing, so both rows guess the next letter
    assert [cell[0]["token"] for cell in final] == list("bcda")
    p_top = math.exp(LOGIT) / (math.exp(LOGIT) + runs["vocab"] - 1)
    assert all(cell[0]["prob"] == pytest.approx(p_top, abs=1e-5) and len(cell) == 2 for cell in final)
    png = runs["root"] / "lens.png"
    assert cli(["lens", "--run", runs["cycle"], "--text", "ab c", "--out", str(png)]) != 0  # ' ' is unknown
    capsys.readouterr()
    assert cli(["lens", "--run", runs["cycle"], "--text", "abc", "--out", str(png), "--top-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["pos", "token", "next", "|", "embed", "|", "block", "0"]
    assert table[3].split() == ["0", "a", "b", "|", "b", ".61", "|", "b", ".61"]  # e³ / (e³ + 13) = .607
    assert table[-1] == f"wrote {png}" and png.read_bytes().startswith(b"\x89PNG")


def test_sample_diagnose_warns_about_a_loop_and_reports_entropy(runs, capsys):
    args = ["sample", "--run", runs["cycle"], "--prompt", "a", "--temperature", "0", "--diagnose"]
    looping = _json(capsys, args + ["--max-new-tokens", "40", "--json"])["samples"][0]
    assert looping["text"] == "a" + "bcdefgha" * 5
    diagnosis = looping["diagnosis"]
    assert diagnosis["loop"] == {"span": "bcdefgha", "span_tokens": [1, 2, 3, 4, 5, 6, 7, 0], "repeats": 5,
                                 "start": 0, "partial": False}
    np.testing.assert_allclose(diagnosis["entropy"], [expected_entropy(runs["vocab"])] * 40, atol=1e-4)
    assert cli(args + ["--max-new-tokens", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a" + "bcdefgha" * 5 and lines[1].startswith("entropy (bits; 0 = certain): mean ")
    assert lines[-1] == ("warning: sample 1 loops: 'bcdefgha' repeated 5 times from output token 0 to its "
                         "end (8 tokens each)")


def test_sample_diagnose_stays_quiet_when_the_output_does_not_loop(runs, capsys):
    args = ["sample", "--run", runs["cycle"], "--prompt", "a", "--temperature", "0", "--diagnose",
            "--max-new-tokens", "12"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("abcdefghabcde\nentropy") and "warning" not in out
    plain = ["sample", "--run", runs["cycle"], "--prompt", "a", "--temperature", "0", "--max-new-tokens", "4"]
    assert _json(capsys, plain + ["--json"]) == {"samples": [{"text": "abcde"}]}  # no diagnosis asked
    report = _json(capsys, args + ["--json", "--num-samples", "2", "--temperature", "1", "--seed", "3"])
    assert len(report["samples"]) == 2
    for sample in report["samples"]:  # sampled: after a letter the known entropy, after a special token
        tokens = sample["diagnosis"]["tokens"]  # (no code: all logits 0) the uniform one, log2 V
        expected = [expected_entropy(runs["vocab"]) if t < D_TOKEN else math.log2(runs["vocab"])
                    for t in [0] + tokens[:-1]]
        np.testing.assert_allclose(sample["diagnosis"]["entropy"], expected, atol=1e-4)


@pytest.mark.parametrize("args, needles", [
    (["attention", "--text", "abc", "--out", "x.png", "--layers", "1"], ["--layers 1", "1 layers (0..0)"]),
    (["attention", "--text", "abc", "--out", "x.png", "--heads", "0,2"], ["--heads 2", "2 heads (0..1)"]),
    (["attention", "--text", "", "--out", "x.png"], ["--text is empty"]),
    (["lens", "--text", "a" * 49], ["--text is 49 tokens", "max_seq_len 48"]),
    (["lens", "--text", "abc", "--top-k", "0"], ["--top-k must be >= 1"]),
    (["sample", "--prompt", "a", "--diagnose", "--stream"], ["--diagnose and --json", "no --stream"]),
    (["sample", "--prompt", "a", "--diagnose", "--max-new-tokens", "60", "--sliding-window"],
     ["--diagnose scores prompt + output in one pass", "max_seq_len 48"]),
])
def test_bad_input_is_a_one_line_error(runs, capsys, args, needles):
    one_line_error(capsys, [args[0], "--run", runs["cycle"], *args[1:]], *needles)


def test_missing_runs_and_unsupported_architectures_are_named(runs, capsys, tmp_path):
    one_line_error(capsys, ["lens", "--run", str(tmp_path / "nothing"), "--text", "a"], "nothing")
    args = ["attention", "--run", runs["linear"], "--text", "abc", "--out", str(tmp_path / "x.png")]
    one_line_error(capsys, args, "attention='linear'", "no attention maps")
    report = _json(capsys, ["lens", "--run", runs["linear"], "--text", "ab", "--json"])  # the lens applies
    assert [cell[0]["token"] for cell in report["guesses"][-1]] == ["b", "c"]


def test_the_docs_figures_draw_on_a_char_run(tmp_path):
    tokenizer = CharTokenizer().train(fig_inspect.ATTENTION_TEXT + fig_inspect.LENS_TEXT)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=32, d_model=16, n_layers=2,
                                    n_heads=2))
    save_run(tmp_path / "work" / "model", model.config, tokenizer, model_params(model))  # ctx.run()'s run
    ctx = FigureContext(out=tmp_path / "figures", work=tmp_path / "work", quick=True)
    for name, draw in fig_inspect.FIGURES.items():
        draw(ctx)
        assert (tmp_path / "figures" / name).read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in ctx.written) == ["attention-maps.png", "logit-lens.png"]
