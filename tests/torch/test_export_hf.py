"""`minillm export hf`: the exported directory, read by transformers itself (AutoModelForCausalLM,
AutoTokenizer, pipeline, peft), computes our logits, generates our tokens, tokenizes as we do and
renders our chat template; what transformers cannot express is refused and nothing is written."""

import json
import random

import pytest
import torch

from minillm.checkpoint import save_run
from minillm.config import ModelConfig
from minillm.tokenizer import BPETokenizer, CharTokenizer
from minillm.tokenizer.chat import render, stop_token_ids
from minillm.torch import lora
from minillm.torch.generate import generate
from minillm.torch.model import Transformer, load_model, model_params
from minillm.torch.sft import load_for_inference
from tests.conftest import TRICKY, random_unicode
from tests.torch.conftest import CORPUS, EXAMPLES, one_line_error

transformers = pytest.importorskip("transformers")
from minillm.cli import main as cli  # noqa: E402
from minillm.interop import hf_dir  # noqa: E402

GPT2 = dict(max_seq_len=96, d_model=48, n_layers=2, n_heads=4, norm="layernorm", positions="learned")
RUNS = {  # name -> (tokenizer kind, model fields)
    # nanoGPT's (no biases, erf GELU) with grouped-query attention: zero biases, K/V heads repeated
    "gpt2-char": ("char", dict(GPT2, mlp="gelu_exact", bias=False, n_kv_heads=2)),
    "gpt2-bpe": ("bpe", dict(GPT2, mlp="gelu", bias=True, tie_embeddings=False)),
    "llama-gqa-bpe": ("bpe", dict(max_seq_len=96, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80,
                                  norm="rmsnorm", positions="rope", mlp="swiglu", rope_theta=500000.0,
                                  tie_embeddings=False)),
}
CONVERSATIONS = [e["messages"] if "messages" in e else
                 [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["completion"]}]
                 for e in EXAMPLES[::5]]


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Every weight random (gains near 1, biases too), matrices scaled up so greedy paths are not ties."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.1) + ("norm.weight" in name))
    return model


def make_run(root, name: str):
    kind, fields = RUNS[name]
    tokenizer = CharTokenizer().train(CORPUS) if kind == "char" else BPETokenizer().train(CORPUS, 400)
    model = random_model(ModelConfig(vocab_size=tokenizer.vocab_size, **fields))
    save_run(root / name, model.config, tokenizer, model_params(model))
    return root / name, model, tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (run dir, our model, our tokenizer, export dir), exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in RUNS:
        run, model, tokenizer = make_run(root, name)
        assert cli(["export", "hf", "--run", str(run), "--out", str(root / f"hf-{name}")]) == 0
        out[name] = (run, model, tokenizer, root / f"hf-{name}")
    return out


@pytest.mark.parametrize("name", RUNS)
def test_logits_and_64_greedy_tokens_match_transformers(exported, name):
    _, model, tokenizer, hf_dir = exported[name]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.max_seq_len))
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-5
    prompt = tokenizer.encode("Where does Anne see")
    ours = generate(model, prompt, 64, temperature=0)
    ids = torch.tensor([prompt])
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                               min_new_tokens=64, eos_token_id=None)
    assert len(ours) == 64 and ours == theirs[0, len(prompt):].tolist()
    # With the exported generation_config: greedy, stopping where our chat stops (eos, role tokens).
    stops = stop_token_ids(tokenizer)
    ours = generate(model, prompt, 64, temperature=0, stop_token_ids=stops)
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64)
    theirs = theirs[0, len(prompt):].tolist()
    assert ours == theirs[: len(ours)] and (len(ours) == 64 or ours[-1] in stops)


@pytest.mark.parametrize("name", RUNS)
def test_export_then_import_gives_back_the_same_run(exported, name, tmp_path):
    _, model, tokenizer, hf_dir = exported[name]
    assert cli(["import", "hf", "--model", str(hf_dir), "--out", str(tmp_path / "back")]) == 0
    back, back_tokenizer = load_model(tmp_path / "back")
    assert back_tokenizer.to_dict() == tokenizer.to_dict()  # same ids: nothing renumbered
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.max_seq_len))
    with torch.no_grad():
        assert (back(tokens) - model(tokens)).abs().max().item() <= 1e-5


def random_strings(tokenizer, n: int = 1000) -> list[str]:
    """n seeded strings: any text for BPE; the corpus' characters for a char tokenizer (it has no others)."""
    rng = random.Random(0)
    if isinstance(tokenizer, CharTokenizer):
        return ["".join(rng.choices(tokenizer.chars, k=rng.randrange(0, 60))) for _ in range(n)]
    return [random_unicode(rng.randrange(0, 30), seed) if seed % 2 else "".join(rng.choices(TRICKY, k=5))
            for seed in range(n)]


@pytest.mark.parametrize("name", RUNS)
def test_tokenizer_and_chat_template_ids_match(exported, name):
    _, _, tokenizer, hf_dir = exported[name]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    lines = CORPUS.splitlines(keepends=True)
    for text in random_strings(tokenizer) + [CORPUS] + lines:
        if "<|" in text:  # HF splits special-token strings out of any text; ours only when allowed
            continue
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        assert hf_tok.decode(ids) == tokenizer.decode(ids)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert list(hf_ids["input_ids"]) == render(tokenizer, messages, add_generation_prompt=prompt)


