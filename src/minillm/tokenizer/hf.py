"""Export to and import from the Hugging Face `tokenizers` JSON format (`tokenizer.json`).

Plain dicts in and out: a tokenizer's parts (byte vocabulary, merges, split pattern, special
tokens and their roles) <-> the `tokenizer.json` content (and, for the roles, the eos/bos/pad fields
of a checkpoint's other JSON files). `BPETokenizer` and `CharTokenizer` call these functions;
this module imports neither, nor `tokenizers` (the format is plain JSON: no extra package needed).

How our byte-level BPE is expressed in HF's pipeline, so that `Tokenizer.from_file` gives our ids:
- pre-tokenizer = Split(our regex, "Isolated") then ByteLevel(use_regex=False): first the same
  chunks as ours, then each chunk's bytes mapped to printable characters (GPT-2's byte-to-unicode
  table: the printable Latin-1 bytes stand for themselves, the rest are shifted above U+0100);
- model = BPE whose vocabulary is written in that printable alphabet, merges in our order, and
  `ignore_merges=False` (otherwise HF takes a whole chunk that happens to be in the vocabulary
  without merging, which can give different ids from merging by rank);
- decoder = ByteLevel (maps the printable characters back to bytes).

Two documented differences:
- Unicode versions: our split regex runs on the `regex` module (Unicode 17 tables), HF's on
  Oniguruma (older tables). The newest letters and digits (e.g. CJK Extension J, U+323B0..)
  count as letters for us and not for HF, so text containing them may pre-split, and hence
  encode, differently. The letter, number and whitespace classes agree on every code point that
  Python's `unicodedata` knows as assigned (a test checks all of them).
- Special tokens are HF "added tokens", which HF always splits out of the text. Our `encode`
  only does so when the caller allows them (the tiktoken convention), so ids differ on text that
  *contains a special-token string* unless `allowed_special="all"`.
"""

from __future__ import annotations

from typing import Any

Pair = tuple[int, int]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by HF's ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. become U+0100, U+0101, ...
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _added_tokens(special_tokens: dict[str, int]) -> list[dict[str, Any]]:
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    by_id = sorted(special_tokens.items(), key=lambda item: item[1])
    return [{"id": i, "content": s, **flags} for s, i in by_id]


def _tokenizer_json(special_tokens: dict[str, int], pre_tokenizer: dict, decoder: dict, model: dict) -> dict:
    """The frame every HF tokenizer.json has, around our pre-tokenizer, decoder and model."""
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(special_tokens), "normalizer": None, "pre_tokenizer": pre_tokenizer,
            "post_processor": None, "decoder": decoder, "model": model}


def bpe_to_hf(vocab: list[bytes], merges: list[Pair], pattern: str,
              special_tokens: dict[str, int]) -> dict[str, Any]:
    """HF `tokenizer.json` content for a byte-level BPE: `vocab[i]` are the bytes of id i."""
    byte_char = bytes_to_unicode()
    names = ["".join(byte_char[b] for b in token) for token in vocab]
    name_to_id: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in name_to_id:
            # Two merge paths built the same bytes; HF's vocabulary (string -> id) cannot hold both.
            raise ValueError(f"ids {name_to_id[name]} and {i} are the same bytes {vocab[i]!r}; "
                             "not expressible in HF BPE")
        name_to_id[name] = i
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": False,  # merge by rank even when a whole chunk is in the vocabulary
             "vocab": name_to_id, "merges": [[names[a], names[b]] for a, b in merges]}
    pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return _tokenizer_json(special_tokens, pre_tokenizer, byte_level, model)


def _hf_pattern(data: dict[str, Any], source: str) -> str:
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    raise ValueError(f"{source}: no Split(Regex) pre-tokenizer; "
                     "only byte-level BPE files written by save_hf load")


def bpe_from_hf(data: dict[str, Any],
                source: str = "tokenizer.json") -> tuple[str, list[Pair], dict[str, int]]:
    """HF `tokenizer.json` content of the shape `bpe_to_hf` writes -> (pattern, merges, special_tokens).

    Requires ids 0..255 to be the single bytes and merge k to create id 256 + k (our convention);
    other byte-level BPE files (e.g. GPT-2's, whose ids are ordered differently) are refused.
    """
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: model type {model.get('type')!r} is not BPE")
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = model["vocab"]
    for name, i in vocab.items():
        if i < 256 and (len(name) != 1 or char_byte.get(name) != i):
            raise ValueError(f"{source}: id {i} is {name!r}, not byte {i}; ids 0..255 must be the raw bytes")
    merges = []
    for k, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if vocab.get(left + right) != 256 + k:
            raise ValueError(f"{source}: merge {k} does not create id {256 + k}; not in minillm's id order")
        merges.append((vocab[left], vocab[right]))
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return _hf_pattern(data, source), merges, specials


