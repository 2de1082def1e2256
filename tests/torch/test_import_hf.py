"""`minillm import hf`: tiny random transformers checkpoints (GPT-2, LLaMA, Mistral, Qwen2 with the
awkward cases: odd n_kv_heads, untied heads, q/k/v biases, rope_theta != 10000) and byte-level BPE
tokenizers trained with `tokenizers` become runs whose logits and token ids are transformers'; what
minillm cannot express is a one-line error and nothing is written."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from minillm.checkpoint import load_run
from minillm.torch.model import load_model
from tests.conftest import TRICKY, random_unicode
from tests.torch.conftest import CORPUS, one_line_error

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from minillm.cli import main as cli  # noqa: E402

SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # Qwen2's / Llama 3's pattern, without possessive quantifiers
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL = dict(max_position_embeddings=64, hidden_size=48, num_hidden_layers=2, intermediate_size=80)
FAMILIES = {  # name -> (config class, its fields, tokenizer pre-splitting)
    "gpt2": ("GPT2Config", dict(n_positions=64, n_embd=48, n_layer=2, n_head=3, n_inner=80,
                                activation_function="gelu_new", tie_word_embeddings=False), "byte_level"),
    "llama": ("LlamaConfig", dict(SMALL, num_attention_heads=6, num_key_value_heads=3, attention_bias=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                  tie_word_embeddings=False), "split"),
    "mistral": ("MistralConfig", dict(SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                                      sliding_window=None, tie_word_embeddings=True), "split"),
    "qwen2": ("Qwen2Config", dict(SMALL, num_attention_heads=6, num_key_value_heads=3,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  tie_word_embeddings=False), "split"),
}


def hf_tokenizer(kind: str):
    """A byte-level BPE trained by `tokenizers` (its own id order: special tokens, then the alphabet)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    pre = tokenizers.pre_tokenizers
    split = [pre.Split(tokenizers.Regex(SPLIT), "isolated"),
             pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False) if kind == "byte_level" else pre.Sequence(split)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=420, special_tokens=ADDED, show_progress=False,
                                             initial_alphabet=pre.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS, random_unicode(400, 0)], trainer)
    return tok


def randomise(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.1) + ("norm" in name or "ln_" in name))