def test_special_token_ids_and_generation_config(exported):
    _, _, tokenizer, hf_dir = exported["llama-gqa-bpe"]
    config = json.loads((hf_dir / "config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    special = tokenizer.special_tokens
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (special["<|bos|>"], special["<|eos|>"], special["<|pad|>"])
    assert generation["eos_token_id"] == [special[s] for s in
                                          ("<|eos|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_pipeline_generates_text(exported):
    _, model, tokenizer, hf_dir = exported["gpt2-char"]
    generator = transformers.pipeline("text-generation", model=str(hf_dir))
    prompt = "Where does Bob see"
    text = generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    stops = stop_token_ids(tokenizer)
    ours = generate(model, tokenizer.encode(prompt), 10, temperature=0, stop_token_ids=stops)
    # the pipeline decodes with skip_special_tokens=True
    assert text == prompt + tokenizer.decode([t for t in ours if t not in tokenizer.special_tokens.values()])


def test_lora_exports_merged_and_as_peft_adapter(exported, tmp_path):
    peft = pytest.importorskip("peft")
    run, base_model, tokenizer, _ = exported["llama-gqa-bpe"]
    model = lora_adapter_on(base_model, tmp_path / "adapter")
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    merged_ours, _ = load_for_inference(run, tmp_path / "adapter")  # W + s B A, rounded once
    with torch.no_grad():
        expected, expected_merged = model(tokens), merged_ours(tokens)
    assert cli(["export", "hf", "--run", str(run), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert cli(["export", "hf", "--run", str(run), "--adapter", str(tmp_path / "adapter"),
                "--adapter-mode", "peft", "--out", str(tmp_path / "peft")]) == 0
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    with torch.no_grad():
        assert (merged(tokens).logits - expected_merged).abs().max().item() <= 1e-5
        assert (hf_base(tokens).logits - base_model(tokens)).abs().max().item() <= 1e-5  # the plain base
        with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft" / "adapter").eval()
        assert (with_adapter(tokens).logits - expected).abs().max().item() <= 1e-5


def lora_adapter_on(base_model: Transformer, out) -> Transformer:
    """A copy of base_model with a rank-4 LoRA adapter whose A and B are random, saved (ours) to out."""
    model = Transformer(base_model.config).eval()
    model.load_state_dict(base_model.state_dict())
    lora.add_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    lora.save_adapter(model, out)
    return model.eval()


def nothing_written(parent, out) -> bool:
    return not out.exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_unexpressible_architecture_is_refused_naming_the_field(tmp_path, capsys):
    tokenizer = CharTokenizer().train(CORPUS)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=32, d_model=32, n_layers=1, n_heads=4,
                         positions="sinusoidal")
    save_run(tmp_path / "sin", config, tokenizer, model_params(Transformer(config)))
    one_line_error(capsys, ["export", "hf", "--run", str(tmp_path / "sin"), "--out", str(tmp_path / "hf")],
                   "positions='sinusoidal'")
    assert nothing_written(tmp_path, tmp_path / "hf")


def test_a_failure_while_writing_leaves_nothing(exported, tmp_path, monkeypatch):
    run = exported["gpt2-bpe"][0]

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hf_dir, "save_hf_tokenizer", broken)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        hf_dir.export_hf(run, tmp_path / "hf")
    assert nothing_written(tmp_path, tmp_path / "hf")


def test_peft_mode_refuses_gpt2_and_plain_runs_writing_nothing(exported, tmp_path, capsys):
    run, base_model, _, _ = exported["gpt2-bpe"]
    lora_adapter_on(base_model, tmp_path / "adapter")
    out = tmp_path / "hf"
    one_line_error(capsys, ["export", "hf", "--run", str(run), "--adapter", str(tmp_path / "adapter"),
                            "--adapter-mode", "peft", "--out", str(out)], "needs a LLaMA-style run")
    assert nothing_written(tmp_path, out)
    one_line_error(capsys, ["export", "hf", "--run", str(run), "--adapter-mode", "peft", "--out", str(out)],
                   "is not a LoRA run")
    assert nothing_written(tmp_path, out)


def test_existing_output_is_refused(exported, capsys):
    run, _, _, hf_dir = exported["gpt2-char"]
    before = sorted(p.name for p in hf_dir.iterdir())
    one_line_error(capsys, ["export", "hf", "--run", str(run), "--out", str(hf_dir)], "already exists")
    assert sorted(p.name for p in hf_dir.iterdir()) == before


def test_a_lora_run_exports_merged_and_as_peft_adapter(env, tmp_path):
    """A LoRA fine-tune made by `minillm finetune` (conftest's env): its base plus its adapter."""
    peft = pytest.importorskip("peft")
    model, _ = load_for_inference(env["lora"])  # merged
    assert cli(["export", "hf", "--run", str(env["lora"]), "--out", str(tmp_path / "merged")]) == 0
    assert cli(["export", "hf", "--run", str(env["lora"]), "--adapter-mode", "peft",
                "--out", str(tmp_path / "peft")]) == 0
    tokens = torch.randint(0, model.config.vocab_size, (2, 48))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    with torch.no_grad():
        expected = model(tokens)
        for hf_model in (merged, with_adapter):
            assert (hf_model(tokens).logits - expected).abs().max().item() <= 1e-5


def test_export_gguf_command_writes_a_file_the_gguf_reader_opens(exported, tmp_path):
    """The `gguf` subcommand's wiring (the format itself is tested in test_gguf.py)."""
    gguf = pytest.importorskip("gguf")
    run, model, _, _ = exported["llama-gqa-bpe"]
    out = tmp_path / "m.gguf"
    assert cli(["export", "gguf", "--run", str(run), "--out", str(out), "--dtype", "f32"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert len(tensors) == len(model.state_dict())  # one GGUF tensor per parameter (lm_head untied)
