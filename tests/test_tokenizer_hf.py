"""Export to Hugging Face `tokenizers`: the exported tokenizer.json gives our ids on any text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from minillm.data.sources import shakespeare_files
from minillm.tokenizer import load_tokenizer
from minillm.tokenizer.bpe import GPT2_SPLIT_PATTERN, BPETokenizer
from minillm.tokenizer.char import CharTokenizer
from minillm.tokenizer.hf import bpe_from_hf, bpe_to_hf, char_to_hf, roles_from_hf
from tests.conftest import random_unicode, unicode_text

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def corpus() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in shakespeare_files())


@pytest.fixture(scope="module")
def exported(corpus: str, tmp_path_factory):
    """Ours, trained on the first 1 MB of Shakespeare plus random Unicode, and its HF twin."""
    ours = BPETokenizer().train([corpus[: 1 << 20], random_unicode(5000, seed=5)], 1024)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    ours.save_hf(path)
    return ours, tokenizers.Tokenizer.from_file(str(path)), path


def test_same_ids_on_whole_shakespeare(exported, corpus: str) -> None:
    ours, hf, _ = exported
    assert ours.encode(corpus) == hf.encode(corpus).ids


def test_same_ids_on_random_unicode(exported) -> None:
    ours, hf, _ = exported
    for seed in range(20):
        text = random_unicode(2000, seed=100 + seed)  # contains "<|eos|>" (see test_same_ids_on_any_text)
        assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


@settings(max_examples=500, deadline=None)
@given(text=unicode_text)
def test_same_ids_on_any_text(exported, text: str) -> None:
    ours, hf, _ = exported
    # Special-token strings: HF always splits them out (documented difference), ours when allowed.
    assert ours.encode(text, allowed_special="all") == hf.encode(text).ids
    assert hf.decode(hf.encode(text).ids, skip_special_tokens=False) == text


def test_gpt2_pattern_exports_too(corpus: str, tmp_path) -> None:
    ours = BPETokenizer("gpt2").train(corpus[:200_000], 700)
    ours.save_hf(tmp_path / "t.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "t.json"))
    text = corpus[-100_000:] + random_unicode(3000, seed=6)
    assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


def test_special_tokens_single_ids_in_hf_only_when_allowed_in_ours(exported) -> None:
    ours, hf, _ = exported
    text = "<|system|>Be brief.<|user|>Hi<|assistant|>Hello<|eos|>"
    allowed = ours.encode(text, allowed_special="all")
    assert allowed == hf.encode(text).ids and len([i for i in allowed if i >= 256 + len(ours.merges)]) == 4
    assert ours.encode(text) != allowed and ours.decode(ours.encode(text)) == text


def test_load_hf_file_back(exported) -> None:
    ours, _, path = exported
    for loaded in (BPETokenizer.load(path), load_tokenizer(path)):
        assert loaded.merges == ours.merges and loaded.special_tokens == ours.special_tokens
        assert loaded.pattern == ours.pattern


def test_char_tokenizer_exports(corpus: str, tmp_path) -> None:
    ours = CharTokenizer().train(corpus[:100_000])
    ours.save_hf(tmp_path / "c.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "c.json"))
    text = corpus[:20_000] + "<|eos|>"
    assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


def test_regex_engines_agree_on_character_classes() -> None:
    """Our `regex` and HF's Oniguruma classify every assigned code point alike (see hf.py)."""
    import unicodedata

    import regex

    chars = [chr(c) for c in range(0x110000)
             if unicodedata.category(chr(c)) not in ("Cs", "Cn") and chr(c) != "!"]
    text = "!" + "!".join(chars) + "!"  # "!" (no letter, digit or space) isolates each character
    for char_class in (r"\p{L}", r"\p{N}", r"\s"):
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(char_class), "isolated")
        theirs = {piece for piece, _ in split.pre_tokenize_str(text) if len(piece) == 1 and piece != "!"}
        ours = set(regex.findall(char_class, text))
        assert ours == theirs, (char_class, sorted(ours ^ theirs)[:10])


def test_plain_dicts_in_and_out(tmp_path) -> None:
    # hf.py works on a tokenizer's parts, no tokenizer object: bytes a, b, c merged as (a, b), (ab, c).
    vocab = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
    merges = [(97, 98), (256, 99)]
    data = bpe_to_hf(vocab, merges, GPT2_SPLIT_PATTERN, {"<|eos|>": 258})
    assert data["model"]["merges"] == [["a", "b"], ["ab", "c"]] and data["model"]["vocab"]["abc"] == 257
    assert bpe_from_hf(data) == (GPT2_SPLIT_PATTERN, merges, {"<|eos|>": 258})
    (tmp_path / "t.json").write_text(json.dumps(data), encoding="utf-8")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "t.json"))
    assert theirs.encode("abcab c").ids == [257, 256, 32, 99]
    char = char_to_hf(["a", "b"], {"<|eos|>": 3}, "<|unk|>", 2)
    assert char["model"]["vocab"] == {"a": 0, "b": 1, "<|unk|>": 2, "<|eos|>": 3}
    with pytest.raises(ValueError, match="merge 0 does not create id 256"):
        bpe_from_hf({**data, "model": {**data["model"], "merges": [["b", "c"]]}}, source="x.json")


