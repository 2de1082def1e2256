"""llama.cpp itself (through llama-cpp-python) runs our GGUF exports: same token ids from the tokenizer
metadata and the chat template, same greedy continuation as our model in f32 and f16 (LLaMA-style GQA
and GPT-2 style), the same logits (also on random configs with biases, MQA, untied heads), and q8_0
perplexity within 1% of f32's.

Slow (`make test-slow`): llama-cpp-python compiles llama.cpp when installed (minutes on 2 cores), and
the module trains two tiny models so that greedy paths have real margins. Skipped without it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minillm.checkpoint import save_run
from minillm.config import ModelConfig
from minillm.tokenizer import chat
from minillm.tokenizer.bpe import BPETokenizer
from minillm.torch.generate import generate
from minillm.torch.model import Transformer
from tests.conftest import perturbed_torch_model

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from minillm.interop.gguf import export_gguf  # noqa: E402  (needs the gguf package)

WORDS = dict(who=["Anne", "Bob", "the old king", "a fox", "Cleo"],
             did=["saw", "found", "lost", "counted", "painted"], n=["2", "17", "365", "three", "many"],
             what=["cats", "moons", "red apples", "letters", "boats"],
             where=["by the gate", "near the river", "on the hill", "in the tower"])


def corpus(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(f"{rng.choice(WORDS['who'])} {rng.choice(WORDS['did'])} {rng.choice(WORDS['n'])} "
                   f"{rng.choice(WORDS['what'])} {rng.choice(WORDS['where'])}{rng.choice(['.', '!', '?'])}\n"
                   for _ in range(n_lines))


TRAIN, HELD_OUT = corpus(3000, seed=0), corpus(40, seed=1)
STYLES = {  # a LLaMA-style GQA model with an untied head, and a GPT-2 style one
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=2, rope_theta=20000.0,
                  tie_embeddings=False),
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu", bias=True),
}


def train_run(root, style: str, pattern: str, steps: int = 250):
    """A BPE tokenizer and a model trained briefly on TRAIN, saved as a run directory."""
    torch.manual_seed(0)
    tok = BPETokenizer(pattern).train(TRAIN, 400)
    config = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                         **STYLES[style])
    model = Transformer(config)
    data = torch.tensor(tok.encode(TRAIN))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,)).tolist()
        batch = torch.stack([data[s:s + 65] for s in starts])  # (16, 65)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_run(root / style, config, tok, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    return root / style, model, tok


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    out = {"llama": train_run(root, "llama", "gpt4"), "gpt2": train_run(root, "gpt2", "gpt2")}
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def load(monkeypatch):
    """Opens a GGUF file in llama.cpp, with its KV cache in f32 (default f16), so f32 means f32
    throughout, and without "extra buffer types": those repack q8_0 weights for AMX, which a
    llama.cpp built for this CPU uses but a sandboxed kernel may not enable (SIGILL)."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    f32 = llama_cpp.GGML_TYPE_F32
    return lambda path: llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=1,
                                        verbose=False, type_k=f32, type_v=f32)


def greedy_llama_cpp(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            return out
    return out


def f16_rounded(model: Transformer) -> Transformer:
    """Our model with the weights an f16 GGUF stores in f16 (every matrix) rounded to f16."""
    copy = Transformer(model.config).eval()
    copy.load_state_dict({k: v.half().float() if v.dim() == 2 and k != "pos_emb.weight" else v
                          for k, v in model.state_dict().items()})
    return copy


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_llama_cpp_tokenizes_as_we_do(runs, load, tmp_path, style):
    run, _, tok = runs[style]
    export_gguf(run, tmp_path / "m.gguf")
    llm = load(tmp_path / "m.gguf")
    lines = HELD_OUT.splitlines(keepends=True) + [
        HELD_OUT, "don't  stop\n\n  now", "12345678 apples", "Tab\there\r\nCRLF", "  trailing  ",
        "café ünïcode", "!!! ??? ... ---", "x" * 40]
    for text in lines:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    ids = llm.tokenize(b"<|user|>Who saw 17 cats?<|eos|>", add_bos=False, special=True)
    assert ids == [tok.special_id("user"), *tok.encode("Who saw 17 cats?"), tok.special_id("eos")]
    assert llm.detokenize(tok.encode(HELD_OUT)).decode() == HELD_OUT


def test_llama_cpp_python_chat_template_gives_our_ids(runs, load, tmp_path):
    """The template llama-cpp-python's create_chat_completion renders, tokenized by llama.cpp."""
    run, _, tok = runs["llama"]
    export_gguf(run, tmp_path / "m.gguf")
    llm = load(tmp_path / "m.gguf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who saw 17 cats?"},
                {"role": "assistant", "content": "Anne did."}, {"role": "user", "content": "Where?"}]
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|eos|>",
                                    bos_token="<|bos|>")
    prompt = formatter(messages=messages).prompt
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == chat.render(tok, messages, add_generation_prompt=True)


