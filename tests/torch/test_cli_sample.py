"""`minillm sample`, `minillm chat` and `minillm eval` on a tiny run directory."""

import io
import json
import math

import numpy as np
import pytest
import torch

from minillm.checkpoint import save_run
from minillm.cli import main
from minillm.config import ModelConfig
from minillm.torch.model import Transformer, model_params

TEXT = "hello world. the quick brown fox jumps over the lazy dog.\nUser: Assistant:"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from minillm.tokenizer.char import CharTokenizer

    tok = CharTokenizer().train(TEXT)
    config = ModelConfig(vocab_size=tok.vocab_size + 3,  # padded beyond the tokenizer's vocabulary
                         max_seq_len=64, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)  # peaked distributions: outputs do not hinge on rounding
    path = tmp_path_factory.mktemp("run")
    save_run(path, config, tok, model_params(model))
    return str(path)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_greedy_is_deterministic_and_stream_matches(run_dir, capsys):
    args = ["sample", "--run", run_dir, "--prompt", "the ", "--max-new-tokens", "20", "--temperature", "0"]
    code, out, _ = _run(capsys, *args)
    assert code == 0 and out.startswith("the ")
    assert _run(capsys, *args)[1] == out
    assert _run(capsys, *args, "--stream")[1] == out


def test_sample_num_samples_batched_equals_streamed_one_by_one(run_dir, capsys):
    args = ["sample", "--run", run_dir, "--prompt", "hello", "--max-new-tokens", "15", "--seed", "7",
            "--num-samples", "3", "--top-k", "10", "--top-p", "0.95"]
    code, batched, _ = _run(capsys, *args)
    assert code == 0 and batched.count("---------------") == 2
    assert _run(capsys, *args, "--stream")[1] == batched
    assert _run(capsys, *args)[1] == batched  # same seed, same output


def test_sample_beam_search_and_stop_string(run_dir, capsys):
    code, out, _ = _run(capsys, "sample", "--run", run_dir, "--prompt", "the", "--max-new-tokens", "10",
                        "--num-beams", "3")
    assert code == 0 and out.startswith("the")
    greedy = ["sample", "--run", run_dir, "--prompt", "the", "--max-new-tokens", "30", "--temperature", "0"]
    free = _run(capsys, *greedy)[1]
    stop = free[8:10]
    cut = _run(capsys, *greedy, "--stop", stop)[1]
    assert cut.rstrip("\n") == free[: free.index(stop, 3)]


def test_sample_context_overflow_is_a_clear_error_unless_sliding(run_dir, capsys):
    args = ["sample", "--run", run_dir, "--prompt", "hello world. " * 4, "--max-new-tokens", "30",
            "--temperature", "0"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "max_seq_len" in err and "Traceback" not in err
    code, out, _ = _run(capsys, *args, "--sliding-window")
    assert code == 0 and len(out) > len("hello world. " * 4)


def test_sample_unknown_character_is_a_clear_error(run_dir, capsys):
    code, _, err = _run(capsys, "sample", "--run", run_dir, "--prompt", "€")
    assert code == 2 and "vocabulary" in err


def test_chat_streams_resets_and_exits(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe dog\n/reset\nhello\n€\n/exit\n"))
    code, out, err = _run(capsys, "chat", "--run", run_dir, "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0
    assert out.count("model> ") == 3 and "(conversation cleared)" in out and "cannot encode" in out
    assert "/reset" in err  # the help line


def test_chat_conversation_stays_within_the_context(run_dir):
    from minillm.commands.chat import Conversation
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir)
    bos, eos, system, user, assistant = map(tok.special_id, ("bos", "eos", "system", "user", "assistant"))
    head = [bos, system] + tok.encode("the fox") + [eos]
    conv = Conversation(tok, max_seq_len=64, system="the fox")
    for i in range(20):
        ids = conv.prompt("hello world", reserve=16)
        assert len(ids) <= 64 - 16
        assert ids[: len(head)] == head  # the system prompt stays
        turn = [user] + tok.encode("hello world") + [eos, assistant]
        assert ids[-len(turn):] == turn
        conv.add_reply("the dog")


def test_chat_feeds_the_ids_finetuning_trains_on(run_dir):
    from minillm.commands.chat import Conversation
    from minillm.tokenizer import load_tokenizer
    from minillm.tokenizer.chat import render_for_training

    tok = load_tokenizer(run_dir)
    conv = Conversation(tok, max_seq_len=64)
    conv.prompt("hello", reserve=16)
    conv.add_reply(" the dog \n")  # shown text; the recorded turn is stripped
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the dog"}]
    trained_ids, _ = render_for_training(tok, messages)
    assert conv.prompt("the fox", reserve=16)[: len(trained_ids)] == trained_ids


def _write_tokens(tmp_path, ids, dtype="uint16"):
    np.asarray(ids, dtype=dtype).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": 60}))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_eval_perplexity_matches_a_direct_computation(run_dir, tmp_path, capsys, dtype):
    from minillm.torch.model import load_model

    ids = np.random.default_rng(0).integers(0, 30, 150)
    _write_tokens(tmp_path, ids, dtype)
    code, out, _ = _run(capsys, "eval", "--run", run_dir, "--data", str(tmp_path), "--block-size", "32",
                        "--batch-size", "3")
    assert code == 0
    model, _ = load_model(run_dir)
    x = torch.tensor(ids)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(x[i:min(i + 32, 149)][None])[0], x[i + 1:i + 33],
                                                 reduction="sum") for i in range(0, 149, 32)]
    loss = sum(n.item() for n in nll) / 149
    assert f"perplexity {math.exp(loss):.3f}" in out and "149 tokens" in out


def test_eval_needs_meta_json(run_dir, tmp_path, capsys):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    code, _, err = _run(capsys, "eval", "--run", run_dir, "--data", str(tmp_path / "val.bin"))
    assert code == 2 and "meta.json" in err