def char_to_hf(chars: list[str], special_tokens: dict[str, int], unk_token: str,
               unk_id: int | None) -> dict[str, Any]:
    """HF `tokenizer.json` content for a character tokenizer: one piece per character, WordLevel model.

    Unknown characters map to `unk_token` in HF; ours raise unless built with an `unk_id`.
    """
    vocab = {c: i for i, c in enumerate(chars)}
    if unk_id is not None:
        vocab[unk_token] = unk_id
    vocab.update(special_tokens)
    # [\s\S] matches any single code point, newlines included.
    any_char = {"Regex": r"[\s\S]"}
    pre_tokenizer = {"type": "Split", "pattern": any_char, "behavior": "Isolated", "invert": False}
    model = {"type": "WordLevel", "vocab": vocab, "unk_token": unk_token}
    return _tokenizer_json(special_tokens, pre_tokenizer, {"type": "Fuse"}, model)


# --- any byte-level BPE tokenizer.json (GPT-2's, Llama 3's, one trained with `tokenizers`) -------
# HF's ByteLevel pre-tokenizer with use_regex=True splits with GPT-2's pattern (ours, spelled apart).
HF_BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _refuse(source: str, what: str) -> None:
    raise ValueError(f"{source}: {what} is not supported (byte-level BPE and character tokenizers import)")


def _byte_level_pattern(data: dict[str, Any], source: str) -> str:
    """The split regex of a ByteLevel pipeline: ByteLevel(use_regex=True) alone, or Split(Regex,
    Isolated) then ByteLevel(use_regex=False); anything else (Metaspace, Whitespace ...) is refused."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds[-1:] != ["ByteLevel"] or len(kinds) > 2 or (len(kinds) == 2 and kinds[0] != "Split"):
        _refuse(source, f"pre_tokenizer {' + '.join(map(str, kinds))}")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        _refuse(source, "pre_tokenizer ByteLevel add_prefix_space=true")
    if len(steps) == 1:
        if not byte_level.get("use_regex", True):
            _refuse(source, "ByteLevel use_regex=false without a Split")
        return HF_BYTE_LEVEL_PATTERN
    split = steps[0]
    if byte_level.get("use_regex", True) or "Regex" not in split.get("pattern", {}) \
            or split.get("behavior") != "Isolated" or split.get("invert"):
        _refuse(source, f"pre_tokenizer Split {split.get('pattern')} {split.get('behavior')} + ByteLevel "
                        f"use_regex={byte_level.get('use_regex', True)}")
    return split["pattern"]["Regex"]


def _check_byte_level_bpe(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The BPE model of a byte-level tokenizer.json whose encoding ours reproduces, else ValueError."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        _refuse(source, f"model type {model.get('type')!r}")
    if data.get("normalizer"):
        _refuse(source, f"normalizer {data['normalizer'].get('type')!r}")
    for field, allowed in (("byte_fallback", (False, None)), ("dropout", (None, 0.0)),
                           ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, "")),
                           ("ignore_merges", (False, None))):  # ignore_merges: whole words before merges
        if model.get(field) not in allowed:
            _refuse(source, f"model.{field}={model[field]!r}")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        _refuse(source, f"decoder {(data.get('decoder') or {}).get('type')!r}")
    return model


def bpe_from_hf_any(data: dict[str, Any], source: str = "tokenizer.json"
                    ) -> tuple[str, list[Pair], dict[str, int], list[int]]:
    """Any byte-level BPE `tokenizer.json` -> (pattern, merges, special_tokens, hf_ids).

    HF numbers a vocabulary as it likes (GPT-2: printable bytes first; `tokenizers`' trainer: special
    tokens first); ours is fixed (bytes 0..255, merge k = 256 + k, then the special tokens). So the
    tokens are renumbered: `hf_ids[i]` is the HF id of our id i, and a model's embedding rows are
    permuted with it (minillm.interop.hf_dir). Every added token becomes one of our special tokens.
    """
    model = _check_byte_level_bpe(data, source)
    pattern = _byte_level_pattern(data, source)
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ours = dict(char_byte)  # HF token string -> our id: the bytes first, then each merge's result
    missing = [b for c, b in char_byte.items() if c not in vocab]
    if missing:
        raise ValueError(f"{source}: byte 0x{missing[0]:02x} is not in the vocabulary; a byte-level BPE "
                         "must have all 256 bytes")
    merges: list[Pair] = []
    for k, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left not in ours or right not in ours:
            raise ValueError(f"{source}: merge {k} ({left!r}, {right!r}) uses a token no earlier merge made")
        if left + right in ours or left + right not in vocab:
            raise ValueError(f"{source}: merge {k} makes {left + right!r}, which another merge made "
                             "or the vocabulary lacks")
        merges.append((ours[left], ours[right]))
        ours[left + right] = 256 + k
    clash = [t for t in added if t in ours]
    if clash:  # HF splits it out of text as one id; ours would merge it from bytes: ids could differ
        raise ValueError(f"{source}: added token {clash[0]!r} is also an ordinary BPE token")
    unreachable = [t for t in vocab if t not in ours and t not in added]
    if unreachable:
        raise ValueError(f"{source}: vocabulary token {unreachable[0]!r} is neither a byte, a merge nor an "
                         "added token")
    hf_ids = [vocab[t] for t in sorted(ours, key=ours.get)]
    specials = {t: len(hf_ids) + j for j, t in enumerate(sorted(added, key=added.get))}
    hf_ids += sorted(added.values())
    return pattern, merges, specials, hf_ids


def char_from_hf(data: dict[str, Any], source: str = "tokenizer.json"
                 ) -> tuple[list[str], str | None, dict[str, int], list[int]]:
    """A character-level `tokenizer.json` (WordLevel over single characters, split into characters
    as `char_to_hf` writes it) -> (chars, unk_token or None, special_tokens, hf_ids): our
    CharTokenizer numbers the characters in code-point order, then <unk>, then the added tokens;
    `hf_ids[i]` is the HF id of our id i (as in `bpe_from_hf_any`)."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    if model.get("type") != "WordLevel" or pre.get("type") != "Split" or pre.get("invert") \
            or pre.get("pattern") != {"Regex": r"[\s\S]"} or pre.get("behavior") != "Isolated":
        _refuse(source, f"model {model.get('type')!r} with pre_tokenizer {pre.get('type')!r} (a WordLevel "
                        "model imports as one token per character only)")
    if data.get("normalizer"):
        _refuse(source, f"normalizer {data['normalizer'].get('type')!r}")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    unk = model.get("unk_token")
    vocab = {s: i for s, i in model["vocab"].items() if s not in added and s != unk}
    long = [s for s in vocab if len(s) != 1]
    if long:
        raise ValueError(f"{source}: WordLevel token {long[0]!r} is not one character; not a char tokenizer")
    chars = sorted(vocab)
    hf_ids = [vocab[c] for c in chars] + ([model["vocab"][unk]] if unk in model["vocab"] else [])
    specials = {t: len(hf_ids) + j for j, t in enumerate(sorted(added, key=added.get))}
    return chars, unk if unk in model["vocab"] else None, specials, hf_ids + sorted(added.values())


