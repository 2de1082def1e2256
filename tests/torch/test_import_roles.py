"""An imported checkpoint ends generation at its own end token (GPT-2's `<|endoftext|>`, LLaMA's `</s>`,
Qwen's `<|im_end|>`), read from its tokenizer_config.json / generation_config.json / config.json, and
exports back with the same bos / eos tokens. The reference is transformers itself: its tokenizer's and
generation config's ids, and its own greedy `generate`, which stops at them."""

import json

import pytest
import torch

from minillm.tokenizer import load_tokenizer
from minillm.tokenizer.chat import stop_token_ids
from minillm.tokenizer.stream import special_ids
from minillm.torch.generate import generate
from minillm.torch.model import load_model
from tests.torch.conftest import CORPUS, one_line_error
from tests.torch.test_import_hf import hf_columns, randomise

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from minillm.cli import main as cli  # noqa: E402

SMALL = dict(max_position_embeddings=64, hidden_size=48, num_hidden_layers=2, intermediate_size=80,
             num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False)
PROMPT = "Anne sees the"
CHECKPOINTS = {  # name -> (config class and fields, added tokens, config.json's (bos, eos),
    #                   tokenizer_config.json, generation_config.json's eos)
    # GPT-2 as released: <|endoftext|> added last, named only by config.json's bos / eos ids
    "gpt2": (("GPT2Config", dict(n_positions=64, n_embd=48, n_layer=2, n_head=3, tie_word_embeddings=False)),
             ["<|endoftext|>"], ("<|endoftext|>", "<|endoftext|>"), None, None),
    # LLaMA: <s> / </s>, named in tokenizer_config.json as AddedToken objects
    "llama": (("LlamaConfig", SMALL), ["<s>", "</s>"], ("<s>", "</s>"),
              {"bos_token": {"content": "<s>", "__type": "AddedToken"},
               "eos_token": {"content": "</s>", "__type": "AddedToken"}}, None),
    # Qwen2-Instruct: eos <|im_end|> by name, no bos by name, pad <|endoftext|>; generation stops at both
    "qwen2": (("Qwen2Config", SMALL), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              ("<|endoftext|>", "<|im_end|>"),
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              ["<|im_end|>", "<|endoftext|>"]),
}
ROLES = {"gpt2": {"bos": ["<|endoftext|>"], "eos": ["<|endoftext|>"]},
         "llama": {"bos": ["<s>"], "eos": ["</s>"]},
         "qwen2": {"bos": ["<|endoftext|>"], "eos": ["<|im_end|>", "<|endoftext|>"],
                   "pad": ["<|endoftext|>"]}}


def hf_tokenizer(added: list[str]):
    """GPT-2's pipeline (ByteLevel with its own regex), trained by `tokenizers`; the added tokens last."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.add_special_tokens(added)
    return tok


def rig(model, prompt: list[int], eos: int) -> None:
    """Make greedy decoding emit `eos` a few steps in: its lm_head row becomes 1.01 x the row of the
    first token greedy picks, from step 3 on, that it has not picked before, so that eos outscores that
    token there (earlier steps, where other tokens won by more than 1 %, are unchanged: the tests check
    that a few tokens come first). The HF model then stops there too."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        target = next(t for k, t in enumerate(out) if k >= 2 and t not in out[:k])
        head = model.get_output_embeddings().weight
        head[eos] = head[target] * 1.01