# --- roles: which of an imported tokenizer's special tokens is bos / eos / pad ---------------------
HF_DATA = {"model": {"vocab": {"a": 0, "b": 1}},  # a tokenizer.json: two ordinary tokens, two added ones
           "added_tokens": [{"id": 2, "content": "<|endoftext|>"}, {"id": 3, "content": "<|im_end|>"}]}


def test_roles_come_from_token_names_then_from_ids() -> None:
    names = ("tokenizer_config.json", {"eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},
                                       "bos_token": None, "pad_token": "<|endoftext|>"})
    generation = ("generation_config.json", {"eos_token_id": [3, 2], "bos_token_id": 2, "pad_token_id": 3})
    config = ("config.json", {"eos_token_id": 50256, "bos_token_id": 50256})  # GPT2Config's defaults: absent
    # by name first; bos has none, so its id; eos: the named token, then every listed id
    assert roles_from_hf(HF_DATA, [names], [generation, config]) == \
        {"bos": ["<|endoftext|>"], "eos": ["<|im_end|>", "<|endoftext|>"], "pad": ["<|endoftext|>"]}
    assert roles_from_hf(HF_DATA, [], [config]) == {}
    legacy = ("special_tokens_map.json", {"eos_token": "<|endoftext|>"})
    assert roles_from_hf(HF_DATA, [("tokenizer_config.json", {}), legacy], []) == {"eos": ["<|endoftext|>"]}


ROLE_SOURCE_ERRORS = {
    "ordinary token by name": (([("tokenizer_config.json", {"eos_token": "a"})], []),
                               "tokenizer_config.json: eos_token names 'a', which is not an added (special)"),
    "ordinary token by id": (([], [("config.json", {"bos_token_id": 1})]),
                             "config.json: bos_token_id 1 names 'b'"),
    "name of another type": (([("tokenizer_config.json", {"pad_token": 7})], []),
                             "tokenizer_config.json: pad_token must be a token string"),
    "id of another type": (([], [("config.json", {"eos_token_id": "2"})]),
                           "config.json: eos_token_id must be a token id or a list of ids"),
}


@pytest.mark.parametrize("case", ROLE_SOURCE_ERRORS)
def test_what_a_role_cannot_name_is_an_error_naming_file_and_field(case) -> None:
    (token_files, id_files), needle = ROLE_SOURCE_ERRORS[case]
    with pytest.raises(ValueError) as error:
        roles_from_hf(HF_DATA, token_files, id_files)
    assert needle in str(error.value) and "\n" not in str(error.value)


def imported_style() -> BPETokenizer:
    return BPETokenizer.from_dict({"pattern": GPT2_SPLIT_PATTERN, "merges": [],
                                   "special_tokens": {"<|endoftext|>": 256, "</s>": 257}})


def test_a_role_map_is_saved_loaded_and_consulted(tmp_path) -> None:
    tok = imported_style()
    tok.set_roles({"eos": ["</s>", "<|endoftext|>"], "bos": "<|endoftext|>"})
    tok.save(tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["roles"] == {"eos": ["</s>", "<|endoftext|>"], "bos": "<|endoftext|>"}
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert (back.special_id("eos"), back.eos_id, back.role_ids("eos")) == (257, 257, [257, 256])
    assert (back.special_id("bos"), back.role_ids("pad"), back.special_token("pad")) == (256, [], None)
    assert back.encode("x</s>", allowed_special=["eos"]) == [ord("x"), 257]
    with pytest.raises(KeyError, match="unknown special token 'pad'"):
        back.special_id("pad")
    # Our own tokenizers have no map: special_id is SPECIAL_TOKENS', and the file has no "roles".
    own = CharTokenizer().train("hello")
    own.save(tmp_path / "own.json")
    assert "roles" not in json.loads((tmp_path / "own.json").read_text())
    assert load_tokenizer(tmp_path / "own.json").role_ids("eos") == [own.special_tokens["<|eos|>"]]


ROLE_MAP_ERRORS = {
    "not a special token": ({"eos": "</x>"}, "role 'eos' names '</x>', which is not a special token"),
    "unknown role": ({"user": "</s>"}, "unknown role 'user'; roles are bos, eos, pad"),
    "empty list": ({"eos": []}, "role 'eos' must name a token or a non-empty list of tokens"),
    "not an object": (["</s>"], "roles must be an object"),
}


@pytest.mark.parametrize("case", ROLE_MAP_ERRORS)
def test_a_bad_role_map_is_a_one_line_error_naming_the_file_and_role(tmp_path, case) -> None:
    roles, needle = ROLE_MAP_ERRORS[case]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**imported_style().to_dict(), "roles": roles}))
    with pytest.raises(ValueError) as error:
        load_tokenizer(path)
    assert str(error.value).startswith(f"{path}: ") and needle in str(error.value)
    assert "\n" not in str(error.value)