@pytest.mark.parametrize("style, dtype", [("llama", "f32"), ("llama", "f16"), ("gpt2", "f32"),
                                          ("gpt2", "f16")])
def test_greedy_tokens_equal_ours(runs, load, tmp_path, style, dtype):
    run, model, tok = runs[style]
    export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    reference = f16_rounded(model) if dtype == "f16" else model
    llm = load(tmp_path / "m.gguf")
    for prompt in ("Anne saw", "the old king found 17", "Cleo"):
        ids = tok.encode(prompt)
        ours = generate(reference, ids, 32, temperature=0.0)
        assert greedy_llama_cpp(llm, ids, 32) == ours, prompt


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token negative log-likelihood, in float64; logits (T, V) for ids (T,)."""
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_llama_cpp_logits_match_and_q8_0_perplexity_within_1_percent(runs, load, tmp_path):
    run, model, tok = runs["llama"]
    ids = tok.encode(HELD_OUT)[:128]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    ppl = {}
    for dtype in ("f32", "q8_0"):
        export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)
        llm = load(tmp_path / f"{dtype}.gguf")
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)])
        if dtype == "f32":
            assert np.abs(logits - ours).max() < 1e-4  # 4e-6 here, on logits up to 11
        ppl[dtype] = perplexity(logits, ids)
    assert ppl["f32"] == pytest.approx(perplexity(ours, ids), rel=1e-4)
    assert ppl["f32"] < 10  # the model learned the corpus: the comparison below has meaning
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01


# Random (untrained) models with every tensor moved off its init, so that no mapping hides, and a
# vocabulary padded past the tokenizer's: llama.cpp's logits against ours, relative to the largest
# logit (float32 sums in another order differ by ~1e-5 of it). gpt2's tolerance is wider because
# ggml's GELU looks its input up in an f16 table.
AWKWARD = {
    "llama-mqa-bias-untied": (dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=1, bias=True,
                                   rope_theta=1234.0, norm_eps=1e-6, tie_embeddings=False), 3e-5),
    "gpt2-gqa-untied": (dict(norm="layernorm", positions="learned", mlp="gelu", n_kv_heads=2, bias=True,
                             tie_embeddings=False), 1e-3),
}


@pytest.mark.parametrize("name", AWKWARD)
def test_llama_cpp_logits_match_on_awkward_configs(load, tmp_path, name):
    fields, tolerance = AWKWARD[name]
    tok = BPETokenizer().train(HELD_OUT, 300)
    config = ModelConfig(vocab_size=tok.vocab_size + 4, max_seq_len=64, d_model=64, n_layers=2, n_heads=4,
                         **fields)  # a padded embedding table: llama.cpp gets "[PAD<id>]" tokens
    model = perturbed_torch_model(config, scale=0.5, seed=3)
    save_run(tmp_path / "run", config, tok, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    ids = torch.randint(0, tok.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = load(tmp_path / "m.gguf")
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(ours).max() > 5  # logits far from uniform: the comparison has teeth
    assert np.abs(np.array(llm.scores[:len(ids)]) - ours).max() < tolerance * np.abs(ours).max()