def save_checkpoint(directory, name: str):
    cls, fields, kind = FAMILIES[name]
    tok = hf_tokenizer(kind)
    config = getattr(transformers, cls)(vocab_size=tok.get_vocab_size() + 3, **fields)  # 3 padding rows
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomise(model)
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    return model, tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (HF model, HF tokenizer, checkpoint dir, our run dir), imported through the CLI."""
    root = tmp_path_factory.mktemp("import")
    out = {}
    for name in FAMILIES:
        model, tok = save_checkpoint(root / f"hf-{name}", name)
        assert cli(["import", "hf", "--model", str(root / f"hf-{name}"), "--out", str(root / name)]) == 0
        out[name] = (model, tok, root / f"hf-{name}", root / name)
    return out


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character table, written out from its encoder.py (the reference, not ours)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def hf_columns(tokenizer, hf_tok) -> list[int]:
    """The HF id of each of our ids, found through the token's bytes (or an added token's text)."""
    chars, specials = gpt2_byte_chars(), {i: s for s, i in tokenizer.special_tokens.items()}
    names = [specials[i] if i in specials else "".join(chars[b] for b in tokenizer.token_bytes(i))
             for i in range(tokenizer.vocab_size)]
    return [hf_tok.token_to_id(name) for name in names]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(imported, name):
    hf_model, hf_tok, _, run = imported[name]
    model, tokenizer = load_model(run)
    columns = hf_columns(tokenizer, hf_tok)
    text = CORPUS[:200]
    ids = tokenizer.encode(text)
    assert [columns[i] for i in ids] == hf_tok.encode(text).ids
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), hf_model(torch.tensor([hf_tok.encode(text).ids])).logits
    assert ours.shape == theirs.shape
    assert (ours[..., : len(columns)] - theirs[..., columns]).abs().max().item() <= 1e-5
    # every column, the 3 padding rows included: the same logits up to the order of the vocabulary
    assert (ours.sort(-1).values - theirs.sort(-1).values).abs().max().item() <= 1e-5


def test_config_expresses_each_family(imported):
    configs = {name: json.loads((run / "config.json").read_text())["model"]
               for name, (*_, run) in imported.items()}
    assert [configs[n]["n_kv_heads"] for n in FAMILIES] == [3, 3, 1, 3]
    assert [configs[n]["bias"] for n in FAMILIES] == [True, True, False, True]  # Qwen2: q/k/v biases
    assert [configs[n]["tie_embeddings"] for n in FAMILIES] == [False, False, True, False]
    assert (configs["llama"]["rope_theta"], configs["qwen2"]["rope_theta"]) == (500000.0, 1e6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # ByteLevel's own regex; Split + ByteLevel
def test_token_ids_match_on_1000_random_strings_and_the_corpus(imported, name):
    _, hf_tok, _, run = imported[name]
    _, tokenizer = load_model(run)
    columns = hf_columns(tokenizer, hf_tok)
    rng = random.Random(1)
    texts = [random_unicode(rng.randrange(0, 30), seed) if seed % 2 else "".join(rng.choices(TRICKY, k=6))
             for seed in range(1000)] + [CORPUS]
    for text in texts:
        ids = tokenizer.encode(text, allowed_special="all")
        assert [columns[i] for i in ids] == hf_tok.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    text = "a<|im_start|>user\nhi<|im_end|><|endoftext|>"
    assert [columns[i] for i in tokenizer.encode(text, allowed_special="all")] == hf_tok.encode(text).ids


def test_sample_reads_the_imported_run(imported, capsys):
    run = imported["llama"][3]
    assert cli(["sample", "--run", str(run), "--prompt", "Where does", "--max-new-tokens", "5",
                "--temperature", "0"]) == 0
    assert "Where does" in capsys.readouterr().out


def test_jax_backend_reads_the_imported_run(imported):
    jax_model = pytest.importorskip("minillm.jax.model")
    run = imported["qwen2"][3]
    model, tokenizer = load_model(run)
    config, _, params = load_run(run)
    tokens = tokenizer.encode(CORPUS[:60])
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).numpy()
    theirs = np.asarray(jax_model.forward(params, config, np.array([tokens])))
    assert abs(ours - theirs).max() <= 1e-4


def test_an_imported_run_fine_tunes(imported, tmp_path, capsys):
    """An imported tokenizer has none of our special tokens: fine-tuning falls back to the plain-text
    chat template and pads with any id (masked), and the result is a run `sample` reads."""
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                            for w in ["yes", "no", "maybe", "never"] * 6))
    out = tmp_path / "ft"
    assert cli(["finetune", "--run", str(imported["gpt2"][3]), "--data", str(data), "--method", "full",
                "--out", str(out), "--set", "val_every=30"]) == 2
    assert "no validation example with val_every=30" in capsys.readouterr().err and not out.exists()
    assert cli(["finetune", "--run", str(imported["gpt2"][3]), "--data", str(data), "--method", "full",
                "--out", str(out), "--set", "max_steps=2", "--set", "batch_size=4", "--set", "block_size=32",
                "--quiet"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([m["loss"] for m in metrics if "loss" in m]).all()
    assert cli(["sample", "--run", str(out), "--prompt", "Say", "--max-new-tokens", "3"]) == 0


def variant(imported, tmp_path, edit_config=None, edit_tokenizer=None, tokenizer_json=None):
    """A copy of the LLaMA checkpoint, its config.json or tokenizer.json edited, or the latter replaced."""
    directory = tmp_path / "variant"
    shutil.copytree(imported["llama"][2], directory)
    for name, edit in (("config.json", edit_config), ("tokenizer.json", edit_tokenizer)):
        if edit is not None:
            (directory / name).write_text(json.dumps(edit(json.loads((directory / name).read_text()))))
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    return directory


def other_tokenizer(kind: str) -> str:
    models, pre = tokenizers.models, tokenizers.pre_tokenizers
    if kind == "wordpiece":
        tok = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    elif kind == "unigram":
        tok = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    else:  # SentencePiece-style BPE (LLaMA 2, Mistral): Metaspace, byte fallback
        tok = tokenizers.Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], byte_fallback=True,
                                              unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre.Metaspace(), tokenizers.decoders.Metaspace()
    return tok.to_str()


ERRORS = {
    "architecture": (dict(edit_config=lambda c: {**c, "model_type": "gpt_neox",
                                                 "architectures": ["GPTNeoXForCausalLM"]}),
                     "model_type 'gpt_neox' (GPTNeoXForCausalLM) is not supported"),
    # Mistral's window imports (test_a_mistral_sliding_window_imports); Qwen2's per-layer one does not
    "sliding window": (dict(edit_config=lambda c: {**c, "model_type": "qwen2", "use_sliding_window": True,
                                                   "sliding_window": 16, "max_window_layers": 0}),
                       "sliding_window=16 < max_position_embeddings=64"),
    "rope scaling": (dict(edit_config=lambda c: {**c, "rope_parameters": {
                         "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
                     "rope_type 'linear'"),
    "head_dim": (dict(edit_config=lambda c: {**c, "head_dim": 16}), "head_dim=16"),
    "activation": (dict(edit_config=lambda c: {**c, "hidden_act": "gelu"}), "hidden_act 'gelu'"),
    "normalizer": (dict(edit_tokenizer=lambda t: {**t, "normalizer": {"type": "NFC"}}), "normalizer 'NFC'"),
    "ignore_merges": (dict(edit_tokenizer=lambda t: {**t, "model": {**t["model"], "ignore_merges": True}}),
                      "model.ignore_merges=True"),
    "wordpiece": (dict(tokenizer_json=other_tokenizer("wordpiece")), "model type 'WordPiece'"),
    "unigram": (dict(tokenizer_json=other_tokenizer("unigram")), "model type 'Unigram'"),
    "sentencepiece bpe": (dict(tokenizer_json=other_tokenizer("sentencepiece")), "byte_fallback=True"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_what_minillm_cannot_express_is_a_one_line_error_and_nothing_is_written(imported, tmp_path, capsys,
                                                                                 case):
    edits, needle = ERRORS[case]
    directory = variant(imported, tmp_path, **edits)
    args = ["import", "hf", "--model", str(directory), "--out", str(tmp_path / "run")]
    one_line_error(capsys, args, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]


def test_a_mistral_sliding_window_imports_as_attention_window(imported, tmp_path):
    hf_model, hf_tok, directory, _ = imported["mistral"]
    windowed = tmp_path / "mistral-window"
    shutil.copytree(directory, windowed)
    config = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    assert cli(["import", "hf", "--model", str(windowed), "--out", str(tmp_path / "run")]) == 0
    model, tokenizer = load_model(tmp_path / "run")
    assert model.config.attention_window == 16
    theirs = transformers.AutoModelForCausalLM.from_pretrained(windowed).eval()
    columns, ids = hf_columns(tokenizer, hf_tok), tokenizer.encode(CORPUS[:200])
    assert len(ids) > 3 * 16  # far beyond the window
    with torch.no_grad():
        ours, logits = model(torch.tensor([ids])), theirs(torch.tensor([[columns[i] for i in ids]])).logits
        unwindowed = hf_model(torch.tensor([[columns[i] for i in ids]])).logits  # the same weights, no window
    assert (ours[..., : len(columns)] - logits[..., columns]).abs().max().item() <= 1e-5
    assert (logits - unwindowed).abs().max().item() > 1e-3  # the window changes the function


def test_missing_tokenizer_and_existing_output_are_refused(imported, tmp_path, capsys):
    directory = variant(imported, tmp_path)
    (directory / "tokenizer.json").unlink()
    one_line_error(capsys, ["import", "hf", "--model", str(directory), "--out", str(tmp_path / "run")],
                   "tokenizer.json not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]
    one_line_error(capsys, ["import", "hf", "--model", str(imported["llama"][2]), "--out", str(directory)],
                   "already exists")


def test_merges_written_as_strings_import_the_same(imported, tmp_path):
    """Older tokenizer.json files (GPT-2's) write each merge as one "left right" string."""
    def as_strings(t):
        return {**t, "model": {**t["model"], "merges": [" ".join(m) for m in t["model"]["merges"]]}}

    directory = variant(imported, tmp_path, edit_tokenizer=as_strings)
    assert cli(["import", "hf", "--model", str(directory), "--out", str(tmp_path / "run")]) == 0
    assert load_model(tmp_path / "run")[1].to_dict() == load_model(imported["llama"][3])[1].to_dict()


def edit_model(edit):
    return lambda t: {**t, "model": edit(dict(t["model"]))}


def with_prefix_space(t):
    split, _ = t["pre_tokenizer"]["pretokenizers"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    return {**t, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}}


TOKENIZER_ERRORS = {
    "missing byte": (edit_model(lambda m: {**m, "vocab": {k: v for k, v in m["vocab"].items() if k != "Ā"}}),
                     "byte 0x00 is not in the vocabulary"),
    "merge made twice": (edit_model(lambda m: {**m, "merges": m["merges"] + m["merges"][:1]}),
                         "which another merge made"),
    "prefix space": (with_prefix_space, "add_prefix_space=true is not supported"),
}


@pytest.mark.parametrize("case", TOKENIZER_ERRORS)
def test_byte_level_bpe_files_ours_cannot_reproduce_are_refused(imported, tmp_path, capsys, case):
    edit, needle = TOKENIZER_ERRORS[case]
    directory = variant(imported, tmp_path, edit_tokenizer=edit)
    args = ["import", "hf", "--model", str(directory), "--out", str(tmp_path / "run")]
    one_line_error(capsys, args, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]
