"""Fixtures of the server tests: one tiny char-level run (trained once per session) and the real
server (uvicorn on a free localhost port, in a thread) over it."""

from __future__ import annotations

import json
import string

import pytest

from minillm.cli import main as cli
from tests.conftest import prepare_char_data

WORDS = ("Anne", "Bob", "Cleo", "sea", "hill", "moon", "gate", "tower", "river", "bridge")
# Every character a test sends is in the corpus, so the char tokenizer can encode it.
CORPUS = "".join(f"{a} sees the {b} by the {c}.\nWhere? By the {c}!\n" for a in WORDS for b in WORDS
                 for c in WORDS[::3]) * 2 + "0123456789 ,:;'\"?!-()[]{}<>|/_=+*\n" + string.ascii_letters
RUN = dict(batch_size=8, block_size=64, max_steps=200, lr=1e-2, warmup_steps=2, eval_interval=0,
           eval_batches=1, seed=1, dtype="float32", threads=1)
MODEL = dict(max_seq_len=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, norm="rmsnorm",
             positions="rope", mlp="swiglu")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A LLaMA-style char model (GQA, RoPE, SwiGLU) with a 128-token context."""
    import torch

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("serve")
    data = prepare_char_data(root, CORPUS)
    top = {**RUN, "data_dir": str(data), "out_dir": str(root / "tiny")}
    toml = [f"{k} = {json.dumps(v)}" for k, v in top.items()] + ["[model]"] \
        + [f"{k} = {json.dumps(v)}" for k, v in MODEL.items()]
    (root / "tiny.toml").write_text("\n".join(toml) + "\n")
    assert cli(["train", "--config", str(root / "tiny.toml"), "--quiet"]) == 0
    torch.set_num_threads(threads)
    return root / "tiny"


@pytest.fixture(scope="session")
def loaded(run_dir):
    """(model, tokenizer) of the run, as the server loads it."""
    from minillm.torch.sft import load_for_inference

    return load_for_inference(run_dir)


def greedy_reference(loaded, prompt_ids: list[int], max_tokens: int, stop_token_ids=(), stop_strings=(),
                     temperature: float = 0.0, top_p: float | None = None, seed: int | None = None) -> str:
    """What `minillm sample` prints after the prompt, from minillm.torch.generate on its own (one
    request, no batch, no server): generate(), then text_pieces (stop token and string cut off)."""
    from minillm.tokenizer.stream import text_pieces
    from minillm.torch.generate import generate

    model, tokenizer = loaded
    out = generate(model, prompt_ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer)
    return "".join(text_pieces(out, tokenizer, stop_strings, stop_token_ids))


@pytest.fixture(scope="module")
def server(run_dir):
    """The real server (uvicorn, localhost, a free port) over the run: (base_url, app)."""
    from minillm.serve.app import create_app, run_in_thread

    app = create_app([str(run_dir)], max_batch=4, max_queue=64)
    base_url, stop = run_in_thread(app)
    yield base_url, app
    stop()
