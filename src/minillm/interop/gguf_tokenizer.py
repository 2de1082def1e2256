"""Our byte-level BPE tokenizer as llama.cpp's GGUF tokenizer metadata (`tokenizer.ggml.*`).

llama.cpp's "gpt2" tokenizer model is byte-level BPE, as ours: a token list written in GPT-2's
printable byte alphabet (`minillm.tokenizer.hf.bytes_to_unicode`), the merges "left right" in
rank order, and a pre-tokenizer chosen by *name* (`tokenizer.ggml.pre`): llama.cpp carries its
own copy of each known split regex, so we name the one that is ours:
- our default, GPT-4's pattern (tiktoken cl100k), is LLaMA 3's regex. llama.cpp's "llama-bpe"
  has it but also turns on `ignore_merges` (a chunk found whole in the vocabulary is taken
  without merging), which can give other ids than merging by rank as we do; "dbrx" has the same
  regex with merges by rank, so that is the name we write;
- GPT-2's pattern is llama.cpp's "gpt-2".
Any other pattern, and character-level tokenizers, get a ValueError: llama.cpp could not
reproduce our ids. Special tokens are "control" tokens (never produced from plain text, not
printed); a model whose embedding table is larger than the tokenizer gets llama.cpp's filler
tokens "[PAD<id>]" of type "unused", as its own converter writes them.
`tokenizer_from_fields` reads such metadata back into our BPETokenizer (`import_gguf`).
"""

from __future__ import annotations

import gguf

from minillm.tokenizer.bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer
from minillm.tokenizer.chat import hf_chat_template, uses_role_tokens
from minillm.tokenizer.hf import bpe_from_hf, bytes_to_unicode

# our split regex -> the llama.cpp pre-tokenizer name with the same regex and merge rule
PRE_TOKENIZERS = {GPT4_SPLIT_PATTERN: "dbrx", GPT2_SPLIT_PATTERN: "gpt-2"}


def chat_template() -> str:
    """`hf_chat_template` without its `{% generation %}` marks: those are a `transformers` extension
    (assistant-token masks for training) that plain Jinja rejects; inference needs none of it."""
    template = hf_chat_template()
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0 .. vocab_size - 1: byte-level strings, specials, padding."""
    kind = getattr(tokenizer, "type_name", type(tokenizer).__name__)
    if kind != "bpe":
        what = "char-level tokenizer" if kind == "char" else f"tokenizer of type {kind!r}"
        raise ValueError(f"llama.cpp has no {what}; only runs with a byte-level BPE tokenizer export to GGUF")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{vocab_size} (ModelConfig.vocab_size)")
    byte_char = bytes_to_unicode()
    tokens = ["".join(byte_char[b] for b in piece) for piece in tokenizer.vocab]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    by_id = {i: s for s, i in tokenizer.special_tokens.items()}
    for i in range(len(tokens), vocab_size):
        special = by_id.get(i)
        tokens.append(special if special is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.CONTROL if special is not None else gguf.TokenType.UNUSED)
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:  # llama.cpp looks tokens up by text: two ids with one text cannot both work
            raise ValueError(f"ids {seen[token]} and {i} are the same token {token!r}; "
                             "llama.cpp's vocabulary cannot hold both")
        seen[token] = i
    return tokens, [int(t) for t in types]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write the `tokenizer.*` metadata of a byte-level BPE tokenizer (see the module docstring)."""
    tokens, types = token_list(tokenizer, vocab_size)
    pre = PRE_TOKENIZERS.get(tokenizer.pattern)
    if pre is None:
        raise ValueError(f"llama.cpp knows no pre-tokenizer with this run's split regex "
                         f"{tokenizer.pattern!r}; only the GPT-4 (default) and GPT-2 patterns export")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        ids = tokenizer.role_ids(name)  # ours, or an imported tokenizer's (its role map)
        if ids:
            add(ids[0])
    # Our prompts carry <|bos|> only where the chat template puts it; never add one implicitly.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if uses_role_tokens(tokenizer):
        writer.add_chat_template(chat_template())


def tokenizer_from_fields(fields: dict, source: str) -> BPETokenizer:
    """GGUF tokenizer metadata (as `add_tokenizer` writes it) -> our BPETokenizer with the same ids.

    The checks are `bpe_from_hf`'s (ids 0..255 the bytes, merge k makes id 256 + k), on the
    metadata restated as a Hugging Face tokenizer.json; control tokens become our special tokens.
    """
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') imports")
    patterns = {name: pattern for pattern, name in PRE_TOKENIZERS.items()}
    if pre not in patterns:
        raise ValueError(f"{source}: tokenizer.ggml.pre is {pre!r}; only {sorted(patterns)} split text "
                         "and merge exactly as minillm's BPE does")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = fields.get("tokenizer.ggml.merges", [])
    kinds = list(enumerate(zip(tokens, types)))
    ordinary = {t: i for i, (t, kind) in kinds if kind == gguf.TokenType.NORMAL}
    if len(ordinary) != 256 + len(merges):
        raise ValueError(f"{source}: {len(ordinary)} normal tokens, but 256 bytes + {len(merges)} merges "
                         f"make {256 + len(merges)}; not in minillm's id order")
    hf = {"model": {"type": "BPE", "vocab": ordinary, "merges": merges},
          "pre_tokenizer": {"type": "Split", "pattern": {"Regex": patterns[pre]}},
          "added_tokens": [{"id": i, "content": t, "special": True}
                           for i, (t, kind) in kinds if kind == gguf.TokenType.CONTROL]}
    pattern, merge_ids, special_tokens = bpe_from_hf(hf, source)
    return BPETokenizer.from_dict({"pattern": pattern, "merges": merge_ids, "special_tokens": special_tokens})