# --- which added token plays bos / eos / pad (minillm.tokenizer.base's role map) ----------------
def _named_token(fields: dict[str, Any], field: str, source: str) -> str | None:
    """tokenizer_config.json's `eos_token` & co.: a string, an AddedToken {"content": ...} or null."""
    value = fields.get(field)
    value = value.get("content") if isinstance(value, dict) else value
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{source}: {field} must be a token string or an AddedToken object, "
                         f"got {value!r:.60}")
    return value


def _listed_ids(fields: dict[str, Any], field: str, source: str) -> list[int]:
    """config.json's / generation_config.json's `eos_token_id` & co.: an id, a list of ids or null."""
    value = fields.get(field)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source}: {field} must be a token id or a list of ids, got {value!r:.60}")
    return ids


def roles_from_hf(data: dict[str, Any], token_files: list[tuple[str, dict]],
                  id_files: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """role (bos, eos, pad) -> the added tokens of tokenizer.json `data` that play it, read from a
    checkpoint's files, each given as (source, content): `token_files` (tokenizer_config.json,
    special_tokens_map.json) name it by text, e.g. `eos_token` (the first file that does wins); else
    `id_files` (generation_config.json, config.json) by HF id, `eos_token_id`. For eos the listed ids
    are added too: every one of them ends generation. An id tokenizer.json lacks is skipped (a stale
    default, e.g. GPT2Config's 50256 in a tiny model); an ordinary token is refused."""
    added = {t["content"] for t in data.get("added_tokens", [])}
    text_of = {i: t for t, i in (data.get("model") or {}).get("vocab", {}).items()}
    text_of.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    found: dict[str, list[str]] = {}
    for role in ("bos", "eos", "pad"):
        field = f"{role}_token"
        # (where it was found, token text): by name, first file only; then by id, for eos from every file
        named = [(f"{s}: {field}", t) for s, fields in token_files if (t := _named_token(fields, field, s))]
        listed = [(f"{s}: {field}_id {i}", text_of[i])
                  for s, fields in (id_files if role == "eos" or not named else [])
                  for i in _listed_ids(fields, f"{field}_id", s) if i in text_of]
        named = named[:1]
        for where, token in named + listed:
            if token not in added:  # minillm stops only at special tokens (one id, never merged from text)
                raise ValueError(f"{where} names {token!r}, which is not an added (special) token of "
                                 "tokenizer.json")
        if named or listed:
            found[role] = list(dict.fromkeys(t for _, t in named + listed))
    return found