def save_checkpoint(directory, name: str):
    """A random checkpoint whose greedy continuation of PROMPT reaches its (first) eos a few tokens in."""
    (cls, fields), added, (bos, eos), tokenizer_config, generation_eos = CHECKPOINTS[name]
    tok = hf_tokenizer(added)
    config = getattr(transformers, cls)(vocab_size=tok.get_vocab_size() + 3,  # 3 padding rows
                                        bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos),
                                        **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomise(model)
    rig(model, tok.encode(PROMPT).ids, tok.token_to_id(ROLES[name]["eos"][0]))
    if generation_eos:
        model.generation_config.eos_token_id = [tok.token_to_id(t) for t in generation_eos]
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (HF model, checkpoint dir, our run dir), imported through the CLI."""
    root = tmp_path_factory.mktemp("roles")
    out = {}
    for name in CHECKPOINTS:
        model = save_checkpoint(root / f"hf-{name}", name)
        assert cli(["import", "hf", "--model", str(root / f"hf-{name}"), "--out", str(root / name)]) == 0
        out[name] = (model, root / f"hf-{name}", root / name)
    return out


def as_list(ids) -> list[int]:
    return [] if ids is None else list(ids) if isinstance(ids, list) else [ids]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_roles_and_stop_ids_are_transformers_own(imported, name):
    hf_model, directory, run = imported[name]
    tokenizer = load_tokenizer(run)
    assert tokenizer.roles == ROLES[name]
    assert json.loads((run / "tokenizer.json").read_text())["roles"] == \
        {r: t[0] if len(t) == 1 else t for r, t in ROLES[name].items()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    generation = transformers.GenerationConfig.from_pretrained(directory)
    to_hf = {i: hf_tok.convert_tokens_to_ids(s) for s, i in tokenizer.special_tokens.items()}
    # what the CLI stops at, and every eos: the ids transformers' generate stops at
    assert [to_hf[i] for i in tokenizer.role_ids("eos")] == as_list(generation.eos_token_id)
    eos = hf_tok.eos_token_id if hf_tok.eos_token is not None else hf_model.config.eos_token_id
    assert to_hf[tokenizer.special_id("eos")] == eos == to_hf[special_ids(tokenizer, "eos")[0]]
    bos = hf_tok.bos_token_id if hf_tok.bos_token is not None else hf_model.config.bos_token_id
    assert to_hf[tokenizer.special_id("bos")] == bos
    assert [to_hf[i] for i in special_ids(tokenizer, "pad")] == as_list(hf_tok.pad_token_id)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_generation_and_sample_stop_at_the_end_token(imported, name, capsys):
    hf_model, directory, run = imported[name]
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    model, tokenizer = load_model(run)
    prompt = tokenizer.encode(PROMPT)
    ours = generate(model, prompt, 20, temperature=0, stop_token_ids=special_ids(tokenizer, "eos"),
                    tokenizer=tokenizer)
    ids = torch.tensor([hf_tok.encode(PROMPT, add_special_tokens=False)])
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               pad_token_id=0)[0, ids.shape[1]:].tolist()  # its generation_config's eos
    columns = hf_columns(tokenizer, tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))
    assert [columns[i] for i in ours] == theirs
    assert 2 <= len(ours) < 20 and ours[-1] == tokenizer.special_id("eos")  # stopped, a few tokens in
    assert cli(["sample", "--run", str(run), "--prompt", PROMPT, "--max-new-tokens", "20",
                "--temperature", "0", "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["samples"][0]["text"]
    assert text == PROMPT + hf_tok.decode(theirs[:-1])  # the end token and nothing after it


def test_every_listed_eos_stops(imported):
    """Qwen's generation_config lists <|im_end|> and <|endoftext|>: each ends generation."""
    hf_model, directory, run = imported["qwen2"]
    model, tokenizer = load_model(run)
    with torch.no_grad():  # now <|endoftext|> wins where <|im_end|> did
        head = model.lm_head.weight
        first, second = tokenizer.role_ids("eos")
        head[[first, second]] = head[[second, first]]
    stops = tokenizer.role_ids("eos")
    # what `sample` / the server (special_ids) and `chat` (stop_token_ids) stop at: both listed tokens
    assert special_ids(tokenizer, "eos") == stops and set(stops) <= set(stop_token_ids(tokenizer))
    out = generate(model, tokenizer.encode(PROMPT), 20, temperature=0, stop_token_ids=stops)
    assert 2 <= len(out) < 20 and out[-1] == second


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_export_keeps_the_end_tokens_and_imports_back(imported, name, tmp_path):
    hf_model, directory, run = imported[name]
    assert cli(["export", "hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    original, exported = (transformers.AutoTokenizer.from_pretrained(d) for d in (directory, tmp_path / "hf"))
    before = transformers.GenerationConfig.from_pretrained(directory)
    after = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    for ids, theirs in ((as_list(after.eos_token_id), as_list(before.eos_token_id)),
                        ([config.eos_token_id, config.bos_token_id],
                         [as_list(before.eos_token_id)[0], hf_model.config.bos_token_id])):
        assert exported.convert_ids_to_tokens(ids) == original.convert_ids_to_tokens(theirs)
    assert cli(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert load_tokenizer(tmp_path / "back").roles == load_tokenizer(run).roles


def test_an_ordinary_token_as_eos_is_a_one_line_error(imported, tmp_path, capsys):
    directory = tmp_path / "hf"
    directory.mkdir()
    for path in imported["llama"][1].iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
    one_line_error(capsys, ["import", "hf", "--model", str(directory), "--out", str(tmp_path / "run")],
                   "tokenizer_config.json: eos_token names 'a'", "not an added (special) token")
    assert not (tmp_path / "run").exists()
